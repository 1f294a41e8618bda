"""Malformed configs, checkpoints and inputs: each ends in one clear error naming the problem."""

import json
import shutil

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

from modeling_dsg import DSGConfig, DSGForCausalLM

TEXT = tiny.FAMILIES["llama"]().to_dict()


def config_with(**changes):
    g = tiny.guardrail("jumprelu")
    sae = {**g["sae"], **changes.pop("sae", {})}
    g = {**g, **changes, "sae": sae}
    for key in [k for k, v in g.items() if v is None]:
        del g[key]
    return DSGConfig(text_config=TEXT, guardrails=[g])


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(layer=tiny.LAYERS), "layer 4 is out of range"),
        (dict(layer=-1), "'layer' must be a non-negative integer"),
        (dict(sae={"d_in": tiny.HIDDEN + 1}), "does not match the base model's hidden size"),
        (dict(features=[1, 64]), "feature index 64 is out of range"),
        (dict(features=[3, 5, 3]), "feature index 3 is repeated"),
        (dict(threshold=1.5), "'threshold' must be a number in [0, 1]"),
        (dict(threshold=-0.1), "'threshold' must be a number in [0, 1]"),
        (dict(clamp=0.0), "'clamp' must be a number in (0, 1e+06]"),
        (dict(clamp=1e308), "'clamp' must be a number in (0, 1e+06]"),
        (dict(score="window", window=10**12), "'window' must be an integer in [2, 1048576]"),
        (dict(clamp=-5.0), "'clamp' must be a number in (0, 1e+06]"),
        (dict(sae={"d_sae": 10**12}), "sae.d_sae must be an integer in [1, 33554432]"),
        (dict(sae={"architecture": "mystery"}), "unknown SAE architecture 'mystery'"),
        (dict(sae={"architecture": "topk"}), "a TopK SAE needs an integer sae.k"),
        (dict(sae={"architecture": "topk", "k": 0}), "sae.k = 0 must be in [1, d_sae"),
        (dict(features=[]), "'features' must be a non-empty list"),
        (dict(mode="sometimes"), "unknown mode 'sometimes'"),
        (dict(name=""), "needs a non-empty 'name'"),
        (dict(sae={"normalize_activations": "covariance_whitening"}), "is not supported"),
        (dict(colour="blue"), "unknown field(s) colour"),
    ],
)
def test_bad_config(changes, message):
    with pytest.raises(ValueError) as err:
        config_with(**changes)
    assert message in str(err.value)
    assert str(err.value).startswith("DSG config: guardrail 0")


def test_duplicate_guardrail_names():
    g = tiny.guardrail()
    with pytest.raises(ValueError, match="names must be unique"):
        DSGConfig(text_config=TEXT, guardrails=[g, g])


@pytest.fixture()
def saved(tmp_path):
    return tiny.save_tiny_dsg(tmp_path / "ok")


def tampered(saved, tmp_path, change):
    out = tmp_path / "bad"
    shutil.copytree(saved, out)
    state = {k: v.clone() for k, v in load_file(saved / "model.safetensors").items()}
    change(state)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_missing_tensor(saved, tmp_path):
    bad = tampered(saved, tmp_path, lambda s: s.pop("guards.0.sae.W_dec"))
    with pytest.raises(ValueError, match=r"missing guardrail tensor\(s\) guards.0.sae.W_dec"):
        DSGForCausalLM.from_pretrained(bad)


def test_misshapen_tensor(saved, tmp_path):
    bad = tampered(saved, tmp_path, lambda s: s.__setitem__("guards.0.sae.W_enc", torch.zeros(5, 5)))
    with pytest.raises(ValueError, match=r"guards.0.sae.W_enc has shape \(5, 5\), expected \(32, 64\)"):
        DSGForCausalLM.from_pretrained(bad)


def test_nan_in_sae_weights(saved, tmp_path):
    def poison(state):
        state["guards.0.sae.W_enc"][0, 0] = float("nan")

    bad = tampered(saved, tmp_path, poison)
    with pytest.raises(ValueError, match="SAE tensor W_enc contains NaN"):
        DSGForCausalLM.from_pretrained(bad)


def test_feature_mask_disagrees_with_config(saved, tmp_path):
    def flip(state):
        state["guards.0.feature_mask"][0] = True

    bad = tampered(saved, tmp_path, flip)
    with pytest.raises(ValueError, match="feature_mask selects 6 features that differ"):
        DSGForCausalLM.from_pretrained(bad)


def test_tau_disagrees_with_config(saved, tmp_path):
    bad = tampered(saved, tmp_path, lambda s: s.__setitem__("guards.0.tau", torch.tensor(0.9, dtype=torch.float64)))
    with pytest.raises(ValueError, match="tau 0.9 differs from the config's threshold 0.3"):
        DSGForCausalLM.from_pretrained(bad)


def test_bad_config_json_on_load(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["guardrails"][0]["layer"] = 99
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="layer 99 is out of range"):
        DSGForCausalLM.from_pretrained(saved)


def test_zero_length_input():
    model, _ = tiny.tiny_dsg()
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(2, 0, dtype=torch.long))


def test_all_padding_row():
    model, _ = tiny.tiny_dsg()
    ids = torch.tensor([[1, 40, 41, 42], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="input row 1 is all padding"):
        model(input_ids=ids, attention_mask=mask)


def test_no_input():
    model, _ = tiny.tiny_dsg()
    with pytest.raises(ValueError, match="pass input_ids or inputs_embeds"):
        model()


def test_add_guardrail_checks_name_and_shapes():
    model, _ = tiny.tiny_dsg()
    with pytest.raises(ValueError, match="already exists"):
        model.add_guardrail(tiny.guardrail(name="topic"))
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.add_guardrail(tiny.guardrail(name="other"), {"W_enc": torch.zeros(3, 3)})
