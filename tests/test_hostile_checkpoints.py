"""Checkpoints that do not match their config.json are refused on load; non-finite activations are never
given a decision; an edit that would overflow the hidden state's dtype is refused."""

import json

import pytest
import tiny
import torch
from safetensors.torch import load_file
from test_bad_inputs import tampered

from modeling_dsg import DSGForCausalLM


@pytest.fixture()
def saved(tmp_path):
    return tiny.save_tiny_dsg(tmp_path / "ok")


def test_nan_tau_is_refused(saved, tmp_path):
    bad = tampered(
        saved, tmp_path, lambda s: s.__setitem__("guards.0.tau", torch.tensor(float("nan"), dtype=torch.float64))
    )
    with pytest.raises(ValueError, match="tau nan differs from the config's threshold"):
        DSGForCausalLM.from_pretrained(bad)


def test_extra_guardrail_tensors_are_refused(saved, tmp_path):
    def extra(state):
        state["guards.1.sae.W_enc"] = state["guards.0.sae.W_enc"].clone()

    bad = tampered(saved, tmp_path, extra)
    with pytest.raises(ValueError, match=r"unexpected guardrail tensor\(s\) guards.1.sae.W_enc"):
        DSGForCausalLM.from_pretrained(bad)


def test_empty_guardrails_with_guard_tensors_is_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    config["guardrails"] = []
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected guardrail tensor\(s\) guards.0."):
        DSGForCausalLM.from_pretrained(saved)


def test_dropped_base_tensor_is_refused(saved, tmp_path):
    name = next(k for k in load_file(saved / "model.safetensors") if k.endswith("layers.1.self_attn.q_proj.weight"))
    bad = tampered(saved, tmp_path, lambda s: s.pop(name))
    with pytest.raises(ValueError, match=rf"missing model tensor\(s\) {name}"):
        DSGForCausalLM.from_pretrained(bad)


def test_fewer_layers_in_config_than_in_weights_is_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = tiny.LAYERS - 1
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected model tensor\(s\) .*layers.3"):
        DSGForCausalLM.from_pretrained(saved)


def test_non_finite_hidden_state_gets_no_decision(saved, tmp_path):
    def poison(state):
        name = next(k for k in state if k.endswith("layers.0.mlp.down_proj.weight"))
        state[name][0, 0] = float("nan")

    model = DSGForCausalLM.from_pretrained(tampered(saved, tmp_path, poison))
    with pytest.raises(ValueError, match="non-finite activations at layer 1"):
        model(torch.tensor([[1, 40, 41, 42]]))


def test_an_edit_that_overflows_fp16_is_refused():
    model, _ = tiny.tiny_dsg("llama", [tiny.guardrail("jumprelu", layer=1, threshold=0.0, clamp=1e6)], active_rate=0.5)
    guard = model.guards[0]
    hidden = torch.randn(1, 6, tiny.HIDDEN)
    counted = torch.ones(1, 6, dtype=torch.bool)
    with torch.no_grad():
        delta = guard(hidden, counted, guard.initial_state(1, "cpu"))[0]
        assert delta is not None and torch.isfinite(delta).all()  # fine in fp32
        with pytest.raises(ValueError, match="the edit overflows torch.float16"):
            guard(hidden.half(), counted, guard.initial_state(1, "cpu"))
