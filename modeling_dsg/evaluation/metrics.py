"""Pure metric functions for `dsg eval` (numpy only, no model, no torch).

Multiple-choice scores
    `scores` is an [n, c] array: one number per question and choice, larger meaning more likely. For
    letter scoring it is log P(" A" | prompt) ... log P(" D" | prompt) over the full vocabulary; for cloze
    scoring it is the summed log-likelihood of each choice's text. `references` [n] holds the index of
    the correct choice. `choice_metrics` returns

        accuracy                  mean_q [argmax_j s_qj == r_q]      (ties go to the lowest index, as numpy's
                                                                      argmax; a row whose choices all tie gave
                                                                      no answer: wrong)
        choice_prob               mean_q softmax_j(s_q)[r_q]         the probability of the correct choice,
                                                                     renormalised over the c choices
        correct_logprob           mean_q s_q,r_q                     the raw score of the correct choice
                                                                     (a log-probability when s is one)
        correct_prob              mean_q exp(s_q,r_q)                the raw probability of the correct choice
                                                                     (meaningful only when s are log-probabilities)
        n                         the number of questions

    and, when `lengths` [n, c] (e.g. each choice's token count) is given,

        accuracy_norm             mean_q [argmax_j s_qj / len_qj == r_q]   (lm-eval-harness' acc_norm idea)
        correct_logprob_per_length  mean_q s_q,r_q / len_q,r_q            (per-token log-likelihood)

    With `groups` [n] (e.g. MMLU subjects) the same metrics are also returned per group (`by_group`):
    `compute_choice_metrics`, the one function behind both scorers' `compute`.
    `correct_loglikelihood(sums, lengths)` gives the two cloze numbers from the correct choice's scores alone.

Text
    `token_nll(nll_sums, token_counts)`: the token-weighted mean negative log-likelihood
    sum(nll) / sum(tokens) (nats per token) and its perplexity exp(.).

Guardrail trigger rates
    `trigger_rates(fired, groups)`: for each guardrail, rate = fired / n over the questions, overall and per
    group.

The "known questions" filter (the DSG paper's protocol)
    A question is *known* if the base model answers it correctly under every permutation of its choices.
    `permutation_order(k)` fixes which k of the 24 permutations are used (see there), `permute_record`
    applies one, and `known_filter` runs the rounds, dropping a question at its first wrong answer (so a
    model near chance costs about 1.3 forwards per question instead of k).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

N_CHOICES = 4
ALL_PERMUTATIONS = math.factorial(N_CHOICES)  # 24
PERMUTATION_SEED = 0


# --------------------------------------------------------------------------------- multiple choice
def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log softmax along `axis`, computed stably in float64."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def _picked(s, r):
    """1.0 where the highest score is the reference's (lowest index on ties), 0.0 where it is not or where
    every choice ties (no answer, e.g. a row a guardrail refused)."""
    answered = ~(s == s[:, :1]).all(axis=1)
    return ((np.argmax(s, axis=1) == r) & answered).astype(np.float64)


def _as_scores(scores, references, lengths=None):
    s = np.asarray(scores, dtype=np.float64)
    r = np.asarray(references)
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"scores must be an [n, c] array with c >= 2 choices, got shape {s.shape}")
    if r.shape != (s.shape[0],):
        raise ValueError(f"references must have shape ({s.shape[0]},), got {r.shape}")
    if r.size and (not np.issubdtype(r.dtype, np.integer) or r.min() < 0 or r.max() >= s.shape[1]):
        raise ValueError(f"references must be integers in 0..{s.shape[1] - 1}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    ln = None
    if lengths is not None:
        ln = np.asarray(lengths, dtype=np.float64)
        if ln.shape != s.shape:
            raise ValueError(f"lengths must have the shape of scores {s.shape}, got {ln.shape}")
        if ln.size and ln.min() <= 0:
            raise ValueError("lengths must be > 0")
    return s, r.astype(np.int64), ln


def _nan_mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else float("nan")


def choice_metrics(scores, references, lengths=None) -> dict:
    """accuracy, choice_prob, correct_logprob, correct_prob, n (+ accuracy_norm and
    correct_logprob_per_length with `lengths`) of [n, c] choice scores; see the module docstring."""
    s, r, ln = _as_scores(scores, references, lengths)
    rows = np.arange(len(r))
    correct = s[rows, r]
    out = {
        "accuracy": _nan_mean(_picked(s, r)),
        "choice_prob": _nan_mean(np.exp(log_softmax(s)[rows, r])),
        "correct_logprob": _nan_mean(correct),
        "correct_prob": _nan_mean(np.exp(correct)),
        "n": int(len(r)),
    }
    if ln is not None:
        out["accuracy_norm"] = _nan_mean(_picked(s / ln, r))
        out["correct_logprob_per_length"] = _nan_mean(correct / ln[rows, r])
    return out


def choice_metrics_by_group(scores, references, groups: Sequence, lengths=None) -> dict:
    """`choice_metrics` per distinct group (in sorted order of the group names)."""
    s, r, ln = _as_scores(scores, references, lengths)
    g = np.asarray([str(x) for x in groups], dtype=object)
    if g.shape != r.shape:
        raise ValueError(f"groups must have {len(r)} entries, got {len(g)}")
    return {
        name: choice_metrics(s[g == name], r[g == name], None if ln is None else ln[g == name])
        for name in sorted(set(g.tolist()))
    }


def compute_choice_metrics(predictions, references, groups=None, lengths=None) -> dict:
    """What the scorer returns, one wrapper for both scorers (the `evaluate` module `dsg_unlearning` and
    `scoring.DirectScorer`): `choice_metrics`, plus `by_group` (`choice_metrics_by_group`) with `groups`."""
    out = choice_metrics(predictions, references, lengths)
    if groups is not None:
        out["by_group"] = choice_metrics_by_group(predictions, references, groups, lengths)
    return out


def correct_loglikelihood(sums, lengths) -> dict:
    """The correct choice's summed log-likelihood alone (cloze scoring of the correct choice only):
    {"correct_logprob": mean(sums), "correct_logprob_per_length": mean(sums / lengths), "n"}, the same
    numbers `choice_metrics` gives from every choice's scores."""
    s = np.asarray(sums, dtype=np.float64)
    ln = np.asarray(lengths, dtype=np.float64)
    if s.ndim != 1 or ln.shape != s.shape:
        raise ValueError("sums and lengths must be 1-d arrays of the same length")
    if ln.size and ln.min() <= 0:
        raise ValueError("lengths must be > 0")
    return {"correct_logprob": _nan_mean(s), "correct_logprob_per_length": _nan_mean(s / ln), "n": int(s.size)}


# ----------------------------------------------------------------------------------------- text
def token_nll(nll_sums, token_counts) -> dict:
    """Token-weighted NLL: {"nll_per_token": sum(nll)/sum(tokens), "perplexity", "n_tokens", "n_texts"}."""
    sums = np.asarray(nll_sums, dtype=np.float64)
    counts = np.asarray(token_counts, dtype=np.int64)
    if sums.shape != counts.shape or sums.ndim != 1:
        raise ValueError("nll_sums and token_counts must be 1-d arrays of the same length")
    total = int(counts.sum())
    mean = float(sums.sum() / total) if total else float("nan")
    with np.errstate(over="ignore"):  # an NLL past ~709 nats (a refusing row: ~3.4e38) has perplexity inf
        perplexity = float(np.exp(mean)) if total else float("nan")
    return {"nll_per_token": mean, "perplexity": perplexity, "n_tokens": total, "n_texts": int(len(counts))}


# ------------------------------------------------------------------------------- trigger rates
def _rate(fired: np.ndarray) -> dict:
    n = int(fired.size)
    k = int(fired.sum())
    return {"rate": k / n if n else float("nan"), "fired": k, "n": n}


def trigger_rates(fired: Mapping[str, Sequence[bool]], groups: Sequence | None = None) -> dict:
    """{"overall": {guardrail: {rate, fired, n}}, "by_group": {group: {guardrail: {rate, fired, n}}}}.

    `fired` maps each guardrail's name to its per-question decisions; `by_group` is empty without groups.
    """
    arrays = {name: np.asarray(f, dtype=bool) for name, f in fired.items()}
    sizes = {a.shape for a in arrays.values()}
    if len(sizes) > 1 or any(len(s) != 1 for s in sizes):
        raise ValueError("every guardrail needs one decision per question")
    out = {"overall": {name: _rate(a) for name, a in arrays.items()}, "by_group": {}}
    if groups is not None:
        g = np.asarray([str(x) for x in groups], dtype=object)
        n = next(iter(sizes))[0] if sizes else len(g)
        if len(g) != n:
            raise ValueError(f"groups must have {n} entries, got {len(g)}")
        for name in sorted(set(g.tolist())):
            out["by_group"][name] = {guard: _rate(a[g == name]) for guard, a in arrays.items()}
    return out


# ------------------------------------------------------------------------- the known filter
def permutation_order(k: int = ALL_PERMUTATIONS) -> list[tuple[int, ...]]:
    """The first k permutations of the choices, in a fixed order.

    Order: the identity, then the three other cyclic shifts (together these put the correct answer under
    every letter once, so a model that always picks one letter is caught by k = 4), then the remaining 20
    permutations shuffled with `random.Random(PERMUTATION_SEED)`. A permutation p shows choice p[i] under
    letter i. The order is the same on every machine and every run.
    """
    if not 1 <= int(k) <= ALL_PERMUTATIONS:
        raise ValueError(f"the number of permutations must be between 1 and {ALL_PERMUTATIONS}, got {k}")
    n = N_CHOICES
    cyclic = [tuple((i + s) % n for i in range(n)) for s in range(n)]
    rest = [p for p in itertools.permutations(range(n)) if p not in cyclic]
    random.Random(PERMUTATION_SEED).shuffle(rest)
    return (cyclic + rest)[: int(k)]


def permute_record(record: dict, perm: Sequence[int]) -> dict:
    """A copy of an MCQ record whose choice p[i] is shown under letter i; `answer` follows its choice."""
    choices = list(record["choices"])
    if sorted(perm) != list(range(len(choices))):
        raise ValueError(f"{perm} is not a permutation of {len(choices)} choices")
    return {**record, "choices": [choices[p] for p in perm], "answer": list(perm).index(int(record["answer"]))}


@dataclass
class KnownFilter:
    """The outcome of `known_filter`: which questions are known, and how many survived each round."""

    kept: np.ndarray  # [n] bool
    permutations: list  # the permutations used, in order
    survivors: list = field(default_factory=list)  # after round i (permutation i), how many remain
    scored: int = 0  # how many (question, permutation) prompts were scored

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())


def known_filter(
    records: Sequence[dict],
    score_fn: Callable[[list], np.ndarray],
    permutations: int = ALL_PERMUTATIONS,
    first_scores=None,
) -> KnownFilter:
    """The questions a model answers correctly under all of the first `permutations` permutations.

    `score_fn(records)` returns [m, 4] letter scores for a list of (permuted) MCQ records; a question is
    answered correctly when the argmax is its (permuted) answer. Round i scores permutation i of the
    questions still standing only. `first_scores` [n, 4], if given, are the scores of the identity
    permutation (round 0), already computed elsewhere; they are reused instead of scored again.
    """
    order = permutation_order(permutations)
    n = len(records)
    alive = np.arange(n)
    survivors, scored = [], 0
    for i, perm in enumerate(order):
        if not len(alive):
            survivors.append(0)
            continue
        permuted = [permute_record(records[q], perm) for q in alive]
        if i == 0 and first_scores is not None:
            scores = np.asarray(first_scores, dtype=np.float64)[alive]
        else:
            scores = np.asarray(score_fn(permuted), dtype=np.float64)
            scored += len(permuted)
        if scores.shape != (len(permuted), N_CHOICES):
            raise ValueError(f"score_fn returned shape {scores.shape}, expected ({len(permuted)}, {N_CHOICES})")
        answers = np.array([r["answer"] for r in permuted])
        alive = alive[np.argmax(scores, axis=1) == answers]
        survivors.append(int(len(alive)))
    kept = np.zeros(n, dtype=bool)
    kept[alive] = True
    return KnownFilter(kept=kept, permutations=[list(p) for p in order], survivors=survivors, scored=scored)


# ------------------------------------------------------------------------------------ summaries
def summarize(values) -> dict:
    """{mean, std, min, p5, p25, p50, p75, p95, max, n} of a 1-d array (the cards' SUMMARY)."""
    v = np.asarray(values, dtype=np.float64)
    if not v.size:
        return {"n": 0}
    q = np.percentile(v, [5, 25, 50, 75, 95])
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "p5": float(q[0]),
        "p25": float(q[1]),
        "p50": float(q[2]),
        "p75": float(q[3]),
        "p95": float(q[4]),
        "max": float(v.max()),
        "n": int(v.size),
    }


def mcq_numbers(scores: dict, answers) -> dict:
    """Per-set means from `scoring.score_mcq`-shaped scores: accuracy and choice_prob (letter scores),
    cloze_prob = mean exp(L_answer / tokens) and cloze_ll_per_token (cloze scores), whichever are present."""
    out = {}
    if "letter" in scores:
        letter = choice_metrics(scores["letter"], answers)
        out.update(accuracy=float(letter["accuracy"]), choice_prob=float(letter["choice_prob"]))
    if "cloze_correct" in scores:
        per_token = scores["cloze_correct"] / np.maximum(scores["cloze_correct_tokens"], 1)
        out.update(cloze_prob=float(np.mean(np.exp(per_token))), cloze_ll_per_token=float(np.mean(per_token)))
    return out
