"""Does highlighting change the answer? The summary ``seka predict`` prints on prompts that carry the highlighted
answer (``target``) and the answer it overrides (``original``), as the shipped knowledge-conflict prompts do.

Each continuation is scored by :func:`follows_highlight`, unsteered and steered; the two shares get Wilson 95%
intervals and are compared with the exact McNemar test on the paired outcomes. Beside it, the attention from the
last prompt token onto the highlighted tokens (the measure of ``seka validate``, recorded per prompt by
``HighlightGenerator``) is averaged over the prompts, unsteered and steered.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from seka_lightning.significance import mcnemar_exact, wilson_interval

CONDITIONS = ("unsteered", "steered")
FOLLOW_RULE = "the continuation names the target and not the original (case-insensitive, whole words)"


def mentions(text: str, phrase: str) -> bool:
    """True when ``phrase`` occurs in ``text`` as whole words, case-insensitively; the spaces inside a phrase match
    any run of whitespace (``"New York"`` is found in ``"new\\nyork"`` but not in ``"Newark"``)."""
    words = phrase.split()
    if not words:
        raise ValueError("the phrase to look for is empty; give a target and an original with at least one word")
    pattern = r"\s+".join(re.escape(word) for word in words)
    return re.search(rf"(?<!\w){pattern}(?!\w)", text, flags=re.IGNORECASE) is not None


def follows_highlight(continuation: str, target: str, original: str) -> bool:
    """Whether a continuation follows the highlighted fact: it names ``target`` and does not name ``original``
    (both as whole words, case-insensitively; :func:`mentions`).

    A continuation that names both (``"Rome. Previously it was Paris."``) does not count: the answer is ambiguous.
    """
    return mentions(continuation, target) and not mentions(continuation, original)


def highlight_effect(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The summary of one ``seka predict`` run from its records (``prompt``, ``unsteered``, ``steered``, optional
    ``target``/``original`` and ``attention_on_highlight``): the answers that follow the highlight and the attention
    on it, unsteered vs steered. Parts without data (no targets, attention not measured) are None."""
    return {
        "prompts": len(records),
        "follows_highlight": _follow_counts([r for r in records if "target" in r]),
        "attention_on_highlight": _mean_attention(records),
    }


def _follow_counts(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    if not records:
        return None
    outcomes = {
        condition: [float(follows_highlight(r[condition], r["target"], r["original"])) for r in records]
        for condition in CONDITIONS
    }
    n = len(records)
    counts = {condition: int(sum(values)) for condition, values in outcomes.items()}
    pairs = list(zip(outcomes["unsteered"], outcomes["steered"], strict=True))
    return {
        "rule": FOLLOW_RULE,
        "n": n,
        "count": counts,
        "share": {condition: count / n for condition, count in counts.items()},
        "interval": {
            condition: [wilson_interval(count, n).low, wilson_interval(count, n).high]
            for condition, count in counts.items()
        },
        "moved_toward": sum(1 for u, s in pairs if (u, s) == (0.0, 1.0)),
        "moved_away": sum(1 for u, s in pairs if (u, s) == (1.0, 0.0)),
        "mcnemar_p": mcnemar_exact(outcomes["steered"], outcomes["unsteered"]).p_value,
    }


def _mean_attention(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    measured = [r["attention_on_highlight"] for r in records if r.get("attention_on_highlight") is not None]
    if not measured:
        return None
    return {
        "n": len(measured),
        **{condition: math.fsum(m[condition] for m in measured) / len(measured) for condition in CONDITIONS},
    }


def summary_line(summary: dict[str, Any]) -> str:
    """The one line ``seka predict`` ends with, e.g. ``summary: answers follow the highlight 3/24 unsteered ->
    15/24 steered (McNemar p = 0.0018; 13 moved toward, 1 away); attention on the highlight 0.102 -> 0.263``."""
    follows, attention = summary["follows_highlight"], summary["attention_on_highlight"]
    if follows is None:
        parts = ['no prompt carries a target answer, so none is scored (add "target" and "original" to each line)']
    else:
        n, count = follows["n"], follows["count"]
        parts = [
            f"answers follow the highlight {count['unsteered']}/{n} unsteered -> {count['steered']}/{n} steered "
            f"(McNemar p = {follows['mcnemar_p']:.2g}; {follows['moved_toward']} moved toward, "
            f"{follows['moved_away']} away)"
        ]
    if attention is None:
        parts.append("attention on the highlight not measured")
    else:
        parts.append(f"attention on the highlight {attention['unsteered']:.3f} -> {attention['steered']:.3f}")
    return "summary: " + "; ".join(parts)
