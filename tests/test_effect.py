"""The summary of `seka predict`: which continuations follow the highlighted fact, the paired counts and the exact
McNemar p-value, against an independent computation."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from seka_lightning.effect import follows_highlight, highlight_effect, mentions, summary_line


@pytest.mark.parametrize(
    ("continuation", "expected"),
    [
        ("Rome", True),
        (" rome.", True),  # case-insensitive, punctuation is not part of a word
        ("ROME!", True),
        ("Romeo", False),  # a whole word, not a prefix
        ("Paris", False),
        ("Rome, formerly Paris.", False),  # names both: ambiguous, not counted
        ("It is in Rome\nPreviously, the Eiffel Tower was in paris", False),
        ("Italy", False),  # names neither
        ("", False),
    ],
)
def test_follows_highlight_exact_cases(continuation, expected):
    assert follows_highlight(continuation, "Rome", "Paris") is expected


def test_phrases_match_as_whole_words_across_whitespace():
    assert mentions("It is in new\n york now", "New York")
    assert not mentions("Newark", "New York") and not mentions("New Yorker", "New York")
    assert follows_highlight("Germany", "Germany", "German") and not follows_highlight("German", "Germany", "German")
    assert mentions("C++ it is", "C++")  # regex characters in an answer are literal
    with pytest.raises(ValueError, match="the phrase to look for is empty"):
        mentions("text", "  ")


def mcnemar_reference(toward: int, away: int) -> float:
    """Two-sided exact binomial test of the discordant pairs, in exact rationals."""
    n = toward + away
    if n == 0:
        return 1.0
    tail = sum(Fraction(math.comb(n, k), 2**n) for k in range(min(toward, away) + 1))
    return float(min(Fraction(1), 2 * tail))


def record(unsteered: str, steered: str, **extra) -> dict:
    return {"prompt": "p", "unsteered": unsteered, "steered": steered, "target": "Rome", "original": "Paris", **extra}


def test_counts_and_p_value_match_an_independent_computation():
    # (unsteered follows, steered follows): 2 x (0, 0), 9 x (0, 1), 1 x (1, 0), 3 x (1, 1)
    outcomes = [(0, 0)] * 2 + [(0, 1)] * 9 + [(1, 0)] * 1 + [(1, 1)] * 3
    text = {0: "Paris.", 1: "Rome."}
    records = [record(text[u], text[s]) for u, s in outcomes]
    records.append({"prompt": "no answers given", "unsteered": "Rome", "steered": "Rome"})  # not scored
    summary = highlight_effect(records)
    follows = summary["follows_highlight"]
    assert summary["prompts"] == 16 and follows["n"] == 15
    assert follows["count"] == {"unsteered": 4, "steered": 12}
    assert follows["moved_toward"] == 9 and follows["moved_away"] == 1
    assert follows["mcnemar_p"] == mcnemar_reference(9, 1) == pytest.approx(22 / 1024)
    z = 1.959963984540054
    for condition, k in (("unsteered", 4), ("steered", 12)):
        p, n = k / 15, 15
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert follows["interval"][condition] == pytest.approx([centre - half, centre + half], rel=1e-12)
        assert follows["share"][condition] == k / 15
    assert summary["attention_on_highlight"] is None
    assert summary_line(summary) == (
        "summary: answers follow the highlight 4/15 unsteered -> 12/15 steered (McNemar p = 0.021; 9 moved toward, "
        "1 away); attention on the highlight not measured"
    )


def test_attention_is_averaged_over_the_measured_prompts():
    records = [
        record("Rome", "Rome", attention_on_highlight={"unsteered": 0.1, "steered": 0.3}),
        record("Paris", "Rome", attention_on_highlight={"unsteered": 0.2, "steered": 0.6}),
        record("Paris", "Paris", attention_on_highlight=None),  # no highlight: not measured
    ]
    summary = highlight_effect(records)
    assert summary["attention_on_highlight"] == pytest.approx({"n": 2, "unsteered": 0.15, "steered": 0.45})
    assert summary["follows_highlight"]["mcnemar_p"] == 1.0  # one discordant pair
    assert summary_line(summary).endswith("; attention on the highlight 0.150 -> 0.450")


def test_prompts_without_targets_say_so():
    summary = highlight_effect([{"prompt": "p", "unsteered": "a", "steered": "b"}])
    assert summary == {"prompts": 1, "follows_highlight": None, "attention_on_highlight": None}
    assert summary_line(summary) == (
        'summary: no prompt carries a target answer, so none is scored (add "target" and "original" to each line); '
        "attention on the highlight not measured"
    )
