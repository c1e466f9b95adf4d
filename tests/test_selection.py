"""The dev selection rule (seka_lightning.selection) on synthetic dev tables: the guards, the best admissible
efficacy, the smallest gain within one SE, ties, and the guard-run shortlist."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from seka_lightning.selection import (
    EFFICACY,
    Candidate,
    Estimate,
    candidate_name,
    guard_failures,
    guards_needed,
    select,
)

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
    with pytest.raises(
        ValueError, match=r"no candidate passes the dev guards .* run the dev stage .* or widen the grid \(--gains\)"
    ):
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


def unknown(layers: str, gain: float, eff: float, se: float = 0.02) -> Candidate:
    return cand(layers, gain, eff, se, em=None, pron=None)


def test_guards_needed_goes_down_the_ranking_until_one_passes():
    candidates = [
        unknown("all", 1, 0.50),
        unknown("all", 4, 0.80),
        unknown("all", 16, 0.90),
        unknown("last20", 8, 0.70),
    ]
    assert [c.name for c in guards_needed(candidates, BASELINE, limit=2)] == ["all-g16", "all-g4"]
    failed = [c if c.gain != 16 else cand("all", 16, 0.90, em=0.0) for c in candidates]
    assert [c.name for c in guards_needed(failed, BASELINE, limit=2)] == ["all-g4", "last20-g8"]
    every_one_fails = [cand(c.layers, c.gain, c.metrics[EFFICACY].mean, em=0.0) for c in candidates]
    assert guards_needed(every_one_fails, BASELINE, limit=2) == []  # settled: select reports no admissible one


def test_guards_needed_then_walks_the_band_smallest_gain_first_and_stops():
    candidates = [
        unknown("all", 1, 0.785),  # in the band of 0.80 - 0.02
        cand("all", 4, 0.80),  # best, admissible
        unknown("last20", 2, 0.79),  # in the band
        unknown("last20", 16, 0.60),  # below the band: never needed
    ]
    assert [c.name for c in guards_needed(candidates, BASELINE, limit=4)] == ["all-g1", "last20-g2"]
    candidates[0] = cand("all", 1, 0.785)  # the smallest gain passes: settled, last20-g2 cannot be chosen
    assert guards_needed(candidates, BASELINE, limit=4) == []
    assert select(candidates, BASELINE).chosen.name == "all-g1"
    candidates[0] = cand("all", 1, 0.785, pron=0.0)  # it fails: the next smallest gain is needed
    assert [c.name for c in guards_needed(candidates, BASELINE, limit=4)] == ["last20-g2"]


def test_guards_needed_skips_a_candidate_that_already_fails_one_guard():
    candidates = [
        cand("all", 16, 0.90, em=None, pron=0.0),  # fails PronChange, lost in the middle never run
        cand("all", 4, 0.85, em=0.0, pron=None),  # fails lost in the middle, PronChange never run
        cand("all", 2, 0.80, em=None),  # passes PronChange, lost in the middle unknown: needed
        unknown("last20", 8, 0.70),
    ]
    assert [c.name for c in guards_needed(candidates, BASELINE, limit=4)] == ["all-g2", "last20-g8"]
    assert [c.name for c in guards_needed(candidates, BASELINE, limit=1)] == ["all-g2"]
    candidates[2] = cand("all", 2, 0.80)  # it passes both: settled (the others cannot be chosen)
    assert guards_needed(candidates, BASELINE, limit=4) == []
    assert select(candidates, BASELINE).chosen.name == "all-g2"
    candidates[2] = cand("all", 2, 0.80, em=None, pron=0.3)  # fails its one run guard: down the ranking
    assert [c.name for c in guards_needed(candidates, BASELINE, limit=4)] == ["last20-g8"]
    with pytest.raises(ValueError, match="limit must be >= 1"):
        guards_needed(candidates, BASELINE, limit=0)


def test_selection_after_guards_needed_equals_selection_with_every_guard():
    """On a grid where every candidate has guard numbers, running guards only where guards_needed asks (rounds of 2)
    gives the same choice as the rule on the full grid."""
    rng = random.Random(0)
    for _ in range(200):
        full = [
            cand(
                layers,
                gain,
                rng.choice([0.5, 0.6, 0.7, 0.75, 0.78, 0.8]),
                em=rng.choice([0.125, 0.25]),
                pron=rng.choice([0.25, 0.5]),
            )
            for layers in ("all", "last20", "last10")
            for gain in (1, 2, 4, 8)
        ]
        hidden = [unknown(c.layers, c.gain, c.metrics[EFFICACY].mean) for c in full]
        by_name = {c.name: c for c in full}
        while needed := guards_needed(hidden, BASELINE, limit=2):
            names = {c.name for c in needed}
            hidden = [by_name[c.name] if c.name in names else c for c in hidden]
        try:
            expected = select(full, BASELINE).chosen.name
        except ValueError:
            with pytest.raises(ValueError, match="no candidate passes"):
                select(hidden, BASELINE)
            continue
        assert select(hidden, BASELINE).chosen.name == expected


def test_candidate_names_are_distinct_per_bank_and_method():
    """Grid points of SEKA's banks and of AdaSEKA's grid get distinct folder names; SEKA's shipped-bank names are
    the plain ``<layers>-g<gain>``."""
    names = [
        Candidate("last15", 4.0).name,
        Candidate("last15", 4.0, bank="chat95").name,
        Candidate("last15", 0.5, method="adaseka").name,
        candidate_name("last15", 0.25, method="adaseka"),
    ]
    assert names == ["last15-g4", "chat95-last15-g4", "adaseka-last15-g0.5", "adaseka-last15-g0.25"]


def test_length_adaptive_twins_are_named_apart_and_lose_ties_to_full_strength():
    """A length-adaptive grid point is named after its schedule and carries its method options; with the same dev
    numbers its full-strength twin (earlier in the grid) is chosen, and once that twin fails a guard, the
    length-adaptive point is."""
    full = cand("last10", 8, 0.83)
    twin = Candidate("last10", 8.0, full.metrics, length_reference=8, length_power=0.5)
    assert twin.name == "last10-g8-lref8-p0.5"
    assert candidate_name("last10", 8, "chat95", length_reference=8, length_power=1) == "chat95-last10-g8-lref8-p1"
    assert twin.length_settings() == {"length_reference": 8, "length_power": 0.5}
    assert full.length_settings() == {}
    assert select([full, twin], BASELINE).chosen is full
    failing = cand("last10", 8, 0.83, em=0.02)  # lost in the middle below the guard floor 0.1875
    selection = select([failing, twin], BASELINE)
    assert selection.chosen is twin
    assert selection.rejected == {failing.name: ["exact_match_inside: 0.0200 < unsteered - SE = 0.1875"], twin.name: []}
