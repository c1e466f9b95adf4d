"""The dev-only rule that picks each model's default SEKA setting (bank, layers and gain) from a grid of dev runs.

The rule (stated once here, recorded in ``docs/results/dev/<model>.json``):

1. guards: a candidate is admissible only if, on every guard metric (by default lost in the middle
   ``exact_match_inside`` and PronChange ``pron_mean_p`` on their dev slices; the results runner can add lost in the
   middle's ``exact_match_outside``), its mean is no lower than the unsteered mean minus one standard
   error of the unsteered per-example scores;
2. among admissible candidates take the best CounterFact dev efficacy;
3. then choose the smallest gain whose efficacy is within one standard error (of that best candidate's per-example
   scores) of the best; ties on the gain go to the higher efficacy, then to the earlier candidate in the grid.

Guard runs are costly, so :func:`guards_needed` asks for them only where they can change the choice; once it returns
nothing, :func:`select` on the runs made gives the choice the rule would give with every candidate guard-checked.

Plain Python (no torch), so the rule is unit-tested on synthetic numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

EFFICACY = "efficacy_score"
GUARDS = ("exact_match_inside", "pron_mean_p")
RULE = (
    "admissible: every guard metric (the dev table's guards; by default lost in the middle dev exact_match_inside "
    "and PronChange dev pron_mean_p) >= "
    "unsteered mean - one SE of the unsteered per-example scores; among admissible candidates take the best "
    "CounterFact dev efficacy_score, then the smallest gain whose efficacy is within one SE (of the best candidate's "
    "per-example scores) of that best; ties on the gain go to the higher efficacy, then to the earlier grid entry"
)


@dataclass(frozen=True)
class Estimate:
    """A mean over examples with its standard error ``sd / sqrt(n)`` (sample sd; 0 for one example)."""

    mean: float
    se: float
    n: int

    @classmethod
    def from_scores(cls, scores: Iterable[float]) -> Estimate:
        """The estimate of per-example ``scores`` (one value per example id)."""
        values = [float(v) for v in scores]
        if not values:
            raise ValueError("no per-example scores to estimate from; the dev run wrote no scored examples")
        n = len(values)
        mean = math.fsum(values) / n
        variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
        return cls(mean=mean, se=math.sqrt(variance / n), n=n)

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "se": self.se, "n": self.n}


@dataclass(frozen=True)
class Candidate:
    """One grid point: a layer selection and gain, with its dev estimates ``{metric: Estimate}``; SEKA's on the bank
    variant ``bank`` (empty: the model's shipped build config), or another method's grid (``method``, e.g.
    ``adaseka``, which the rule picks from separately). ``length_reference`` / ``length_power``: SEKA's opt-in
    length-adaptive strength (a row with n highlighted tokens gets ``min(1, (length_reference / n) ** length_power)``
    of the edit); None: full strength on every row."""

    layers: str
    gain: float
    metrics: Mapping[str, Estimate] = field(default_factory=dict)
    bank: str = ""
    method: str = ""
    length_reference: int | None = None
    length_power: float = 1.0

    @property
    def name(self) -> str:
        return candidate_name(
            self.layers,
            self.gain,
            self.bank,
            method=self.method,
            length_reference=self.length_reference,
            length_power=self.length_power,
        )

    def length_settings(self) -> dict[str, int | float]:
        """The method options of the length-adaptive strength (empty at full strength)."""
        if self.length_reference is None:
            return {}
        return {"length_reference": self.length_reference, "length_power": self.length_power}


def candidate_name(
    layers: str,
    gain: float,
    bank: str = "",
    *,
    method: str = "",
    length_reference: int | None = None,
    length_power: float = 1.0,
) -> str:
    """A folder-safe name for a grid point, e.g. ``last15-g4``, ``chat95-last15-g4`` on the bank variant ``chat95``,
    ``last15-g4-lref8-p0.5`` with the length-adaptive strength, or ``adaseka-last15-g0.5`` in AdaSEKA's grid."""
    prefix = "".join(f"{part}-" for part in (method, bank) if part)
    suffix = "" if length_reference is None else f"-lref{length_reference}-p{length_power:g}"
    return f"{prefix}{layers}-g{gain:g}{suffix}"


@dataclass(frozen=True)
class Selection:
    """The chosen candidate, the best admissible efficacy it was compared with, and why each candidate was or was not
    admissible (``{name: [reasons]}``, empty when admissible)."""

    chosen: Candidate
    best: Candidate
    rejected: dict[str, list[str]]


def guard_failures(candidate: Candidate, baseline: Mapping[str, Estimate], guards: Sequence[str] = GUARDS) -> list[str]:
    """Why ``candidate`` fails the guards against the unsteered ``baseline`` (empty when it passes).

    A candidate without a guard run is not admissible: the rule never assumes a guard passes.
    """
    reasons = []
    for metric in guards:
        if metric not in baseline:
            raise ValueError(f"the unsteered baseline has no {metric!r} estimate; run its dev guard first")
        floor = baseline[metric].mean - baseline[metric].se
        if metric not in candidate.metrics:
            reasons.append(f"{metric}: no dev run")
        elif candidate.metrics[metric].mean < floor:
            reasons.append(f"{metric}: {candidate.metrics[metric].mean:.4f} < unsteered - SE = {floor:.4f}")
    return reasons


def select(
    candidates: Sequence[Candidate],
    baseline: Mapping[str, Estimate],
    *,
    guards: Sequence[str] = GUARDS,
    objective: str = EFFICACY,
) -> Selection:
    """Apply the rule of this module to ``candidates`` (in grid order) against the unsteered ``baseline``."""
    missing = [c.name for c in candidates if objective not in c.metrics]
    if missing:
        raise ValueError(f"candidates {missing} have no {objective!r} estimate; run their CounterFact dev runs first")
    rejected = {c.name: guard_failures(c, baseline, guards) for c in candidates}
    admissible = [c for c in candidates if not rejected[c.name]]
    if not admissible:
        raise ValueError(
            f"no candidate passes the dev guards {list(guards)} (reasons: {rejected}); run the dev stage "
            "(its guard rounds check candidates without runs) or widen the grid (--gains)"
        )
    order = {c.name: i for i, c in enumerate(candidates)}
    best = max(admissible, key=lambda c: (c.metrics[objective].mean, -order[c.name]))
    threshold = best.metrics[objective].mean - best.metrics[objective].se
    close = [c for c in admissible if c.metrics[objective].mean >= threshold]
    chosen = min(close, key=lambda c: (c.gain, -c.metrics[objective].mean, order[c.name]))
    return Selection(chosen=chosen, best=best, rejected=rejected)


def by_efficacy(candidates: Sequence[Candidate], objective: str = EFFICACY) -> list[Candidate]:
    """``candidates`` from the best efficacy down; ties in grid order."""
    order = {c.name: i for i, c in enumerate(candidates)}
    return sorted(candidates, key=lambda c: (-c.metrics[objective].mean, order[c.name]))


def guards_needed(
    candidates: Sequence[Candidate],
    baseline: Mapping[str, Estimate],
    *,
    limit: int,
    guards: Sequence[str] = GUARDS,
    objective: str = EFFICACY,
) -> list[Candidate]:
    """The next (at most ``limit``) candidates without guard runs whose guards could change the rule's choice; empty
    when the choice on the runs so far equals the choice with every candidate guard-checked.

    The best admissible efficacy is settled once every candidate above it is known to fail; the choice is settled
    once every candidate before it in the band's order (smallest gain first) is known. So guard runs go down the
    efficacy ranking until one passes, then along the band, never to a candidate that cannot be chosen: one that
    already fails a guard it ran needs no run of the others.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")

    def admissible(c: Candidate) -> bool:
        return not guard_failures(c, baseline, guards)

    def known(c: Candidate) -> bool:
        """Settled: every guard run, or one run guard already failed (a failure rules it out, whatever the rest)."""
        measured = [metric for metric in guards if metric in c.metrics]
        return len(measured) == len(guards) or bool(guard_failures(c, baseline, measured))

    ranked = by_efficacy(candidates, objective)
    unknown_above = []
    for c in ranked:
        if admissible(c):
            best = c
            break
        if not known(c):
            unknown_above.append(c)
    else:
        return unknown_above[:limit]  # no admissible candidate so far: check further down the ranking
    if unknown_above:
        return unknown_above[:limit]
    order = {c.name: i for i, c in enumerate(candidates)}
    threshold = best.metrics[objective].mean - best.metrics[objective].se
    band = sorted(
        (c for c in candidates if c.metrics[objective].mean >= threshold),
        key=lambda c: (c.gain, -c.metrics[objective].mean, order[c.name]),
    )
    unknown_before = []
    for c in band:
        if admissible(c):
            break
        if not known(c):
            unknown_before.append(c)
    return unknown_before[:limit]
