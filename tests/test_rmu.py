"""RMU baseline (modeling_dsg.pipelines.rmu) on a tiny random Llama: what trains, what moves, what stays."""

from __future__ import annotations

import argparse
import copy
import json
import random

import pytest
import torch
from tiny import BOS, LAYERS, tiny_base, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_dsg.data.rows import build_rows
from modeling_dsg.errors import DSGError
from modeling_dsg.pipelines.rmu import (
    RMU_FILE,
    RMUOptions,
    _Batches,
    configure_parser,
    default_layer,
    layer_hidden,
    options_from_args,
    rmu_unlearn,
    run,
    run_rmu,
    steering_vector,
)

LAYER = 2
DOWN = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(LAYERS)]


def _texts(alphabet: str, n: int, seed: int) -> list[str]:
    """n documents of random 'words' over `alphabet`: forget and retain use disjoint byte sets."""
    rng = random.Random(seed)
    return [
        " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(14, 22)))
        for _ in range(n)
    ]


FORGET = _texts("qxzjkvwy", 60, 0)
RETAIN = _texts("aeiostnr", 60, 1)
HELD_FORGET = _texts("qxzjkvwy", 12, 2)
HELD_RETAIN = _texts("aeiostnr", 12, 3)

FAST = dict(layer=LAYER, steps=40, batch_size=4, seq_len=32, lr=5e-3, alpha=20.0)


def _hidden(model, texts, layer=LAYER, params=None):
    """Layer output at real non-BOS tokens of `texts` (one row per text), [n, d]."""
    rows = build_rows(texts, tiny_tokenizer(), seq_len=48, packing=False, max_docs=None)
    with torch.no_grad():
        h = layer_hidden(model, layer, rows.input_ids, rows.attention_mask, params)
    keep = rows.attention_mask.bool() & (rows.input_ids != BOS)
    return h[keep]


@pytest.fixture(scope="module")
def trained():
    base = tiny_base()
    model = copy.deepcopy(base)
    info = rmu_unlearn(model, tiny_tokenizer(), FORGET, RETAIN, RMUOptions(**FAST))
    return base, model, info


def test_only_the_selected_weights_change(trained):
    base, model, info = trained
    assert info["layer"] == LAYER and info["update_layers"] == [0, 1, 2]
    assert info["updated_parameters"] == DOWN[:3]
    before, after = base.state_dict(), model.state_dict()
    for name in before:
        if name in DOWN[:3]:
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name
    assert all(p.requires_grad for p in model.parameters())  # restored after training
    assert not model.training


def test_other_update_layers_and_params():
    base = tiny_base()
    model = copy.deepcopy(base)
    options = RMUOptions(**{**FAST, "steps": 3}, update_layers=(1, 2), update_params=("mlp.down_proj", "mlp.up_proj"))
    info = rmu_unlearn(model, tiny_tokenizer(), FORGET, RETAIN, options)
    chosen = {f"model.layers.{i}.mlp.{m}.weight" for i in (1, 2) for m in ("down_proj", "up_proj")}
    assert set(info["updated_parameters"]) == chosen
    assert info["n_updated_parameters"] == sum(p.numel() for n, p in model.named_parameters() if n in chosen)
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]) == (name not in chosen), name


def test_forget_activations_move_to_the_target_and_retain_ones_stay(trained):
    base, model, info = trained
    forget = info["losses"]["forget"]
    assert len(forget) == FAST["steps"] == len(info["losses"]["retain"])
    assert sum(forget[-5:]) / 5 < 0.5 * sum(forget[:5]) / 5  # the forget term falls

    target = info["steering_coeff"] * steering_vector(model.config.hidden_size, 0)
    f0, f1 = _hidden(base, HELD_FORGET), _hidden(model, HELD_FORGET)  # held-out texts
    r0, r1 = _hidden(base, HELD_RETAIN), _hidden(model, HELD_RETAIN)
    dist0, dist1 = (f0 - target).norm(dim=-1).mean(), (f1 - target).norm(dim=-1).mean()
    assert dist1 < 0.6 * dist0
    cos0 = torch.nn.functional.cosine_similarity(f0, target[None]).mean()
    cos1 = torch.nn.functional.cosine_similarity(f1, target[None]).mean()
    assert cos1 > cos0 + 0.3
    forget_move = (f1 - f0).norm(dim=-1).mean()
    retain_move = (r1 - r0).norm(dim=-1).mean()
    assert retain_move < 0.2 * forget_move
    assert retain_move < 0.3 * r0.norm(dim=-1).mean()

    # the retain term is what holds them: without it (alpha = 0) retain activations move far more
    free = copy.deepcopy(base)
    rmu_unlearn(free, tiny_tokenizer(), FORGET, RETAIN, RMUOptions(**{**FAST, "alpha": 0.0}))
    assert (_hidden(free, HELD_RETAIN) - r0).norm(dim=-1).mean() > 5 * retain_move


def test_steering_coefficient_is_the_multiplier_times_the_forget_norm(trained):
    base, _, info = trained
    rows = build_rows(FORGET, tiny_tokenizer(), seq_len=32, seed=0)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:32]
    rows = rows.select(order)
    with torch.no_grad():
        h = layer_hidden(base, LAYER, rows.input_ids, rows.attention_mask)
    keep = rows.attention_mask.bool() & (rows.input_ids != BOS)
    norm = h.norm(dim=-1)[keep].mean().item()
    assert info["forget_activation_norm"] == pytest.approx(norm, rel=1e-5)
    assert info["steering_coeff"] == pytest.approx(3.0 * norm, rel=1e-5)
    u = steering_vector(32, 0)
    assert u.norm().item() == pytest.approx(1.0) and (u >= 0).all()

    fixed = RMUOptions(**{**FAST, "steps": 1}, steering_coeff=2.5)
    assert rmu_unlearn(copy.deepcopy(base), tiny_tokenizer(), FORGET, RETAIN, fixed)["steering_coeff"] == 2.5


def test_first_step_terms_count_real_tokens_only():
    """Step 0's terms from the untouched model equal a per-token sum over non-padding (and, for forget, non-BOS)
    tokens."""
    base, tok = tiny_base(), tiny_tokenizer()
    options = RMUOptions(**{**FAST, "steps": 1, "packing": False, "seq_len": 160})  # one padded row per document
    info = rmu_unlearn(copy.deepcopy(base), tok, FORGET, RETAIN, options)
    forget = build_rows(FORGET, tok, seq_len=160, packing=False)
    retain = build_rows(RETAIN, tok, seq_len=160, packing=False)
    f_ids, f_mask = next(_Batches(forget, 4, 0))
    r_ids, r_mask = next(_Batches(retain, 4, 1))
    assert (f_mask == 0).any()  # the batch really has padding
    target = info["steering_coeff"] * steering_vector(32, 0)
    with torch.no_grad():
        h = layer_hidden(base, LAYER, f_ids, f_mask)
    sq = [
        ((h[b, t] - target) ** 2).mean()
        for b in range(h.shape[0])
        for t in range(h.shape[1])
        if f_mask[b, t] and f_ids[b, t] != BOS
    ]
    assert info["losses"]["forget"][0] == pytest.approx(float(torch.stack(sq).mean()), rel=1e-5)
    assert info["losses"]["retain"][0] == 0.0  # before the first update both models agree
    assert info["tokens"]["forget"] == int(f_mask.sum()) and info["tokens"]["retain"] == int(r_mask.sum())


def test_deterministic_with_a_seed():
    runs = []
    for seed in (0, 0, 1):
        model = tiny_base()
        info = rmu_unlearn(model, tiny_tokenizer(), FORGET, RETAIN, RMUOptions(**{**FAST, "steps": 8}, seed=seed))
        runs.append((info["losses"], model.state_dict()[DOWN[2]].clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0] and not torch.equal(runs[0][1], runs[2][1])


def test_early_stop_equals_the_full_forward_and_params_swap_in():
    model = tiny_base()
    rows = build_rows(FORGET[:6], tiny_tokenizer(), seq_len=48, packing=False)  # right padding included
    with torch.no_grad():
        full = model(
            input_ids=rows.input_ids, attention_mask=rows.attention_mask, output_hidden_states=True
        ).hidden_states
        for layer in range(LAYERS - 1):  # the last entry of hidden_states has the final norm applied
            early = layer_hidden(model, layer, rows.input_ids, rows.attention_mask)
            assert torch.equal(early, full[layer + 1])
        # params swap in for one call only
        zero = {DOWN[1]: torch.zeros_like(model.state_dict()[DOWN[1]])}
        swapped = layer_hidden(model, 2, rows.input_ids, rows.attention_mask, zero)
        edited = copy.deepcopy(model)
        edited.model.layers[1].mlp.down_proj.weight.zero_()
        assert torch.equal(swapped, layer_hidden(edited, 2, rows.input_ids, rows.attention_mask))
        assert torch.equal(layer_hidden(model, 2, rows.input_ids, rows.attention_mask), full[3])


def test_frozen_weights_reproduce_the_base(trained):
    base, model, _ = trained
    frozen = {name: base.state_dict()[name] for name in DOWN[:3]}
    assert torch.equal(_hidden(model, HELD_RETAIN, params=frozen), _hidden(base, HELD_RETAIN))


def _write_inputs(tmp_path):
    base_dir = tmp_path / "base"
    tiny_base().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("\n\n".join(FORGET))
    retain.write_text("\n\n".join(RETAIN))
    return base_dir, forget, retain


def test_run_rmu_writes_a_plain_model_folder(tmp_path):
    base_dir, forget, retain = _write_inputs(tmp_path)
    out = tmp_path / "rmu"
    info = run_rmu(str(base_dir), str(forget), [str(retain)], out, RMUOptions(**{**FAST, "steps": 4}))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    record = json.loads((out / RMU_FILE).read_text())
    assert record["losses"] == info["losses"] and record["steps"] == 4
    assert record["forget_sources"] == [str(forget)] and record["retain_sources"] == [str(retain)]
    assert record["base_model"] == str(base_dir) and record["total_s"] >= record["train_s"] > 0
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, base[name]) == (name not in DOWN[:3]), name
    assert not list(tmp_path.glob(".rmu.tmp-*"))

    with pytest.raises(DSGError, match="already exists"):
        run_rmu(str(base_dir), str(forget), str(retain), out, RMUOptions(**FAST))
    assert json.loads((out / RMU_FILE).read_text()) == record  # untouched

    # the CLI module (registered by the lead as `dsg rmu`) with --overwrite
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(
        [
            "--base",
            str(base_dir),
            "--forget",
            str(forget),
            "--retain",
            str(retain),
            "--out",
            str(out),
            "--overwrite",
            "--layer",
            "1",
            "--update-layers",
            "0",
            "1",
            "--steps",
            "2",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
        ]
    )
    assert options_from_args(args).update_layers == (0, 1)
    run(args)
    record = json.loads((out / RMU_FILE).read_text())
    assert record["layer"] == 1 and record["update_layers"] == [0, 1] and record["steps"] == 2


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(layer=LAYERS), "layer 4 is out of range"),
        (dict(layer=-1), "layer -1 is out of range"),
        (dict(layer=1, update_layers=(2,)), r"update layers \[2\] are out of range"),
        (dict(update_layers=(-1, 0)), r"update layers \[-1\] are out of range"),
        (dict(update_params=("mlp.nope",)), "has no module 'mlp.nope'"),
        (dict(steps=0), "steps must be at least 1"),
        (dict(alpha=-1.0), "alpha must be >= 0"),
        (dict(steering_coeff=0.0), "steering_coeff must be > 0"),
    ],
)
def test_bad_options(options, message):
    model = tiny_base()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DSGError, match=message):
        rmu_unlearn(model, tiny_tokenizer(), FORGET, RETAIN, RMUOptions(**{**FAST, **options}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_corpora_and_outputs(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(DSGError, match="forget corpus is empty"):
        rmu_unlearn(tiny_base(), tok, [], RETAIN, RMUOptions(**FAST))
    with pytest.raises(DSGError, match="retain corpus: the corpus has no document longer than 50"):
        rmu_unlearn(tiny_base(), tok, FORGET, ["too short"], RMUOptions(**FAST))

    base_dir, forget, retain = _write_inputs(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "out"
    with pytest.raises(DSGError, match="is empty"):
        run_rmu(str(base_dir), str(empty), str(retain), out, RMUOptions(**FAST))
    with pytest.raises(DSGError, match="layer 9 is out of range"):  # fails after loading: no folder left behind
        run_rmu(str(base_dir), str(forget), str(retain), out, RMUOptions(**{**FAST, "layer": 9}))
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_default_layer_is_the_papers_depth_ratio():
    assert default_layer(32) == 7 and default_layer(30) == 7 and default_layer(4) == 1 and default_layer(1) == 0
    model = tiny_base()
    info = rmu_unlearn(model, tiny_tokenizer(), FORGET, RETAIN, RMUOptions(**{**FAST, "layer": None, "steps": 1}))
    assert info["layer"] == 1 and info["update_layers"] == [0, 1]


@pytest.mark.parametrize(
    "family, weight",
    [
        ("gpt2", "transformer.h.{}.mlp.c_proj.weight"),
        ("gemma2", "model.layers.{}.mlp.down_proj.weight"),
        ("qwen2", "model.layers.{}.mlp.down_proj.weight"),
    ],
)
def test_other_families_train_their_mlp_output_projection(family, weight):
    base = tiny_base(family)
    model = copy.deepcopy(base)
    info = rmu_unlearn(model, tiny_tokenizer(), FORGET, RETAIN, RMUOptions(**{**FAST, "steps": 3}))
    chosen = [weight.format(i) for i in (0, 1, 2)]
    assert info["updated_parameters"] == sorted(chosen) and info["losses"]["retain"][0] == 0.0
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]) == (name not in chosen), name
