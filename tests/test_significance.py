"""Intervals and paired tests against independent float64 references (closed forms, brute-force sums, normal limits)."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest

from seka_lightning.significance import (
    bootstrap_interval,
    bootstrap_means,
    mcnemar_exact,
    mean_interval,
    paired_bootstrap_test,
    paired_test,
    wilson_interval,
)

Z95 = 1.959963984540054  # Φ⁻¹(0.975), from a table


def test_wilson_matches_the_textbook_value_for_7_of_10():
    interval = wilson_interval(7, 10)
    # by hand: p = 0.7, n = 10, z² = 3.841459; centre = (0.7 + 0.192073) / 1.384146; half-width as in Wilson (1927)
    z2 = Z95**2
    centre = (0.7 + z2 / 20) / (1 + z2 / 10)
    half = Z95 / (1 + z2 / 10) * math.sqrt(0.7 * 0.3 / 10 + z2 / 400)
    assert interval.low == pytest.approx(centre - half, abs=1e-12)
    assert interval.high == pytest.approx(centre + half, abs=1e-12)
    assert (round(interval.low, 4), round(interval.high, 4)) == (0.3968, 0.8922)  # published value
    assert interval.method == "wilson"


def test_wilson_at_the_edges_stays_in_0_1_and_excludes_nothing_it_should_not():
    zero, all_ = wilson_interval(0, 20), wilson_interval(20, 20)
    assert zero.low == 0.0 and zero.high == pytest.approx(Z95**2 / (20 + Z95**2), abs=1e-12)
    assert all_.high == 1.0 and all_.low == pytest.approx(20 / (20 + Z95**2), abs=1e-12)


@pytest.mark.parametrize(("successes", "n"), [(-1, 5), (6, 5), (0, 0)])
def test_wilson_rejects_impossible_counts(successes, n):
    with pytest.raises(ValueError, match=f"successes={successes}, n={n}"):
        wilson_interval(successes, n)


def brute_force_mcnemar(b: int, c: int) -> float:
    """Two-sided exact binomial test by enumeration: the probability of outcomes as unlikely as the observed one."""
    n = b + c
    if n == 0:
        return 1.0
    probs = [Fraction(math.comb(n, k), 2**n) for k in range(n + 1)]
    observed = probs[b]
    return float(min(Fraction(1), sum(p for p in probs if p <= observed)))


@pytest.mark.parametrize(("b", "c"), [(0, 0), (0, 5), (3, 7), (7, 3), (10, 10), (1, 12), (25, 11)])
def test_mcnemar_equals_a_brute_force_binomial_sum(b, c):
    # b pairs won only by a, c only by b, plus concordant pairs that must not matter
    a = [1.0] * b + [0.0] * c + [1.0, 0.0, 1.0]
    other = [0.0] * b + [1.0] * c + [1.0, 0.0, 1.0]
    result = mcnemar_exact(a, other)
    assert result.p_value == pytest.approx(brute_force_mcnemar(b, c), rel=1e-12)
    assert result.n == b + c + 3 and result.difference == pytest.approx((b - c) / (b + c + 3))
    assert result.test == "mcnemar-exact"


def test_mcnemar_known_value_and_large_n():
    assert mcnemar_exact([0.0] * 5, [1.0] * 5).p_value == 2 / 32
    # 20000 discordant pairs, 9800 vs 10200: normal approximation with continuity correction, float64
    b, c = 9800, 10200
    result = mcnemar_exact([1.0] * b + [0.0] * c, [0.0] * b + [1.0] * c)
    z = (abs(b - c) - 1) / math.sqrt(b + c)
    normal = math.erfc(z / math.sqrt(2))
    assert result.p_value == pytest.approx(normal, rel=2e-2)
    assert 0 < result.p_value < 0.01


def test_mcnemar_needs_binary_scores_and_equal_lengths():
    with pytest.raises(ValueError, match="mcnemar_exact needs 0/1 scores; use paired_bootstrap_test"):
        mcnemar_exact([0.5, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="equal lengths, got 2 and 3; pair them by example id first"):
        mcnemar_exact([0.0, 1.0], [0.0, 1.0, 1.0])


def test_bootstrap_means_are_means_of_resamples_and_seeded():
    values = [0.1, 0.5, 0.25, 0.9, 0.0]
    first, again, other = (
        bootstrap_means(values, seed=3),
        bootstrap_means(values, seed=3),
        bootstrap_means(values, seed=4),
    )
    assert first.equal(again) and not first.equal(other) and first.shape == (10_000,)
    # every resampled mean is a mean of 5 of the values: 5 * mean is a sum of 5 values from the set
    sums = {round(sum(combo), 9) for combo in itertools.combinations_with_replacement(values, 5)}
    assert {round(5 * m, 9) for m in first.tolist()} <= sums


def test_bootstrap_interval_approaches_the_normal_interval():
    rng = random.Random(0)
    values = [rng.random() ** 2 for _ in range(2000)]
    mean = math.fsum(values) / len(values)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
    interval = bootstrap_interval(values, resamples=4000, seed=1)
    assert interval.low == pytest.approx(mean - Z95 * sd / math.sqrt(len(values)), abs=1.5e-3)
    assert interval.high == pytest.approx(mean + Z95 * sd / math.sqrt(len(values)), abs=1.5e-3)
    assert interval.method == "bootstrap" and interval.low < mean < interval.high


def test_mean_interval_picks_wilson_for_binary_scores():
    assert mean_interval([1.0, 0.0, 1.0, 1.0]) == wilson_interval(3, 4)
    assert mean_interval([1.0, 0.5, 0.0]).method == "bootstrap"
    with pytest.raises(ValueError, match="a metric with no examples has no interval"):
        mean_interval([])
    with pytest.raises(ValueError, match="NaN or infinite score; fix the scorer"):
        mean_interval([0.2, float("nan")])


def test_paired_bootstrap_p_value_against_the_normal_limit():
    rng = random.Random(5)
    a = [rng.gauss(0.0, 1.0) for _ in range(1500)]
    b = [x - 0.06 + rng.gauss(0.0, 1.0) for x in a]  # mean difference about 0.06, sd of differences 1
    differences = [x - y for x, y in zip(a, b, strict=True)]
    d = math.fsum(differences) / len(differences)
    sd = math.sqrt(math.fsum((x - d) ** 2 for x in differences) / (len(differences) - 1))
    normal = math.erfc(abs(d) / (sd / math.sqrt(len(differences))) / math.sqrt(2))
    result = paired_bootstrap_test(a, b, resamples=8000, seed=2)
    assert result.difference == pytest.approx(d, abs=1e-12)
    assert result.p_value == pytest.approx(normal, abs=0.01)
    assert result.test == "paired-bootstrap"


def test_paired_bootstrap_edge_cases():
    same = [0.3, 0.7, 0.1]
    assert paired_bootstrap_test(same, same).p_value == 1.0
    shifted = paired_bootstrap_test([v + 0.5 for v in same], same, resamples=999)
    assert shifted.p_value == pytest.approx(1 / 1000) and shifted.difference == pytest.approx(0.5)


def test_paired_test_dispatches_on_the_scores():
    assert paired_test([1.0, 0.0, 1.0], [0.0, 0.0, 1.0]).test == "mcnemar-exact"
    assert paired_test([1.0, 0.5, 1.0], [0.0, 0.0, 1.0]).test == "paired-bootstrap"
