"""The metric functions of `modeling_dsg.evaluation.metrics` on hand-made inputs whose answers are known exactly,
the known-questions filter on fake scorers, and the `evaluate` module `modeling_dsg/evaluation/dsg_unlearning` (loaded
offline from its local path) giving the same numbers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from modeling_dsg.evaluation import metrics
from modeling_dsg.paths import PACKAGE_DIR, SHIPPED

LOG = np.log


# ------------------------------------------------------------------------------ choice metrics
def test_choice_metrics_by_hand():
    # three questions; the scores are log-probabilities of four letters that do not sum to 1
    p = np.array(
        [
            [0.1, 0.4, 0.2, 0.1],  # answer 1: right, renormalised 0.4 / 0.8 = 0.5
            [0.3, 0.1, 0.1, 0.1],  # answer 2: wrong (argmax 0), renormalised 0.1 / 0.6
            [0.2, 0.2, 0.05, 0.05],
        ]
    )  # answer 0: a tie between 0 and 1 goes to 0: right, 0.2 / 0.5
    out = metrics.choice_metrics(LOG(p), [1, 2, 0])
    assert out["n"] == 3
    assert out["accuracy"] == pytest.approx(2 / 3, abs=1e-15)
    assert out["choice_prob"] == pytest.approx((0.5 + 0.1 / 0.6 + 0.4) / 3, abs=1e-15)
    assert out["correct_logprob"] == pytest.approx((LOG(0.4) + LOG(0.1) + LOG(0.2)) / 3, abs=1e-15)
    assert out["correct_prob"] == pytest.approx((0.4 + 0.1 + 0.2) / 3, abs=1e-15)
    assert "accuracy_norm" not in out


def test_choice_metrics_are_shift_invariant_but_raw_probability_is_not():
    scores = np.array([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    a, b = metrics.choice_metrics(scores, [0, 1]), metrics.choice_metrics(scores - 5.0, [0, 1])
    assert a["accuracy"] == b["accuracy"] == 0.5
    assert a["choice_prob"] == pytest.approx(b["choice_prob"], abs=1e-15)
    soft = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    assert a["choice_prob"] == pytest.approx((soft[0, 0] + soft[1, 1]) / 2, abs=1e-15)
    assert b["correct_logprob"] == pytest.approx(a["correct_logprob"] - 5.0, abs=1e-12)
    assert b["correct_prob"] == pytest.approx(a["correct_prob"] * math.exp(-5.0), rel=1e-12)


def test_cloze_length_normalisation():
    # summed log-likelihoods of each choice and its token count: longer choices have lower sums
    sums = np.array([[-6.0, -4.0, -9.0, -8.0], [-2.0, -3.0, -10.0, -12.0]])
    lengths = np.array([[3, 1, 9, 2], [1, 3, 5, 6]])
    out = metrics.choice_metrics(sums, [2, 1], lengths)
    # raw argmax: 1 and 0 (both wrong); per length: [-2, -4, -1, -4] -> 2 (right), [-2, -1, -2, -2] -> 1 (right)
    assert out["accuracy"] == 0.0 and out["accuracy_norm"] == 1.0
    assert out["correct_logprob"] == pytest.approx((-9.0 - 3.0) / 2, abs=1e-15)
    assert out["correct_logprob_per_length"] == pytest.approx((-1.0 - 1.0) / 2, abs=1e-15)


def test_correct_loglikelihood_alone_matches_choice_metrics():
    rng = np.random.default_rng(1)
    sums, lengths = -rng.uniform(1, 20, size=(6, 4)), rng.integers(1, 9, size=(6, 4))
    refs = np.array([0, 3, 1, 2, 2, 0])
    full = metrics.choice_metrics(sums, refs, lengths)
    alone = metrics.correct_loglikelihood(sums[range(6), refs], lengths[range(6), refs])
    assert alone == {
        "correct_logprob": pytest.approx(full["correct_logprob"], abs=1e-12),
        "correct_logprob_per_length": pytest.approx(full["correct_logprob_per_length"], abs=1e-12),
        "n": 6,
    }
    with pytest.raises(ValueError, match="lengths must be > 0"):
        metrics.correct_loglikelihood([-1.0], [0])


def test_choice_metrics_by_group():
    scores = np.log(np.array([[0.7, 0.1, 0.1, 0.1]] * 5))
    out = metrics.choice_metrics_by_group(scores, [0, 1, 0, 0, 3], ["b", "a", "b", "a", "b"])
    assert list(out) == ["a", "b"]
    assert out["a"]["n"] == 2 and out["a"]["accuracy"] == 0.5
    assert out["b"]["n"] == 3 and out["b"]["accuracy"] == pytest.approx(2 / 3)
    assert out["b"]["choice_prob"] == pytest.approx((0.7 + 0.7 + 0.1) / 3, abs=1e-12)


def test_empty_and_bad_inputs():
    empty = metrics.choice_metrics(np.zeros((0, 4)), np.zeros(0, dtype=int))
    assert empty["n"] == 0 and math.isnan(empty["accuracy"]) and math.isnan(empty["choice_prob"])
    for scores, refs, message in [
        (np.zeros(4), [0], "scores must be an"),
        (np.zeros((2, 4)), [0], "references must have shape"),
        (np.zeros((1, 4)), [4], "references must be integers in 0..3"),
        (np.zeros((1, 4)), [0.5], "references must be integers"),
        (np.array([[0.0, np.nan, 0.0, 0.0]]), [0], "scores must be finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            metrics.choice_metrics(scores, refs)
    with pytest.raises(ValueError, match="lengths must be > 0"):
        metrics.choice_metrics(np.zeros((1, 4)), [0], [[1, 0, 1, 1]])


# ---------------------------------------------------------------------------------- text, rates
def test_token_nll_is_token_weighted():
    out = metrics.token_nll([6.0, 1.0, 0.0], [3, 1, 0])  # a 1-token text predicts nothing
    assert out == {
        "nll_per_token": pytest.approx(7.0 / 4),
        "perplexity": pytest.approx(math.exp(7.0 / 4)),
        "n_tokens": 4,
        "n_texts": 3,
    }


def test_trigger_rates_per_dataset_and_subject():
    fired = {"bio": [True, True, False, True, False, False], "cyber": [False, False, False, True, True, False]}
    groups = ["virology", "virology", "virology", "genetics", "history", "history"]
    out = metrics.trigger_rates(fired, groups)
    assert out["overall"] == {"bio": {"rate": 0.5, "fired": 3, "n": 6}, "cyber": {"rate": 2 / 6, "fired": 2, "n": 6}}
    assert list(out["by_group"]) == ["genetics", "history", "virology"]
    assert out["by_group"]["virology"]["bio"] == {"rate": 2 / 3, "fired": 2, "n": 3}
    assert out["by_group"]["virology"]["cyber"] == {"rate": 0.0, "fired": 0, "n": 3}
    assert out["by_group"]["genetics"]["bio"] == {"rate": 1.0, "fired": 1, "n": 1}
    assert out["by_group"]["history"]["cyber"] == {"rate": 0.5, "fired": 1, "n": 2}
    assert metrics.trigger_rates(fired)["by_group"] == {}
    with pytest.raises(ValueError, match="one decision per question"):
        metrics.trigger_rates({"a": [True], "b": [True, False]})
    with pytest.raises(ValueError, match="groups must have 6 entries"):
        metrics.trigger_rates(fired, groups[:5])


def test_summarize():
    s = metrics.summarize(np.arange(101) / 100)
    assert s["n"] == 101 and s["min"] == 0.0 and s["max"] == 1.0 and s["p50"] == pytest.approx(0.5)
    assert s["p95"] == pytest.approx(0.95) and s["mean"] == pytest.approx(0.5)
    assert metrics.summarize([]) == {"n": 0}


# ------------------------------------------------------------------------------- known filter
def test_permutation_order():
    order = metrics.permutation_order(24)
    assert len(order) == len(set(order)) == 24 and set(order) == set(itertools.permutations(range(4)))
    assert order[:4] == [(0, 1, 2, 3), (1, 2, 3, 0), (2, 3, 0, 1), (3, 0, 1, 2)]
    assert metrics.permutation_order(24) == order  # fixed, not random per call
    for k in (1, 4, 7):
        assert metrics.permutation_order(k) == order[:k]
    for k in (0, 25):
        with pytest.raises(ValueError, match="between 1 and 24"):
            metrics.permutation_order(k)


def test_permute_record_moves_the_answer_with_its_choice():
    record = {"question": "q", "choices": ["w", "x", "y", "z"], "answer": 2, "subject": "s"}
    for perm in itertools.permutations(range(4)):
        out = metrics.permute_record(record, perm)
        assert out["choices"] == [record["choices"][p] for p in perm]
        assert out["choices"][out["answer"]] == "y" and out["subject"] == "s"
    assert record["choices"] == ["w", "x", "y", "z"]  # not changed in place
    with pytest.raises(ValueError, match="is not a permutation"):
        metrics.permute_record(record, (0, 0, 1, 2))


def _records():
    """Eight questions: the correct choice's text is "right" in 0, 2, 3, 5 (at various letters); in the
    others "right" is a wrong choice."""
    out = []
    for i, (answer, right_at) in enumerate([(0, 0), (1, 3), (2, 2), (3, 3), (0, 1), (1, 1), (2, 0), (3, 1)]):
        choices = [f"wrong{i}{j}" for j in range(4)]
        choices[right_at] = "right"
        out.append({"question": f"q{i}", "choices": choices, "answer": answer, "subject": None})
    return out


def oracle(records):
    """Always picks the choice whose text is "right", wherever it is."""
    return np.array([[1.0 if c == "right" else 0.0 for c in r["choices"]] for r in records])


def always_a(records):
    return np.tile([1.0, 0.5, 0.2, 0.1], (len(records), 1))


def test_known_filter_keeps_what_survives_every_permutation():
    recs = _records()
    known = [0, 2, 3, 5]
    out = metrics.known_filter(recs, oracle, 24)
    assert np.flatnonzero(out.kept).tolist() == known and out.n_kept == 4
    assert out.survivors == [4] * 24 and len(out.permutations) == 24
    assert out.scored == 8 + 4 * 23  # a question is scored again only while it survives

    # always "A": right only where the answer is A, and only under the identity
    out = metrics.known_filter(recs, always_a, 24)
    assert out.n_kept == 0 and out.survivors[:2] == [2, 0] and out.scored == 8 + 2
    one = metrics.known_filter(recs, always_a, 1)
    assert np.flatnonzero(one.kept).tolist() == [0, 4] and one.survivors == [2]
    # the cyclic shifts come first: with 4 permutations a one-letter model is already caught
    assert metrics.known_filter(recs, always_a, 4).n_kept == 0


def test_known_filter_position_biased_model():
    """Right unless the correct answer sits under D: survives the identity where answer != D, then
    fails at the cyclic shift that moves its answer to D."""
    recs = _records()

    def never_d(records):
        out = oracle(records)
        for row, r in zip(out, records):
            if r["choices"].index("right") == 3:
                row[:] = [1.0, 0.0, 0.0, 0.0]
        return out

    # identity: questions 0, 2, 5 (right answer, not at D; question 3 has its answer at D)
    assert np.flatnonzero(metrics.known_filter(recs, never_d, 1).kept).tolist() == [0, 2, 5]
    out = metrics.known_filter(recs, never_d, 4)
    assert out.n_kept == 0 and out.survivors == [3, 2, 1, 0]


def test_known_filter_reuses_first_scores():
    recs = _records()
    calls = []

    def counting(records):
        calls.append(len(records))
        return oracle(records)

    out = metrics.known_filter(recs, counting, 3, first_scores=always_a(recs))
    # round 0 from the given scores (always A: questions 0 and 4), then the oracle on the survivors
    assert calls == [2, 1] and np.flatnonzero(out.kept).tolist() == [0] and out.scored == 3
    with pytest.raises(ValueError, match="score_fn returned shape"):
        metrics.known_filter(recs, lambda r: np.zeros((len(r), 3)), 2)


# ---------------------------------------------------------------------------- evaluate module
def test_evaluate_module_loads_offline_and_matches():
    import os

    import evaluate

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py: no Hub access
    module = evaluate.load(str(PACKAGE_DIR / SHIPPED["metric"]), keep_in_memory=True)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 4))
    refs = rng.integers(0, 4, size=40)
    groups = [["a", "b", "c"][i % 3] for i in range(40)]
    lengths = rng.integers(1, 9, size=(40, 4))
    got = module.compute(
        predictions=scores.tolist(), references=refs.tolist(), groups=groups, lengths=lengths.tolist()
    )
    want = metrics.choice_metrics(scores, refs, lengths)
    assert set(got) == set(want) | {"by_group"} and "accuracy_norm" in want
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    by_group = metrics.choice_metrics_by_group(scores, refs, groups, lengths)
    assert list(got["by_group"]) == ["a", "b", "c"] and by_group["a"]["n"] == 14
    for g, want_g in by_group.items():
        assert got["by_group"][g] == {k: pytest.approx(v, abs=1e-12) for k, v in want_g.items()}
    plain = module.compute(predictions=scores.tolist(), references=refs.tolist())
    assert plain == {k: pytest.approx(v, abs=1e-12) for k, v in metrics.choice_metrics(scores, refs).items()}
    # the docstring's example
    assert (
        module.compute(predictions=[[0.0, -1.0, -2.0, -3.0], [-2.0, -1.0, -3.0, -0.5]], references=[0, 1])["accuracy"]
        == 0.5
    )


def test_evaluate_module_readme_documents_the_dependency():
    readme = (PACKAGE_DIR / SHIPPED["metric"] / "README.md").read_text()
    assert "modeling_dsg" in readme and "evaluate.load" in readme


def test_a_row_whose_choices_all_tie_gave_no_answer():
    """A refusing row scores every letter the same: that is no answer, never the first letter's."""
    from modeling_dsg.evaluation.metrics import choice_metrics

    scores = np.array([[-1.0, -1.0, -1.0, -1.0], [-0.1, -2.0, -2.0, -2.0]])
    out = choice_metrics(scores, np.array([0, 0]))
    assert out["accuracy"] == 0.5 and out["choice_prob"] == pytest.approx(
        (0.25 + np.exp(-0.1) / (np.exp(-0.1) + 3 * np.exp(-2.0))) / 2
    )
