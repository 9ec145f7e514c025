"""95% confidence intervals for what ``alignkit eval`` reports.

* ``wilson(successes, n)`` -- the Wilson score interval of a proportion (no continuity correction):
  ``(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``. Right at 0 and n, unlike the
  normal ("Wald") interval.
* ``paired_difference(model, baseline)`` -- the difference of two proportions measured on the *same*
  items (model and baseline answering the same prompts): Newcombe's method 10 (Newcombe 1998,
  Statistics in Medicine 17:2635-2650; the worked form in Altman et al., *Statistics with
  Confidence*, 2000, p. 52): the two Wilson intervals combined with the phi correlation of the
  paired 2x2 table, ``phi = C / sqrt((a+b)(c+d)(a+c)(b+d))`` where ``C = ad - bc - n/2`` if
  ``ad - bc > n/2``, ``ad - bc`` if it is negative, else 0 (a = both right, b = only the model,
  c = only the baseline, d = neither).
* ``mean_interval(values)`` -- a mean (a reward, a win rate with ties counted 1/2) with the normal
  interval ``mean +- z s / sqrt(n)`` (``s`` the sample standard deviation), clipped to ``bounds``
  when given. ``paired_mean_difference`` is the same on per-item differences.

Every function returns ``Interval(n, rate, ci_low, ci_high)`` (``as_dict`` gives those four keys for
``eval.json``). ``n == 0`` gives NaN everywhere. Left out: exact (Clopper-Pearson) intervals, other
confidence levels than through ``z``, bootstrap, multiple-comparison corrections.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


class Interval(NamedTuple):
    n: int
    rate: float  # the proportion, mean or difference
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "rate": self.rate, "ci_low": self.ci_low, "ci_high": self.ci_high}

    def __str__(self) -> str:
        return f"{self.rate:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] (n={self.n})"


_NAN = float("nan")


def wilson(successes: float, n: int, z: float = Z95) -> Interval:
    """The Wilson score interval of ``successes`` out of ``n``."""
    if n <= 0:
        return Interval(0, _NAN, _NAN, _NAN)
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the edges (no rounding below 1.0)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(n, p, low, high)


def _as_bools(values: Sequence[float | bool]) -> list[bool]:
    out = []
    for v in values:
        if v not in (0, 1, True, False):
            raise ValueError(f"a paired proportion needs 0/1 outcomes, got {v!r}")
        out.append(bool(v))
    return out


def paired_difference(model: Sequence[float | bool], baseline: Sequence[float | bool], z: float = Z95) -> Interval:
    """Newcombe's paired interval (method 10) for ``mean(model) - mean(baseline)`` over the same items."""
    if len(model) != len(baseline):
        raise ValueError(f"paired outcomes of different lengths: {len(model)} and {len(baseline)}")
    m, b = _as_bools(model), _as_bools(baseline)
    n = len(m)
    if n == 0:
        return Interval(0, _NAN, _NAN, _NAN)
    both = sum(x and y for x, y in zip(m, b))
    only_model = sum(x and not y for x, y in zip(m, b))
    only_base = sum(y and not x for x, y in zip(m, b))
    neither = n - both - only_model - only_base
    return paired_difference_from_table(both, only_model, only_base, neither, z)


def paired_difference_from_table(a: int, b: int, c: int, d: int, z: float = Z95) -> Interval:
    """Method 10 from the paired 2x2 table: a both, b first only, c second only, d neither."""
    n = a + b + c + d
    if n == 0:
        return Interval(0, _NAN, _NAN, _NAN)
    p1, p2 = (a + b) / n, (a + c) / n
    _, _, l1, u1 = wilson(a + b, n, z)
    _, _, l2, u2 = wilson(a + c, n, z)
    product = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0
    if product > 0:
        cross = a * d - b * c
        corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
        phi = corrected / math.sqrt(product)
    diff = p1 - p2
    low = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = diff + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return Interval(n, diff, max(-1.0, low), min(1.0, high))


def mean_interval(values: Sequence[float], z: float = Z95, bounds: tuple[float, float] | None = None) -> Interval:
    """A mean with the normal interval ``mean +- z * s / sqrt(n)``; NaN values are left out (not applicable)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(0, _NAN, _NAN, _NAN)
    mean = sum(xs) / n
    if n == 1:
        return Interval(1, mean, _NAN, _NAN)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    low, high = mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n)
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return Interval(n, mean, low, high)


def paired_mean_difference(model: Sequence[float], baseline: Sequence[float], z: float = Z95) -> Interval:
    """``mean(model - baseline)`` over the same items, with the normal interval of the per-item differences."""
    if len(model) != len(baseline):
        raise ValueError(f"paired values of different lengths: {len(model)} and {len(baseline)}")
    return mean_interval([a - b for a, b in zip(model, baseline)], z)
