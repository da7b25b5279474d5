"""The statistics of a comparison: McNemar's exact test, the paired difference over seeds, the verdict.

Two classifiers evaluated on the same images are compared on the images where exactly one of
them is right (McNemar 1947; the exact form is a two-sided binomial test, Edwards 1948 and
e.g. Dietterich 1998, "Approximate statistical tests for comparing supervised classification
learning algorithms", §3.1). Runs trained with the same seeds are compared seed by seed: the
mean of the per-seed differences with a Student-t interval (scipy.stats.t).

The verdict (:func:`verdict`) needs both views to agree, so a difference must survive the
training noise between seeds *and* the sampling noise of the evaluation images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from .errors import RetrofitError

ALPHA = 0.05
BETTER, WORSE, SAME = "better", "worse", "not distinguishable"


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs.

    ``b``: images only the first classifier gets right; ``c``: images only the second gets
    right. Under the null hypothesis each discordant image is a fair coin, so with
    ``n = b + c``: ``p = min(1, 2 · P(X ≤ min(b, c)))``, ``X ~ Binomial(n, 1/2)``, computed
    exactly with integers (no dependency). ``b = c = 0`` gives ``p = 1``.

    Example: ``b = 10, c = 2``: ``2 · (1 + 12 + 66) / 2¹² = 158 / 4096 = 0.0386``.

    Raises :class:`RetrofitError` for a negative or non-integer count.
    """
    for name, value in (("b", b), ("c", c)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RetrofitError(f"McNemar counts are non-negative integers, got {name}={value!r}")
    n, k = b + c, min(b, c)
    term, tail = 1, 0  # C(n, 0), running sum of C(n, i) for i ≤ k
    for i in range(k + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


@dataclass(frozen=True)
class PairedDifference:
    """Per-seed differences ``second − first`` summarised: ``mean`` with a ``level`` interval ``[low, high]``.

    ``n``: number of pairs. With one pair there is no interval (``low`` = ``high`` = None).
    """

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None
    level: float = 0.95

    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def paired_difference(first: Sequence[float], second: Sequence[float], level: float = 0.95) -> PairedDifference:
    """Mean of ``second[i] − first[i]`` with a two-sided Student-t interval: ``mean ± t(level, n−1) · s / √n``.

    ``s`` is the sample standard deviation of the differences (``n − 1`` in the denominator).
    The quantile comes from ``scipy.stats.t.ppf``. Raises :class:`RetrofitError` when the two
    sequences differ in length or are empty.
    """
    if len(first) != len(second) or not first:
        raise RetrofitError(f"a paired difference needs two equally long, non-empty lists, got {len(first)} and {len(second)}")
    diffs = [b - a for a, b in zip(first, second)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n == 1:
        return PairedDifference(1, mean, None, None, None, level)
    from scipy.stats import t

    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return PairedDifference(n, mean, std, mean - half, mean + half, level)


def verdict(difference: PairedDifference, p_value: float, alpha: float = ALPHA) -> str:
    """``better`` / ``worse`` / ``not distinguishable`` for ``second`` against ``first``.

    * With two or more seeds: ``better`` when the paired interval lies above 0 **and**
      McNemar's p < ``alpha``; ``worse`` when it lies below 0 and p < ``alpha``; otherwise
      ``not distinguishable`` (in particular whenever the interval contains 0 or p ≥ ``alpha``).
    * With one seed there is no interval: the verdict rests on McNemar's p alone (which says
      nothing about seed-to-seed variation).

    The two views cannot point in opposite directions: on the same images, the mean of the
    per-seed top-1 differences is ``(c − b) / (images · seeds)``.
    """
    significant = p_value < alpha and (difference.n == 1 or difference.excludes_zero())
    if not significant or difference.mean == 0:
        return SAME
    return BETTER if difference.mean > 0 else WORSE
