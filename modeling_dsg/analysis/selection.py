"""Feature selection and threshold calibration, from the statistics of a forget and a retain corpus.

Notation, for SAE feature i and corpus D (F = forget, R = retain), over counted tokens t of D:

    mu_i^D = mean_t f_i(t)                  (mean activation)
    nu_i^D = mean_t 1[f_i(t) > 0]           (firing frequency)
    I_i^D  = (mu_i^D)^2                     (importance)
    R_i    = I_i^F / (I_i^R + 1e-21)        (forget/retain importance ratio)

Percentiles P_p(x) are `torch.quantile(x, p / 100)` with linear interpolation: for n sorted values
x_(0) <= ... <= x_(n-1), position h = (n - 1) p / 100 and
P_p = x_(floor h) + (h - floor h)(x_(floor h + 1) - x_(floor h)).

Dynamic selection (the paper): candidates are features with I^F >= P_5(I^F), R >= P_95(R) and I^F > 0;
the top N by I^F (N = 20). Static selection (Farrell et al., the seed baseline): drop features that fire
on >= 1% of retain tokens; the top N by forget firing frequency.

Learned token gate (optional): a token is flagged when the integer points of its active selected features reach
a threshold. The points come from a logistic regression over counted tokens, x_t = (1[f_i(t) > 0])_i, y_t = 1
on forget rows and 0 on retain rows, classes weighted to equal mass, an L1 penalty of 1e-3 per weight, fit in
float64 with L-BFGS from zeros (deterministic): w_i = round(10 beta_i) and the threshold m = ceil(10 (margin -
beta_0)), margin 1 (a token is flagged when its logit is about 1 or more: odds of 2.7 to 1 for the forget topic).

Feature gate (score "features"): features and weights from rows, a row longer than 256 positions cut into
pieces of 256 (a packed 1,024-token row is four samples, a prompt one). For sample r, x_r = (1[f_i(t) > 0 at some
counted token t of r])_i over the candidates (features active in at least 2 forget samples and in a larger share of
forget samples than of retain samples), y_r = 1 on forget rows and 0 on retain rows, classes weighted to equal mass. A
logistic regression on the standardized x (an L2 penalty of 1e-2 per squared weight; float64, L-BFGS from zeros)
ranks the candidates by their coefficient; the N with the largest positive ones are kept, a second fit on their
raw x (same loss) gives beta, and the integer weights are w_i = round(64 beta_i / max_j |beta_j|).

Calibration: tau = P_95 of rho over retain rows (the paper's rule); a row fires iff rho > tau (strictly).
Or, with a false-positive guarantee: the smallest tau such that the one-sided Clopper-Pearson upper
confidence bound on the retain firing rate (k of n retain rows with rho > tau) is at most a target FPR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DSGError
from .stats import ActivationStore

RATIO_EPS = 1e-21
TOKEN_GATE_SCALE = 10  # points per unit of logit
TOKEN_GATE_MARGIN = 1.0  # the logit a token needs to be flagged
TOKEN_GATE_L1 = 1e-3
FEATURE_GATE_L2 = 1e-2
FEATURE_GATE_SCALE = 64  # the largest integer weight
FEATURE_GATE_MIN_ROWS = 2  # forget samples a candidate must be active in
# positions per fit sample: a prompt-shaped row is one sample; a packed row of 1,024 tokens is four, since which
# features a whole 1,024-token row activates says little about any 32-token window of it
# (experiments/guard-v2/feature-gate/README.md, "Packed rows")
FEATURE_GATE_SEGMENT = 256


def _check_percentile(name: str, p: float) -> None:
    if not 0.0 <= p <= 100.0:
        raise DSGError(f"{name} must be between 0 and 100, got {p}")


def _percentile(x: Tensor, p: float) -> float:
    return float(torch.quantile(x.double(), p / 100.0, interpolation="linear"))


@dataclass
class FeatureStats:
    """Per-feature statistics of the forget and the retain corpus, each [d_sae] float64."""

    forget_mean: Tensor
    retain_mean: Tensor
    forget_freq: Tensor
    retain_freq: Tensor

    def __post_init__(self):
        for name in ("forget_mean", "retain_mean", "forget_freq", "retain_freq"):
            setattr(self, name, torch.as_tensor(getattr(self, name), dtype=torch.float64))
        shapes = {tuple(t.shape) for t in (self.forget_mean, self.retain_mean, self.forget_freq, self.retain_freq)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise DSGError(f"feature statistics must be four vectors of one length, got shapes {sorted(shapes)}")

    @classmethod
    def from_stores(cls, forget: ActivationStore, retain: ActivationStore) -> FeatureStats:
        if forget.d_sae != retain.d_sae:
            raise DSGError(
                f"forget and retain statistics come from different SAE widths ({forget.d_sae} vs {retain.d_sae})"
            )
        return cls(forget.mean(), retain.mean(), forget.freq(), retain.freq())

    @property
    def d_sae(self) -> int:
        return self.forget_mean.numel()

    @property
    def importance_forget(self) -> Tensor:
        """I_i^F = (mu_i^F)^2."""
        return self.forget_mean**2

    @property
    def importance_retain(self) -> Tensor:
        """I_i^R = (mu_i^R)^2."""
        return self.retain_mean**2

    @property
    def ratio(self) -> Tensor:
        """R_i = I_i^F / (I_i^R + 1e-21)."""
        return self.importance_forget / (self.importance_retain + RATIO_EPS)


def _top(score: Tensor, keep: Tensor, n: int) -> list[int]:
    """Indices of `keep`, ordered by `score` descending (ties: lower index first), at most n."""
    index = keep.nonzero().squeeze(1)
    order = torch.sort(score[index], descending=True, stable=True).indices
    return index[order][:n].tolist()


def select_dynamic(
    stats: FeatureStats,
    n_features: int = 20,
    ratio_percentile: float = 95.0,
    importance_percentile: float = 5.0,
) -> list[int]:
    """The paper's selection: candidates i with

        I_i^F >= P_{importance_percentile}(I^F),  R_i >= P_{ratio_percentile}(R),  I_i^F > 0,

    ranked by I_i^F descending (ties: lower index first); the first `n_features`. Percentiles are
    over all d_sae features. Fewer candidates than `n_features` gives all candidates; none is a
    DSGError. Defaults: N = 20, ratio percentile 95 (the paper uses 90 for cyber), importance 5.
    """
    if n_features < 1:
        raise DSGError(f"n_features must be at least 1, got {n_features}")
    _check_percentile("ratio_percentile", ratio_percentile)
    _check_percentile("importance_percentile", importance_percentile)
    importance, ratio = stats.importance_forget, stats.ratio
    keep = (
        (importance >= _percentile(importance, importance_percentile))
        & (ratio >= _percentile(ratio, ratio_percentile))
        & (importance > 0)
    )
    chosen = _top(importance, keep, n_features)
    if not chosen:
        raise DSGError(
            f"no SAE feature passes the selection filters (forget importance >= its {importance_percentile}th "
            f"percentile, forget/retain ratio >= its {ratio_percentile}th percentile, nonzero forget activation); "
            "the forget corpus may not activate any feature more than the retain corpus"
        )
    return chosen


def select_static(stats: FeatureStats, n_features: int = 20, retain_freq_threshold: float = 0.01) -> list[int]:
    """The seed baseline (Farrell et al.): keep features with retain firing frequency
    nu_i^R < retain_freq_threshold and forget firing frequency nu_i^F > 0; the first `n_features` by
    nu_i^F descending (ties: lower index first). None left is a DSGError."""
    if n_features < 1:
        raise DSGError(f"n_features must be at least 1, got {n_features}")
    if not 0.0 < retain_freq_threshold <= 1.0:
        raise DSGError(f"retain_freq_threshold must be in (0, 1], got {retain_freq_threshold}")
    keep = (stats.retain_freq < retain_freq_threshold) & (stats.forget_freq > 0)
    chosen = _top(stats.forget_freq, keep, n_features)
    if not chosen:
        raise DSGError(
            f"no SAE feature fires on the forget corpus while firing on fewer than {retain_freq_threshold:g} "
            "of retain tokens; raise retain_freq_threshold"
        )
    return chosen


def _scores(name: str, x) -> Tensor:
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise DSGError(f"{name} is empty")
    if torch.isnan(x).any():
        raise DSGError(f"{name} contains NaN")
    return x


def calibrate_threshold(retain_rho: Tensor, percentile: float = 95.0) -> float:
    """tau = P_percentile(rho over retain rows), linear interpolation (see the module docstring).
    With the default, at most about 5% of retain rows have rho > tau and fire."""
    _check_percentile("percentile", percentile)
    return _percentile(_scores("retain_rho", retain_rho), percentile)


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a binomial rate after k events in n trials: the p at which
    P(X <= k) = 1 - confidence (bisection on the binomial CDF, exact to 1e-12); 1.0 when k == n."""
    if not 0 <= k <= n or n < 1:
        raise DSGError(f"clopper_pearson_upper: need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if k == n:
        return 1.0
    alpha = 1.0 - confidence

    def cdf(p: float) -> float:  # P(X <= k), X ~ Binomial(n, p), summed in log space
        terms = [
            math.lgamma(n + 1)
            - math.lgamma(i + 1)
            - math.lgamma(n - i + 1)
            + i * math.log(p)
            + (n - i) * math.log1p(-p)
            for i in range(k + 1)
        ]
        top = max(terms)
        return math.exp(top) * sum(math.exp(t - top) for t in terms)

    low, high = 0.0, 1.0
    while high - low > 1e-12:
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) > alpha else (low, mid)
    return high


def calibrate_fpr(retain_rho: Tensor, target_fpr: float = 0.02, confidence: float = 0.95) -> tuple[float, dict]:
    """The smallest tau whose retain firing rate has a one-sided `confidence` Clopper-Pearson upper bound
    <= `target_fpr`. Returns (tau, {"target_fpr", "confidence", "n", "fired", "fpr", "fpr_upper"})."""
    if not 0.0 < target_fpr < 1.0 or not 0.0 < confidence < 1.0:
        raise DSGError(f"target FPR and confidence must be in (0, 1), got {target_fpr} and {confidence}")
    x = _scores("retain_rho", retain_rho).sort().values
    n = int(x.numel())
    allowed = -1  # the most retain rows that may fire
    while allowed + 1 <= n and clopper_pearson_upper(allowed + 1, n, confidence) <= target_fpr:
        allowed += 1
    if allowed < 0:
        needed = math.ceil(math.log(1.0 - confidence) / math.log(1.0 - target_fpr))  # rows that bound a 0 rate
        raise DSGError(
            f"{n} retain rows cannot show a firing rate <= {target_fpr:g} with {confidence:.0%} "
            f"confidence even if none fires; give at least {needed} retain rows"
        )
    tau = float(x[n - allowed - 1]) if allowed < n else float(x[0])
    if tau >= 1.0:  # rho is at most 1 and the guard fires on rho > tau: such a guardrail never fires
        top = int((x >= 1.0).sum())
        raise DSGError(
            f"no threshold below 1 keeps the retain firing rate's {confidence:.0%} bound <= {target_fpr:g}: {top} of "
            f"{n} retain rows already score rho = 1, so tau would be 1 and the guardrail would never fire; raise "
            "the target FPR, or use a longer window or the fraction score"
        )
    fired = int((x > tau).sum())
    info = {
        "target_fpr": target_fpr,
        "confidence": confidence,
        "n": n,
        "fired": fired,
        "fpr": fired / n,
        "fpr_upper": clopper_pearson_upper(fired, n, confidence),
    }
    return tau, info


def trigger_rate(rho: Tensor, tau: float) -> float:
    """Fraction of rows that fire: mean of 1[rho > tau] (strict, as the guard decides)."""
    return float((_scores("rho", rho) > tau).double().mean())


def rho_summary(rho: Tensor) -> dict:
    """mean, std (population, divides by n), min, p5, p25, p50, p75, p95, max and n of a non-empty rho, as plain
    numbers (the build record's summaries; `evaluation.metrics.summarize` is the report's, from numpy)."""
    x = _scores("rho", rho)
    out = {"mean": float(x.mean()), "std": float(x.std(correction=0)), "min": float(x.min())}
    for p in (5, 25, 50, 75, 95):
        out[f"p{p}"] = _percentile(x, p)
    out["max"] = float(x.max())
    out["n"] = int(x.numel())
    return out


def auroc(pos_scores: Tensor, neg_scores: Tensor) -> float:
    """Area under the ROC curve = P(s_pos > s_neg) + 1/2 P(s_pos == s_neg), over all pairs.

    Computed as the Mann-Whitney U statistic from average ranks: U = (sum of positive ranks)
    - n_pos (n_pos + 1) / 2, AUROC = U / (n_pos n_neg), where tied scores share their mean rank.
    """
    pos, neg = _scores("pos_scores", pos_scores), _scores("neg_scores", neg_scores)
    values, inverse, counts = torch.unique(torch.cat([pos, neg]), sorted=True, return_inverse=True, return_counts=True)
    below = counts.cumsum(0) - counts  # scores strictly below each distinct value
    mean_rank = below.double() + (counts.double() + 1) / 2  # 1-based average rank of each distinct value
    n_pos, n_neg = pos.numel(), neg.numel()
    u = mean_rank[inverse[:n_pos]].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def fit_token_gate(forget: ActivationStore, retain: ActivationStore, features: list[int]) -> tuple[list[int], int]:
    """Integer token weights (one per feature) and the token threshold, fit on the counted tokens of the forget
    and retain stores (see the module docstring). Raises if either store has no counted token."""
    if forget.n_tokens == 0 or retain.n_tokens == 0:
        raise DSGError("the learned token gate needs counted tokens in both the forget and the retain corpus")
    x = torch.cat([forget.feature_activity(features), retain.feature_activity(features)]).double()
    y = torch.cat(
        [torch.ones(forget.n_tokens, dtype=torch.float64), torch.zeros(retain.n_tokens, dtype=torch.float64)]
    )
    sample_weight = torch.where(y > 0, 0.5 / forget.n_tokens, 0.5 / retain.n_tokens)
    beta = torch.zeros(len(features), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([beta, bias], max_iter=300, tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        logits = x @ beta + bias
        losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        loss = (losses * sample_weight).sum() + TOKEN_GATE_L1 * beta.abs().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weights = torch.round(beta.detach() * TOKEN_GATE_SCALE).long().tolist()
    threshold = max(1, math.ceil(TOKEN_GATE_SCALE * (TOKEN_GATE_MARGIN - float(bias.detach()))))
    if sum(w for w in weights if w > 0) < threshold:
        raise DSGError(
            "the learned token gate would flag no token (its features do not tell forget tokens from retain "
            "tokens), so the guardrail could never fire; use --token-gate any, or more forget data"
        )
    return weights, threshold


def balanced_logistic(x: Tensor, y: Tensor, l2: float) -> Tensor:
    """The weights (no intercept) of an L2-penalised logistic regression of y on x, classes weighted to equal
    mass, fit in float64 with L-BFGS from zeros (deterministic)."""
    positives = int(y.sum())
    sample_weight = torch.where(y > 0, 0.5 / positives, 0.5 / (len(y) - positives))
    beta = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([beta, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        losses = torch.nn.functional.binary_cross_entropy_with_logits(x @ beta + bias, y, reduction="none")
        loss = (losses * sample_weight).sum() + l2 * (beta * beta).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return beta.detach()


def fit_feature_gate(forget: ActivationStore, retain: ActivationStore, n_features: int) -> tuple[list[int], list[int]]:
    """The features (sorted) and their integer weights for score "features", fit on the rows (pieces of at most
    `FEATURE_GATE_SEGMENT` positions) of the forget and retain stores (see the module docstring). Raises if no
    feature is more frequent in forget rows."""
    if forget.n_tokens == 0 or retain.n_tokens == 0:
        raise DSGError("the feature gate needs rows in both the forget and the retain corpus")
    in_forget = forget.row_activity(FEATURE_GATE_SEGMENT)  # [samples, d_sae] bool
    in_retain = retain.row_activity(FEATURE_GATE_SEGMENT)
    n_forget, n_retain = len(in_forget), len(in_retain)
    forget_samples = in_forget.sum(0)
    share_f, share_r = forget_samples / n_forget, in_retain.sum(0) / n_retain
    candidates = ((forget_samples >= FEATURE_GATE_MIN_ROWS) & (share_f > share_r)).nonzero().flatten()
    if len(candidates) == 0:
        raise DSGError(
            "no SAE feature is active in a larger share of forget rows than of retain rows, so the feature gate "
            "has nothing to weigh; use --score window, or more forget data"
        )
    x = torch.cat([in_forget[:, candidates], in_retain[:, candidates]]).double()
    y = torch.cat([torch.ones(n_forget, dtype=torch.float64), torch.zeros(n_retain, dtype=torch.float64)])
    mean, std = x.mean(0), x.std(0) + 1e-3
    ranked = balanced_logistic((x - mean) / std, y, FEATURE_GATE_L2)
    order = torch.argsort(ranked, descending=True, stable=True)[:n_features]
    order = order[ranked[order] > 0]
    if len(order) == 0:
        raise DSGError("no SAE feature raises the odds of the forget topic, so the feature gate could never fire")
    order = order.sort().values  # candidates are sorted, so the features come out sorted
    beta = balanced_logistic(x[:, order], y, FEATURE_GATE_L2)
    weights = torch.round(beta * FEATURE_GATE_SCALE / beta.abs().max()).long()
    if not bool((weights > 0).any()):
        raise DSGError("the feature gate's weights are all at most 0, so it could never fire")
    return candidates[order].tolist(), weights.tolist()
