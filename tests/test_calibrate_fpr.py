"""The false-positive guarantee: tau is the smallest threshold whose retain firing rate has a one-sided 95%
Clopper-Pearson upper bound at most the target FPR."""

import pytest
import torch

from modeling_dsg.analysis.selection import calibrate_fpr, clopper_pearson_upper
from modeling_dsg.errors import DSGError


@pytest.mark.parametrize(
    "k,n,expected",
    [
        (0, 100, 1 - 0.05 ** (1 / 100)),  # closed form when no event: 1 - alpha^(1/n)
        (0, 1000, 1 - 0.05 ** (1 / 1000)),
        (5, 5, 1.0),
    ],
)
def test_clopper_pearson_closed_forms(k, n, expected):
    assert clopper_pearson_upper(k, n) == pytest.approx(expected, abs=1e-9)


def test_clopper_pearson_matches_scipy():
    from scipy.stats import beta

    for k, n in [(1, 50), (3, 400), (12, 400), (40, 1000)]:
        assert clopper_pearson_upper(k, n) == pytest.approx(beta.ppf(0.95, k + 1, n - k), abs=1e-9)


def test_calibrated_tau_is_the_smallest_meeting_the_bound():
    rho = torch.linspace(0, 1, 1000, dtype=torch.float64)
    tau, info = calibrate_fpr(rho, target_fpr=0.02)
    fired = int((rho > tau).sum())
    assert info["fired"] == fired and info["fpr_upper"] <= 0.02 and info["n"] == 1000
    assert clopper_pearson_upper(fired + 1, 1000) > 0.02  # one more firing row would break the bound
    lower = float(rho[rho < tau].max())  # the next smaller threshold fires one more row
    assert clopper_pearson_upper(int((rho > lower).sum()), 1000) > 0.02


def test_too_few_retain_rows_are_refused():
    with pytest.raises(DSGError, match="give at least 149 retain rows"):
        calibrate_fpr(torch.rand(100, dtype=torch.float64), target_fpr=0.02)


def test_a_bound_only_rho_1_meets_is_refused():
    """Window scores take few values: when more retain rows score rho = 1 than the bound allows, tau would be 1 and
    the guard (rho > tau) would never fire; that is refused. One row fewer at 1 and tau is below 1."""
    rho = torch.cat([torch.zeros(900, dtype=torch.float64), torch.ones(100, dtype=torch.float64)])
    with pytest.raises(DSGError, match="100 of 1000 retain rows already score rho = 1, so tau would be 1"):
        calibrate_fpr(rho, target_fpr=0.02)
    rho = torch.cat([torch.zeros(990, dtype=torch.float64), torch.full((5,), 0.5), torch.ones(5, dtype=torch.float64)])
    tau, info = calibrate_fpr(rho, target_fpr=0.02)
    assert tau < 1.0 and info["fpr_upper"] <= 0.02
