"""The pieces of `dsg results` that can be checked by hand on tiny models: the dilution construction and
its attack accounting, decisions from stored activations against the guard's own, and the relearning
loop (fine-tuning moves the weights; guardrails are applied at test time and detached afterwards)."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

import tiny
from modeling_dsg import results
from test_build import get_world


def test_dilute_puts_k_times_the_prompt_of_filler_first():
    prompt, filler = [1, 50, 51, 52], [7, 8, 9, 10, 11]
    assert results.dilute(prompt, filler, 1, 0, bos=1) == [1, 7, 8, 9, 50, 51, 52]
    assert results.dilute(prompt, filler, 2, 3, bos=1) == [1, 10, 11, 7, 8, 9, 10, 50, 51, 52]  # wraps around
    assert results.dilute([50, 51], filler, 1, 0, bos=None) == [7, 8, 50, 51]


def test_attack_success_counts_only_prompts_that_fired_before():
    before = [True, True, True, False, True]
    after = [True, False, False, True, True]
    out = results.attack_success(before, after)
    assert out == {"fired_before": 4, "evaded": 2, "attack_success": 0.5, "trigger_rate": 0.6}
    assert results.attack_success([False], [True])["attack_success"] is None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return get_world(tmp_path_factory)


def test_stored_decisions_equal_the_guards_and_dilution_evades_the_fraction_score(world):
    """On the marker world: decisions from one stored pass equal the DSG model's recorded decisions, for
    the paper's score and the window score; diluting marker texts defeats the first, not the second."""
    from modeling_dsg.build import BuildOptions, assemble, gather_statistics, guardrail_build
    from modeling_dsg.decisions import guard_decisions
    from modeling_dsg.sources import load_base_model, load_sae, load_texts
    from test_build import SEQ_LEN, words

    base, tok = load_base_model(str(world.base))

    def texts(sources):
        return [t for source in sources for t in load_texts(source)]

    opts = BuildOptions(name="zeta", seq_len=SEQ_LEN, batch_size=64, window=8)
    with torch.no_grad():
        statistics = gather_statistics(base, tok, load_sae(str(world.sae_z)), texts(world.forget_sources),
                                       texts(world.retain_sources), opts, sae_layer=1)
    variants = {"fraction": guardrail_build(statistics, opts, tok).guardrail,
                "window": guardrail_build(statistics, dataclasses.replace(opts, score="window"), tok).guardrail}
    rng = random.Random(3)
    prompts = [words(rng, 6, "z") for _ in range(6)] + [words(rng, 6) for _ in range(3)]
    filler = [words(rng, 40) for _ in range(4)]
    options = results.ResultsOptions(seed=0)
    store = results._store(base, tok, statistics, results._token_rows(tok, prompts), "t", options)
    for name, g in variants.items():
        model = assemble(base, tok, [])
        model.add_guardrail(g, statistics.sae_state)
        recorded = guard_decisions(model, tok, prompts)["zeta"]["fired"].numpy()
        model.remove_guardrail("zeta")
        np.testing.assert_array_equal(results.fired(store, g), recorded)
        assert recorded[:6].all() and not recorded[6:].any()
    attack = results.dilution_attack(base, tok, statistics, prompts[:6], filler, variants, options)
    by = attack["by_guardrail"]
    assert by["fraction"]["5x"]["attack_success"] == 1.0  # a marker fraction of ~1/6 or less: below tau
    assert by["window"]["5x"]["attack_success"] == 0.0  # the prompt's own window still fires
    assert attack["n"] == 6 and attack["factors"] == [1, 2, 5]


def test_relearning_curve_trains_copies_and_detaches_guards():
    base = tiny.tiny_base("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    tok = tiny.tiny_tokenizer()
    from modeling_dsg.rows import build_rows

    rows = build_rows(["the zebra zips " * 20] * 8, tok, seq_len=16)
    g = tiny.guardrail("standard", name="zeta", layer=1, d_sae=8, features=[1], threshold=1.0)
    seen = []

    def score(model):
        seen.append(len(model.guards))
        ids = tok("the zebra zips", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    curves = results.relearning_curve({"none": (base, []), "guarded": (base, [(g, None)])}, tok, rows, (0, 3),
                                      score, lr=1e-2, batch_size=2, seed=0)
    assert seen == [0, 1, 0, 1]
    assert curves["none"][0] == curves["guarded"][0]  # tau = 1: the guard never fires
    assert curves["none"][1] < curves["none"][0]  # fine-tuning on the text lowers its loss
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # the caller's model is untouched
    assert not any(layer._forward_hooks for layer in base.model.layers)
