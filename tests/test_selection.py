"""The dev selection rule (seka_lightning.selection) on synthetic dev tables: the guards, the best admissible
efficacy, the smallest gain within one SE, ties, and the guard-run shortlist."""

from __future__ import annotations

import math
import statistics

import pytest

from seka_lightning.selection import EFFICACY, Candidate, Estimate, guard_candidates, guard_failures, select

EM, PRON = "exact_match_inside", "pron_mean_p"
BASELINE = {
    EFFICACY: Estimate(0.50, 0.02, 500),
    EM: Estimate(0.25, 0.0625, 400),  # guard floor 0.1875 (dyadic numbers: the floors are exact)
    PRON: Estimate(0.5, 0.125, 100),  # guard floor 0.375
}


def cand(layers: str, gain: float, eff: float, se: float = 0.02, em: float | None = 0.25, pron: float | None = 0.5):
    metrics = {EFFICACY: Estimate(eff, se, 500)}
    if em is not None:
        metrics[EM] = Estimate(em, 0.02, 400)
    if pron is not None:
        metrics[PRON] = Estimate(pron, 0.05, 100)
    return Candidate(layers, gain, metrics)


def test_estimate_matches_the_sample_standard_error():
    scores = [1, 0, 1, 1, 0, 1, 0, 1]
    estimate = Estimate.from_scores(scores)
    assert estimate.mean == pytest.approx(statistics.fmean(scores), abs=1e-15)
    assert estimate.se == pytest.approx(statistics.stdev(scores) / math.sqrt(len(scores)), abs=1e-15)
    assert estimate.n == 8
    assert Estimate.from_scores([0.3]).se == 0.0


def test_estimate_of_no_scores_is_an_error():
    with pytest.raises(ValueError, match="no per-example scores"):
        Estimate.from_scores([])


def test_smallest_gain_within_one_se_of_the_best():
    candidates = [
        cand("all", 1, 0.60),
        cand("all", 2, 0.79),  # within 0.02 of 0.80: the smallest such gain
        cand("all", 4, 0.80),  # the best
        cand("all", 8, 0.70),  # outside the band
    ]
    selection = select(candidates, BASELINE)
    assert selection.best.name == "all-g4"
    assert selection.chosen.name == "all-g2"
    assert all(reasons == [] for reasons in selection.rejected.values())


def test_the_one_se_band_uses_the_best_candidates_se():
    candidates = [cand("all", 1, 0.6), cand("all", 8, 0.75, se=0.125)]
    assert select(candidates, BASELINE).chosen.name == "all-g8"  # 0.6 < 0.625: outside the band
    candidates = [cand("all", 1, 0.625), cand("all", 8, 0.75, se=0.125)]
    assert select(candidates, BASELINE).chosen.name == "all-g1"  # 0.625 = 0.75 - 0.125: inside


def test_guard_failure_excludes_the_best_efficacy():
    candidates = [
        cand("last10", 16, 0.95, em=0.125),  # best efficacy, lost in the middle below 0.1875
        cand("last15", 8, 0.90, pron=0.25),  # PronChange below 0.375
        cand("last20", 4, 0.85, em=0.1875, pron=0.375),  # exactly on both floors: admissible
    ]
    selection = select(candidates, BASELINE)
    assert selection.chosen.name == selection.best.name == "last20-g4"
    assert selection.rejected["last10-g16"] == [f"{EM}: 0.1250 < unsteered - SE = 0.1875"]
    assert selection.rejected["last15-g8"] == [f"{PRON}: 0.2500 < unsteered - SE = 0.3750"]


def test_a_candidate_without_guard_runs_is_not_admissible():
    candidates = [cand("all", 16, 0.99, em=None, pron=None), cand("all", 2, 0.70)]
    selection = select(candidates, BASELINE)
    assert selection.chosen.name == "all-g2"
    assert selection.rejected["all-g16"] == [f"{EM}: no dev run", f"{PRON}: no dev run"]


def test_no_admissible_candidate_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no candidate passes the dev guards .* re-run the dev stage"):
        select([cand("all", 4, 0.9, em=0.0)], BASELINE)


def test_missing_efficacy_and_missing_baseline_guard_are_errors():
    with pytest.raises(ValueError, match=r"candidates \['all-g4'\] have no 'efficacy_score'"):
        select([Candidate("all", 4.0, {EM: Estimate(0.2, 0.0, 1), PRON: Estimate(0.4, 0.0, 1)})], BASELINE)
    with pytest.raises(ValueError, match="the unsteered baseline has no 'pron_mean_p' estimate"):
        guard_failures(cand("all", 4, 0.9), {EM: BASELINE[EM]})


def test_ties_on_gain_go_to_higher_efficacy_then_grid_order():
    candidates = [cand("all", 2, 0.79), cand("last20", 2, 0.80), cand("last15", 4, 0.80)]
    selection = select(candidates, BASELINE)
    assert selection.best.name == "last20-g2"  # equal best efficacy: the earlier grid entry
    assert selection.chosen.name == "last20-g2"  # gain 2 twice: the higher efficacy
    candidates = [cand("all", 2, 0.80), cand("last20", 2, 0.80)]
    assert select(candidates, BASELINE).chosen.name == "all-g2"  # full tie: grid order


def test_guard_shortlist_puts_the_one_se_band_first_smallest_gain_first():
    candidates = [
        cand("all", 1, 0.50),
        cand("all", 4, 0.80),
        cand("all", 16, 0.81),
        cand("last20", 2, 0.795),
        cand("last20", 8, 0.60),
        cand("last10", 8, 0.70),
    ]
    names = [c.name for c in guard_candidates(candidates, top=4)]
    assert names == ["last20-g2", "all-g4", "all-g16", "last10-g8"]
    assert [c.name for c in guard_candidates(candidates, top=2)] == ["last20-g2", "all-g4"]
    with pytest.raises(ValueError, match="top must be >= 1"):
        guard_candidates(candidates, top=0)
