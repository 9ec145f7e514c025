"""Confidence intervals against published values and hand computations."""

import math

import pytest

from alignkit.stats import (Z95, mean_interval, paired_difference, paired_difference_from_table,
                            paired_mean_difference, wilson)


def test_wilson_published_values():
    # 8/10: 0.4902 to 0.9433; 81/263: 0.2553 to 0.3662 (Newcombe 1998, Statistics in Medicine 17:857, method 3)
    i = wilson(8, 10)
    assert (i.n, i.rate) == (10, 0.8)
    assert i.ci_low == pytest.approx(0.4902, abs=1e-4) and i.ci_high == pytest.approx(0.9433, abs=1e-4)
    i = wilson(81, 263)
    assert i.ci_low == pytest.approx(0.2553, abs=1e-4) and i.ci_high == pytest.approx(0.3662, abs=1e-4)


def test_wilson_edges():
    zero, full = wilson(0, 10), wilson(10, 10)
    assert zero.ci_low == 0.0 and zero.ci_high == pytest.approx(Z95**2 / (10 + Z95**2))  # 0.2775
    assert full.ci_high == 1.0 and full.ci_low == pytest.approx(10 / (10 + Z95**2))
    assert all(math.isnan(v) for v in wilson(0, 0)[1:])
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_paired_difference_published_value():
    # Cavo et al. 2012 as in Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (ch. 8):
    # Newcombe square-and-add, estimate -0.0621, 95% CI -0.1186 to -0.0046
    i = paired_difference_from_table(59, 6, 16, 80)
    assert i.rate == pytest.approx(-10 / 161)
    assert i.ci_low == pytest.approx(-0.1186, abs=1e-4) and i.ci_high == pytest.approx(-0.0046, abs=1e-4)


def test_paired_difference_by_hand():
    # a=5 both right, b=3 only the model, c=1 only the baseline, d=1 neither; n=10: p1=0.8, p2=0.6.
    # ad - bc = 2 <= n/2 -> phi = 0, so the interval is the plain square-and-add of the Wilson limits:
    # 8/10: [0.49016, 0.94331]; 6/10: [0.31267, 0.83182]
    # low  = 0.2 - sqrt((0.8 - 0.49016)^2 + (0.83182 - 0.6)^2) = 0.2 - sqrt(0.149738) = -0.18696
    # high = 0.2 + sqrt((0.6 - 0.31267)^2 + (0.94332 - 0.8)^2) = 0.2 + sqrt(0.103096) = 0.52109
    model = [1] * 5 + [1] * 3 + [0] + [0]
    baseline = [1] * 5 + [0] * 3 + [1] + [0]
    i = paired_difference(model, baseline)
    assert i.n == 10 and i.rate == pytest.approx(0.2)
    assert i.ci_low == pytest.approx(-0.18696, abs=2e-5) and i.ci_high == pytest.approx(0.52109, abs=2e-5)
    # pairing matters: the same margins with strongly correlated outcomes give a narrower interval
    correlated = paired_difference_from_table(6, 2, 0, 2)
    assert correlated.rate == pytest.approx(0.2) and correlated.ci_high - correlated.ci_low < i.ci_high - i.ci_low


def test_paired_difference_identical_and_errors():
    i = paired_difference([1, 0, 1, 1], [1, 0, 1, 1])
    assert i.rate == 0.0 and i.ci_low < 0 < i.ci_high
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1])
    with pytest.raises(ValueError):
        paired_difference([0.5], [1])


def test_mean_interval_by_hand():
    # mean 2.5, sample sd sqrt(5/3) = 1.290994, half width 1.959964 * 1.290994 / 2 = 1.265151
    i = mean_interval([1, 2, 3, 4])
    assert i.rate == 2.5
    assert i.ci_low == pytest.approx(1.234849, abs=1e-5) and i.ci_high == pytest.approx(3.765151, abs=1e-5)
    assert mean_interval([1, float("nan"), 3]).n == 2  # NaN = not applicable, left out
    clipped = mean_interval([0.0, 1.0, 1.0], bounds=(0.0, 1.0))
    assert clipped.ci_high == 1.0
    d = paired_mean_difference([1.0, 2.0, 3.0], [0.0, 2.0, 1.0])
    assert d.rate == pytest.approx(1.0) and d.n == 3
    assert d.as_dict().keys() == {"n", "rate", "ci_low", "ci_high"}
