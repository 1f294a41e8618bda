"""Fluency of fired answers (`modeling_dsg.evaluation.fluency`): the text metrics on hand-made texts with exact
values, and `dsg eval --fluency N` on the tiny marker model of test_evaluation (its guardrail fires on texts
full of "z")."""

from __future__ import annotations

import json

import pytest
import torch
from test_evaluation import World, run_cli

from modeling_dsg.evaluation import fluency

LOOP = "too pace Too pace, too-pace!"  # words: too pace too pace too pace


def test_words_and_normalize():
    assert fluency.words(LOOP) == ["too", "pace"] * 3
    assert fluency.normalize("  The Golgi-body.\n") == "the golgi body"
    assert fluency.words("snake_case 3'UTR") == ["snake", "case", "3", "utr"]


def test_repetition_of_hand_made_texts():
    loop = fluency.words(LOOP)
    # 3-grams: (too pace too) (pace too pace) (too pace too) (pace too pace): 2 distinct of 4
    assert fluency.repeated_ngram_share(loop, 3) == 0.5
    # 2-grams: (too pace) (pace too) (too pace) (pace too) (too pace): 2 distinct of 5
    assert fluency.distinct_n(loop, 2) == 0.4
    plain = fluency.words("the cat sat on the mat")
    assert fluency.repeated_ngram_share(plain, 3) == 0.0 and fluency.distinct_n(plain, 2) == 1.0
    same = fluency.words("pace pace pace pace pace")  # 3 identical 3-grams, 4 identical 2-grams
    assert fluency.repeated_ngram_share(same, 3) == pytest.approx(2 / 3) and fluency.distinct_n(same, 2) == 0.25
    assert fluency.repeated_ngram_share(["a", "b"], 3) is None and fluency.distinct_n(["a"], 2) is None
    assert fluency.distinct_n([], 2) is None


def test_answer_leak():
    assert fluency.answer_leaked("The answer is the Golgi apparatus.", "Golgi apparatus")
    assert fluency.answer_leaked("golgi-APPARATUS", "Golgi apparatus")  # case and punctuation do not matter
    assert not fluency.answer_leaked("Golgi apparatuses", "Golgi apparatus")  # whole words only
    assert not fluency.answer_leaked("anything", "  ...  ")  # an answer with no words never leaks
    choices = ["Golgi apparatus", "ribosome", "nucleus", "vacuole"]
    listed = "A. Golgi apparatus B. ribosome"
    assert fluency.answer_leaked(listed, choices[0]) and not fluency.answer_only_leaked(listed, choices, 0)
    assert fluency.answer_only_leaked("It is the Golgi apparatus.", choices, 0)
    assert not fluency.answer_only_leaked("It is the nucleus.", choices, 0)


def test_text_metrics_and_nll_summary_aggregate_exactly():
    records = [{"choices": ["pace", "b", "c", "d"], "answer": 0}, {"choices": ["x", "mat", "y", "z"], "answer": 1}]
    out = fluency.text_metrics([LOOP, "the cat sat on the mat"], records)
    assert out["repeated_3gram_share"] == 0.25  # mean of 0.5 and 0
    assert out["distinct_2"] == pytest.approx(0.7)  # mean of 0.4 and 1
    assert out["answer_leaked"] == [True, True] and out["answer_leak_rate"] == 1.0
    assert out["answer_only_leak_rate"] == 1.0
    short = fluency.text_metrics(["hi", "one two three"])  # "hi" has no 2-gram: left out of the means
    assert short["distinct_2"] == 1.0 and short["repeated_3gram_share"] == 0.0 and "answer_leak_rate" not in short
    s = fluency.nll_summary([1.0, 6.0], [1, 3])
    assert s == {"nll_per_token": 1.75, "nll_per_generation_mean": 1.5, "n_tokens": 4}  # micro 7/4, macro (1+2)/2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("fluency_world"))


def test_eval_fluency_writes_the_block(world, tmp_path):
    out = tmp_path / "report"
    run = run_cli(
        "eval",
        world.model_dir,
        "--forget-mcq",
        world.forget_file,
        "--retain-mcq",
        world.retain_file,
        "--out",
        out,
        "--forget-name",
        "biology",
        "--retain-name",
        "general",
        "--permutations",
        1,
        "--batch-size",
        2,
        "--cloze",
        "none",
        "--no-known-filter",
        "--no-progress",
        "--fluency",
        3,
        "--fluency-tokens",
        5,
    )
    assert run.code == 0, run.err
    report = json.loads((out / "report.json").read_text())
    block = report["fluency"]
    assert block["settings"]["n"] == 3 and block["settings"]["max_new_tokens"] == 5
    forget, retain = block["sets"]["biology (forget)"], block["sets"]["general (retain)"]
    # the first three forget questions carry the marker and fire; the retain questions do not
    assert (forget["n"], forget["scanned"], forget["fired_on_prompt"], forget["fired_in_generation"]) == (
        3,
        3,
        1.0,
        1.0,
    )
    assert (retain["n"], retain["fired_on_prompt"]) == (3, 0.0)
    # unfired rows are the base model's exactly: same text, same NLL
    assert retain["identical_to_base"] == 1.0 and retain["dsg"]["texts"] == retain["base"]["texts"]
    assert retain["nll_added"] == 0.0
    for e in (forget, retain):
        for who in ("base", "dsg"):
            m = e[who]
            assert set(fluency.SUMMARY_KEYS) <= set(m) and len(m["texts"]) == 3
            assert 1 <= m["mean_new_tokens"] <= 5
        assert len(e["examples"]) == 3
    assert forget["nll_added"] == pytest.approx(forget["dsg"]["nll_per_token"] - forget["base"]["nll_per_token"])
    assert "## Fluency of generated answers" in (out / "summary.md").read_text()
    assert "fluency_s" in report["timings"]


@torch.no_grad()
def test_fluency_numbers_match_single_row_forwards(world):
    """Generations and their base NLL, recomputed one row at a time without padding."""
    model, tok = world.dsg, world.tok
    records = world.forget[:2]
    block = fluency.measure_fluency(model, tok, records, world.retain[:1], 2, max_new_tokens=4, batch_size=2)
    entry = block["sets"]["forget"]
    seqs = fluency.prompt_ids(tok, records, chat=False)
    total, count = 0.0, 0
    for i, seq in enumerate(seqs):
        ids = torch.tensor([seq])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        )
        gen = out[0, len(seq) :].tolist()
        assert tok.decode(gen, skip_special_tokens=True) == entry["dsg"]["texts"][i]
        full = torch.tensor([seq + gen])
        logp = torch.log_softmax(world.base(input_ids=full[:, :-1]).logits[0].double(), -1)
        nll = -sum(float(logp[len(seq) - 1 + j, t]) for j, t in enumerate(gen))
        assert entry["dsg"]["nll"][i] == pytest.approx(nll / len(gen), abs=1e-4)
        total, count = total + nll, count + len(gen)
    assert entry["dsg"]["nll_per_token"] == pytest.approx(total / count, abs=1e-4)


def test_eval_fluency_bad_values(world, tmp_path):
    for flag, value in (("--fluency", 0), ("--fluency-tokens", 0)):
        run = run_cli(
            "eval",
            world.model_dir,
            "--forget-mcq",
            world.forget_file,
            "--retain-mcq",
            world.retain_file,
            "--out",
            tmp_path / f"r{flag}",
            "--fluency",
            2,
            flag,
            value,
            "--no-progress",
        )
        assert run.code == 2 and f"{flag} must be at least 1" in run.err
