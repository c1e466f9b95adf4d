"""Lost in the middle: best-subspan exact match, reported per gold-document position.

Normalisation and matching follow nelson-liu/lost-in-the-middle ``metrics.py`` (the SQuAD normalisation):
lowercase, drop ASCII punctuation, replace the articles a/an/the by spaces, collapse whitespace; a prediction
is correct if any normalised gold answer is a substring of the normalised prediction. Kept for fidelity: the
match ignores word boundaries, and a gold answer that normalises to "" (e.g. "The") matches anything.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from seka_lightning.metrics._checks import check_same_length, require_examples

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def best_subspan_em(prediction: str, answers: Sequence[str]) -> bool:
    """True if some normalised answer occurs inside the normalised prediction."""
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
    normalized = normalize_answer(prediction)
    return any(normalize_answer(answer) in normalized for answer in answers)


class SubspanExactMatch(Metric):
    """Best-subspan EM overall and per gold-document position.

    ``positions`` are the 0-based gold positions evaluated (default: BENCHMARKS.md's 30-document grid).
    ``compute`` returns ``{"em": ..., "em_pos_<p>": ...}`` with one key per configured position; a position
    with no examples reports NaN (a run usually evaluates one position at a time).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, *, positions: Sequence[int] = (0, 4, 9, 14, 19, 24, 29), **kwargs: Any) -> None:
        """``positions``: gold positions to report; ``kwargs`` go to ``torchmetrics.Metric``."""
        super().__init__(**kwargs)
        self.positions = list(positions)
        if (
            not self.positions
            or any(not isinstance(p, int) or p < 0 for p in self.positions)
            or len(set(self.positions)) != len(self.positions)
        ):
            raise ValueError(f"positions must be distinct non-negative integers, got {positions!r}")
        self._slot = {p: i for i, p in enumerate(self.positions)}
        self.add_state("correct", default=torch.zeros(len(self.positions), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(self.positions), dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, predictions: Sequence[str], answers: Sequence[Sequence[str]], gold_positions: Sequence[int]
    ) -> None:
        """Add examples: the generated answer, its gold answers, and where the gold document was placed."""
        positions = [int(p) for p in gold_positions]
        check_same_length(predictions=predictions, answers=answers, gold_positions=positions)
        unknown = sorted({p for p in positions if p not in self._slot})
        if unknown:
            raise ValueError(f"gold positions {unknown} are not among the configured positions {self.positions}")
        correct = torch.zeros(len(self.positions), dtype=torch.long)
        total = torch.zeros(len(self.positions), dtype=torch.long)
        for prediction, golds, position in zip(predictions, answers, positions, strict=True):
            slot = self._slot[position]
            total[slot] += 1
            correct[slot] += int(best_subspan_em(prediction, golds))
        self.correct += correct.to(self.correct.device)
        self.total += total.to(self.total.device)

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.total.sum()
        require_examples(type(self).__name__, total)
        result = {"em": self.correct.sum().to(torch.float64) / total}
        per_position = self.correct.to(torch.float64) / self.total  # NaN where a position saw no examples
        for p, i in self._slot.items():
            result[f"em_pos_{p}"] = per_position[i]
        return result
