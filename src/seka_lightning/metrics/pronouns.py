"""PronChange: did the generation replace gendered pronouns while keeping the rest of the biography?

Per sample (BENCHMARKS.md): ``conv = max(0, (n_orig - n_gen) / n_orig)`` where n counts pronoun tokens of a
set (``{she, he}`` for the P-score, all gendered pronouns for the A-score), ``conv = 1`` if the original has
none; ``overlap`` is the fraction of the original's distinct non-pronoun words (gendered pronouns of the A set
excluded, for both scores) that also occur in the generation; ``score = conv * overlap``.

Tokenization: the text is lowercased and split into maximal runs of word characters (regex ``\\w+``), so
``"She's"`` gives ``she`` and ``s`` and punctuation is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics import Metric

from seka_lightning.metrics._checks import check_same_length, require_examples

SUBJECT_PRONOUNS = frozenset({"she", "he"})
GENDERED_PRONOUNS = frozenset({"she", "he", "her", "him", "hers", "his", "herself", "himself"})

_WORD = re.compile(r"\w+")


def pronoun_words(text: str) -> list[str]:
    """Lowercased ``\\w+`` tokens of ``text``."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class PronounChange:
    """One sample's scores: ``p`` over {she, he}, ``a`` over all gendered pronouns, and their parts."""

    p: float
    a: float
    p_conversion: float
    a_conversion: float
    overlap: float


def _conversion(original: list[str], generation: list[str], pronouns: frozenset[str]) -> float:
    n_orig = sum(w in pronouns for w in original)
    if n_orig == 0:
        return 1.0
    n_gen = sum(w in pronouns for w in generation)
    return max(0.0, (n_orig - n_gen) / n_orig)


def strip_echo(generation: str, instruction: str) -> str:
    """``generation`` with every verbatim copy of ``instruction`` removed, before scoring.

    Models often repeat the instruction before answering; its quoted 'she' and 'he' would otherwise count as
    pronouns the model failed to change (the reference removes the echo too).
    """
    if not instruction.strip():
        raise ValueError("instruction is empty; pass the instruction text the prompt ends with")
    return generation.replace(instruction, "")


def has_subject_pronoun(text: str) -> bool:
    """Whether ``text`` has a 'she' or 'he' (such a bio scores conversion 1 for the P-score by default)."""
    return any(word in SUBJECT_PRONOUNS for word in pronoun_words(text))


def pronoun_change(original: str, generation: str) -> PronounChange:
    """Score one generation against the biography it should have rewritten."""
    original_words = pronoun_words(original)
    content = set(original_words) - GENDERED_PRONOUNS
    if not content:
        raise ValueError(f"original text {original!r} has no non-pronoun words; pass the full biography")
    generation_words = pronoun_words(generation)
    overlap = len(content & set(generation_words)) / len(content)
    p_conversion = _conversion(original_words, generation_words, SUBJECT_PRONOUNS)
    a_conversion = _conversion(original_words, generation_words, GENDERED_PRONOUNS)
    return PronounChange(
        p=p_conversion * overlap,
        a=a_conversion * overlap,
        p_conversion=p_conversion,
        a_conversion=a_conversion,
        overlap=overlap,
    )


class PronounChangeScore(Metric):
    """PronChange P- and A-scores over samples.

    ``compute`` returns ``p_score`` / ``a_score``, the fraction of samples whose score is > 0 (the figure the
    paper reports), and ``p_mean`` / ``a_mean``, the mean per-sample score.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    p_positive: torch.Tensor
    a_positive: torch.Tensor
    p_sum: torch.Tensor
    a_sum: torch.Tensor
    samples: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        """``kwargs`` go to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``)."""
        super().__init__(**kwargs)
        for name in ("p_positive", "a_positive"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        for name in ("p_sum", "a_sum"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("samples", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, originals: Sequence[str], generations: Sequence[str]) -> None:
        """Add samples: each original biography with the model's rewritten text."""
        check_same_length(originals=originals, generations=generations)
        scores = [pronoun_change(o, g) for o, g in zip(originals, generations, strict=True)]
        self.p_positive += sum(s.p > 0 for s in scores)
        self.a_positive += sum(s.a > 0 for s in scores)
        self.p_sum += sum(s.p for s in scores)
        self.a_sum += sum(s.a for s in scores)
        self.samples += len(scores)

    def compute(self) -> dict[str, torch.Tensor]:
        require_examples(type(self).__name__, self.samples)
        n = self.samples.to(torch.float64)
        return {
            "p_score": self.p_positive / n,
            "a_score": self.a_positive / n,
            "p_mean": self.p_sum / n,
            "a_mean": self.a_sum / n,
        }
