"""metrics.py's comparison statistics: the t quantile against an integral of Student's density, the sample std
and the paired interval against their definitions."""
import math

import pytest
import torch

import metrics


def t_cdf(q, df, steps=200_001):
    """P(T <= q) for Student's t, by the trapezoid rule on its density from 0 to q (the density is symmetric)."""
    x = torch.linspace(0, q, steps, dtype=torch.float64)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = torch.exp(log_norm - (df + 1) / 2 * torch.log1p(x ** 2 / df))
    return 0.5 + torch.trapezoid(density, x).item()


@pytest.mark.parametrize("df", [1, 2, 4, 9, 29, 30, 31, 60, 200])
def test_t_975_is_the_quantile_of_students_t(df):
    assert t_cdf(metrics.t_975(df), df) == pytest.approx(0.975, abs=2e-5)


def test_mean_std_uses_the_sample_std_and_says_none_for_one_value():
    n, mean, std = metrics.mean_std([2.0, 4.0, 9.0])
    assert (n, mean) == (3, 5.0) and std == pytest.approx(math.sqrt(((2 - 5) ** 2 + 1 + 16) / 2))
    assert metrics.mean_std([7.0]) == (1, 7.0, None)


def test_paired_difference_is_the_mean_difference_with_a_t_interval():
    a, b = [0.5, 0.6, 0.7, 0.4], [0.7, 0.6, 0.9, 0.8]
    diffs = [y - x for x, y in zip(a, b)]
    n, mean, (low, high) = metrics.paired_difference(a, b)
    sd = torch.tensor(diffs, dtype=torch.float64).std().item()  # torch's std is the sample std
    assert n == 4 and mean == pytest.approx(sum(diffs) / 4)
    assert (high - low) / 2 == pytest.approx(3.182 * sd / 2) and (high + low) / 2 == pytest.approx(mean)
    assert metrics.paired_difference([1.0], [3.0]) == (1, 2.0, None)
    with pytest.raises(ValueError, match="equally long"):
        metrics.paired_difference([1.0, 2.0], [1.0])
