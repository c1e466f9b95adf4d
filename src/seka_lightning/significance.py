"""95% intervals and paired tests for benchmark scores, in plain python/torch (no scipy).

- A mean of 0/1 values gets the Wilson score interval; any other mean a percentile bootstrap over the examples.
- Two methods scored 0/1 on the same examples are compared with the exact McNemar test (a two-sided binomial test
  on the discordant pairs); other paired scores with a two-sided paired bootstrap test.

Every resampling draws from ``torch.Generator().manual_seed(seed)`` on the CPU, so the same scores and seed give
the same interval and p-value on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import torch

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
_CHUNK = 500  # resamples drawn at once: bounds memory at 500 x n indices


@dataclass(frozen=True)
class Interval:
    """A ``confidence`` interval ``[low, high]`` for a mean of ``n`` values, and how it was computed."""

    low: float
    high: float
    method: str  # "wilson" or "bootstrap"


@dataclass(frozen=True)
class PairedTest:
    """A two-sided paired test of ``a`` against ``b`` on ``n`` shared examples: ``difference = mean(a) - mean(b)``."""

    n: int
    difference: float
    p_value: float
    test: str  # "mcnemar-exact" or "paired-bootstrap"


def is_binary(values: Sequence[float]) -> bool:
    """True when every value is exactly 0 or 1 (what Wilson and McNemar need)."""
    return all(v in (0.0, 1.0) for v in values)


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _check_values(values: Sequence[float], name: str) -> None:
    if len(values) == 0:
        raise ValueError(f"{name} needs at least one value; a metric with no examples has no interval")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} got a NaN or infinite score; fix the scorer that wrote it")


def wilson_interval(successes: int, n: int, *, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval for a proportion ``successes / n`` (Wilson 1927): well-behaved at 0 and 1, unlike the
    normal approximation."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n > 0, got successes={successes}, n={n}")
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(low=max(0.0, centre - half), high=min(1.0, centre + half), method="wilson")


def bootstrap_means(
    values: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> torch.Tensor:
    """Means of ``resamples`` resamples (with replacement, same size) of ``values``, float64 ``[resamples]``."""
    if resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples}")
    data = torch.tensor(list(values), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        index = torch.randint(len(data), (size, len(data)), generator=generator)  # [size, n]
        means.append(data[index].mean(dim=1))
    return torch.cat(means)


def bootstrap_interval(
    values: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """Percentile bootstrap interval of the mean: the ``(1 -/+ confidence) / 2`` quantiles (linear interpolation) of
    the resampled means."""
    _check_values(values, "bootstrap_interval")
    _z(confidence)
    means = bootstrap_means(values, resamples=resamples, seed=seed)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(low=low, high=high, method="bootstrap")


def mean_interval(
    values: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """The interval for a mean of per-example scores: Wilson when every value is 0 or 1, else the bootstrap."""
    _check_values(values, "mean_interval")
    if is_binary(values):
        return wilson_interval(int(sum(values)), len(values), confidence=confidence)
    return bootstrap_interval(values, confidence=confidence, resamples=resamples, seed=seed)


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Exact McNemar test of paired 0/1 scores: with ``n01``/``n10`` the discordant pairs, the two-sided binomial
    p-value ``min(1, 2 * P(X <= min(n01, n10)))`` for ``X ~ Bin(n01 + n10, 1/2)``; 1 when no pair is discordant.

    The tail is summed in exact integer arithmetic (Python integers do not overflow) and divided once, so the
    p-value is the correctly rounded float for any number of pairs.
    """
    _check_pairs(a, b)
    if not (is_binary(a) and is_binary(b)):
        raise ValueError("mcnemar_exact needs 0/1 scores; use paired_bootstrap_test for other scores")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x == 1.0 and y == 0.0)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if x == 0.0 and y == 1.0)
    discordant = only_a + only_b
    term, tail = 1, 0  # term = comb(discordant, k), built up without factorials
    for k in range(min(only_a, only_b) + 1):
        tail += term
        term = term * (discordant - k) // (k + 1)
    p_value = min(1.0, 2 * tail / 2**discordant)
    return PairedTest(n=len(a), difference=(only_a - only_b) / len(a), p_value=p_value, test="mcnemar-exact")


def paired_bootstrap_test(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> PairedTest:
    """Two-sided paired bootstrap test of ``mean(a - b) = 0``: the per-example differences are resampled, and the
    p-value is ``(1 + #{|D* - D| >= |D|}) / (resamples + 1)`` with ``D`` the observed mean difference and ``D*`` the
    resampled ones (the bootstrap distribution shifted to the null; Efron & Tibshirani 1993, §16.4)."""
    _check_pairs(a, b)
    differences = [x - y for x, y in zip(a, b, strict=True)]
    observed = math.fsum(differences) / len(differences)
    means = bootstrap_means(differences, resamples=resamples, seed=seed)
    # a tiny slack so that ties with |D| that differ only by rounding count as "as extreme"
    extreme = int(((means - observed).abs() >= abs(observed) - 1e-12).sum())
    p_value = min(1.0, (1 + extreme) / (resamples + 1))
    return PairedTest(n=len(a), difference=observed, p_value=p_value, test="paired-bootstrap")


def paired_test(
    a: Sequence[float], b: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> PairedTest:
    """Exact McNemar when both score lists are 0/1, else the paired bootstrap test."""
    _check_pairs(a, b)
    if is_binary(a) and is_binary(b):
        return mcnemar_exact(a, b)
    return paired_bootstrap_test(a, b, resamples=resamples, seed=seed)


def _check_pairs(a: Sequence[float], b: Sequence[float]) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}; pair them by example id first")
    _check_values(a, "a paired test")
    _check_values(b, "a paired test")
