import json
import math

import pytest
import torch

from modeling_dsg.analysis.selection import (
    FeatureStats,
    auroc,
    calibrate_threshold,
    select_dynamic,
    select_static,
    trigger_rate,
)
from modeling_dsg.analysis.selection import (
    rho_summary as summarize,
)
from modeling_dsg.analysis.stats import ActivationStore
from modeling_dsg.errors import DSGError


def stats(forget_mean, retain_mean, forget_freq=None, retain_freq=None) -> FeatureStats:
    zeros = [0.0] * len(forget_mean)
    vectors = (forget_mean, retain_mean, forget_freq or zeros, retain_freq or zeros)
    return FeatureStats(*(torch.tensor(v, dtype=torch.float64) for v in vectors))


# --- dynamic selection ------------------------------------------------------------------------------


def test_dynamic_default_percentiles_pick_the_two_top_ratio_features():
    # I_F = [1, 4, 4, 9, 0.25, 16], I_R = [1, 4, 1, 9, 0.25, 4], so R = [1, 1, 4, 1, 1, 4].
    # P95(R): sorted [1, 1, 1, 1, 4, 4], position 0.95 * 5 = 4.75 -> 4 + 0.75 * (4 - 4) = 4: R >= 4 is {2, 5}.
    # P5(I_F): sorted [0.25, 1, 4, 4, 9, 16], position 0.25 -> 0.4375: both pass. Ranked by I_F: 5 (16), 2 (4).
    s = stats([1.0, 2.0, 2.0, 3.0, 0.5, 4.0], [1.0, 2.0, 1.0, 3.0, 0.5, 2.0])
    assert s.ratio.tolist() == [1.0, 1.0, 4.0, 1.0, 1.0, 4.0]
    assert select_dynamic(s) == [5, 2]
    assert select_dynamic(s, n_features=1) == [5]


def test_dynamic_importance_percentile_excludes_a_weak_feature():
    # Feature 0 never fires on retain (R = 0.01 / 1e-21 = 1e19, the top ratio) but has the lowest I_F.
    # I_F = [0.01, 4, 4, 9, 1, 16]; R = [1e19, 1, 4, 1, 1, 4].
    # P50(R): sorted [1, 1, 1, 4, 4, 1e19], position 2.5 -> 1 + 0.5 * 3 = 2.5: R >= 2.5 is {0, 2, 5}.
    # P5(I_F): sorted [0.01, 1, 4, 4, 9, 16], position 0.25 -> 0.01 + 0.25 * 0.99 = 0.2575: feature 0 fails.
    s = stats([0.1, 2.0, 2.0, 3.0, 1.0, 4.0], [0.0, 2.0, 1.0, 3.0, 1.0, 2.0])
    assert s.ratio[0].item() == pytest.approx(1e19)
    assert select_dynamic(s, ratio_percentile=50) == [5, 2]
    # P0(I_F) = min(I_F) = 0.01 lets it in, ranked last.
    assert select_dynamic(s, ratio_percentile=50, importance_percentile=0) == [5, 2, 0]


def test_dynamic_ties_go_to_the_lower_index():
    s = stats([1.0, 3.0, 1.0, 1.0, 3.0, 1.0], [1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    assert select_dynamic(s) == [1, 4]
    assert select_dynamic(s, n_features=1) == [1]


def test_dynamic_excludes_silent_features_and_errors_when_none_is_left():
    # R = [0, 0, 0, 0, 0, 4]: P95 = 0 + 0.75 * 4 = 3, only feature 5.
    assert select_dynamic(stats([0.0] * 5 + [2.0], [0.0] * 5 + [1.0])) == [5]
    # Nothing fires on forget: every filter passes trivially at 0, but I_F > 0 fails for all.
    with pytest.raises(DSGError, match="no SAE feature passes the selection filters"):
        select_dynamic(stats([0.0] * 6, [1.0] * 6))
    with pytest.raises(DSGError, match="n_features"):
        select_dynamic(stats([1.0], [1.0]), n_features=0)
    with pytest.raises(DSGError, match="ratio_percentile"):
        select_dynamic(stats([1.0], [1.0]), ratio_percentile=101)


# --- static selection -------------------------------------------------------------------------------


def test_static_drops_features_common_on_retain():
    forget_freq = [0.5, 0.3, 0.0, 0.2, 0.4, 0.3]
    retain_freq = [0.02, 0.0, 0.0, 0.005, 0.01, 0.009]
    # 0: fires on 2% of retain (dropped); 2: never on forget; 4: exactly at the 1% threshold (dropped).
    # Left: 1 (0.3), 5 (0.3, tie -> after 1), 3 (0.2).
    s = stats([0.0] * 6, [0.0] * 6, forget_freq, retain_freq)
    assert select_static(s) == [1, 5, 3]
    assert select_static(s, n_features=2) == [1, 5]
    assert select_static(s, retain_freq_threshold=0.015) == [4, 1, 5, 3]
    with pytest.raises(DSGError, match="no SAE feature fires on the forget corpus"):
        select_static(stats([0.0] * 3, [0.0] * 3, [0.1, 0.2, 0.0], [0.5, 0.01, 0.0]))
    with pytest.raises(DSGError, match="retain_freq_threshold"):
        select_static(s, retain_freq_threshold=0.0)


# --- statistics from activation stores ---------------------------------------------------------------


def store_from_dense(acts: torch.Tensor, token_row: list[int]) -> ActivationStore:
    """An ActivationStore over counted tokens with dense activations acts [n_tokens, d_sae]."""
    tok, feat = (acts > 0).nonzero(as_tuple=True)
    per_token = torch.bincount(tok, minlength=acts.shape[0])
    n_rows = max(token_row) + 1
    return ActivationStore(
        d_sae=acts.shape[1],
        n_rows=n_rows,
        n_tokens=acts.shape[0],
        feature_sums=acts.double().sum(0),
        feature_counts=(acts > 0).sum(0),
        row_token_counts=torch.bincount(torch.tensor(token_row), minlength=n_rows),
        token_row=torch.tensor(token_row, dtype=torch.int32),
        token_pos=torch.arange(acts.shape[0], dtype=torch.int32),
        token_id=torch.zeros(acts.shape[0], dtype=torch.int32),
        indptr=torch.cat([torch.zeros(1, dtype=torch.long), per_token.cumsum(0)]),
        feature_index=feat.to(torch.int32),
        values=acts[tok, feat],
    )


def test_feature_stats_from_stores():
    forget = store_from_dense(torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]]), [0, 0])
    retain = store_from_dense(
        torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]), [0, 0, 1, 1]
    )
    s = FeatureStats.from_stores(forget, retain)
    assert s.forget_mean.tolist() == [2.0, 0.0, 1.0]
    assert s.retain_mean.tolist() == [0.25, 0.75, 0.0]
    assert s.forget_freq.tolist() == [1.0, 0.0, 0.5]
    assert s.retain_freq.tolist() == [0.25, 0.5, 0.0]
    assert s.importance_forget.tolist() == [4.0, 0.0, 1.0]
    assert s.ratio.tolist() == [4.0 / 0.0625, 0.0, 1.0 / 1e-21]
    assert retain.row_scores([1]).tolist() == [0.5, 0.5]
    wider = store_from_dense(torch.ones(1, 4), [0])
    with pytest.raises(DSGError, match="different SAE widths"):
        FeatureStats.from_stores(forget, wider)


# --- calibration and metrics -------------------------------------------------------------------------


def test_calibrate_threshold_on_known_rho():
    rho = torch.arange(21, dtype=torch.float64) / 20  # 0, 0.05, ..., 1
    # position 0.95 * 20 = 19 -> rho_(19) = 0.95; order of the rows does not matter.
    assert calibrate_threshold(rho) == pytest.approx(0.95, abs=1e-12)
    assert calibrate_threshold(rho[torch.randperm(21)]) == pytest.approx(0.95, abs=1e-12)
    assert calibrate_threshold(rho, percentile=50) == pytest.approx(0.5, abs=1e-12)
    # Interpolation: position 0.9 * 4 = 3.6 -> 0.3 + 0.6 * (0.4 - 0.3) = 0.36.
    assert calibrate_threshold(torch.tensor([0.4, 0.0, 0.2, 0.1, 0.3]), percentile=90) == pytest.approx(0.36)
    assert calibrate_threshold(torch.zeros(7)) == 0.0
    with pytest.raises(DSGError, match="retain_rho is empty"):
        calibrate_threshold(torch.tensor([]))
    with pytest.raises(DSGError, match="percentile"):
        calibrate_threshold(rho, percentile=-1)


def test_trigger_rate_is_strict():
    rho = torch.arange(21, dtype=torch.float64) / 20
    assert trigger_rate(rho, calibrate_threshold(rho)) == pytest.approx(1 / 21)
    assert trigger_rate(torch.tensor([0.5, 0.5, 0.6]), 0.5) == pytest.approx(1 / 3)
    assert trigger_rate(torch.zeros(4), 0.0) == 0.0  # tau = 0 and rho = 0: nothing fires
    assert trigger_rate(torch.tensor([0.1, 0.2]), -1.0) == 1.0


def test_summarize():
    out = summarize(torch.tensor([3.0, 0.0, 4.0, 1.0, 2.0]))
    assert out == pytest.approx(
        {
            "mean": 2.0,
            "std": math.sqrt(2.0),
            "min": 0.0,
            "p5": 0.2,
            "p25": 1.0,
            "p50": 2.0,
            "p75": 3.0,
            "p95": 3.8,
            "max": 4.0,
            "n": 5,
        }
    )
    assert isinstance(out["n"], int)
    json.dumps(out)
    assert summarize(torch.tensor([0.25]))["std"] == 0.0


def pairwise_auroc(pos, neg) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_known_cases():
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert auroc(torch.full((3,), 0.5), torch.full((4,), 0.5)) == 0.5
    assert auroc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == 0.5
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([2.0, 1.0])) == 3.5 / 4
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randint(0, 6, (13,), generator=g), torch.randint(0, 6, (9,), generator=g)
    assert auroc(pos, neg) == pytest.approx(pairwise_auroc(pos.tolist(), neg.tolist()))
    with pytest.raises(DSGError, match="neg_scores is empty"):
        auroc(torch.tensor([1.0]), torch.tensor([]))
    with pytest.raises(DSGError, match="NaN"):
        auroc(torch.tensor([float("nan")]), torch.tensor([1.0]))
