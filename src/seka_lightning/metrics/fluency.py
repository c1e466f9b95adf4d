"""Fluency as ROME's weighted n-gram entropy of a generation.

Per text (ROME ``compute_n_gram_entropy``): for each n, the Shannon entropy in bits of the n-gram frequency
distribution of the text's tokens, ``H_n = -sum_g p_g log2 p_g``; the text's score is the arithmetic mean of
``w_n * H_n`` over n, with n = (2, 3) and w = (2/3, 4/3) by default. A text with no n-grams of some order
contributes ``H_n = 0`` (what ROME's numpy code yields). The reported fluency is the mean over generations.

ROME tokenizes with ``nltk.word_tokenize``; nltk is not a dependency here, so :func:`word_tokenize` is a
regex approximation of it (see there). The two agree on ordinary prose; they can differ on abbreviations
("Dr." is one nltk token, two here), quote characters (nltk rewrites ``"`` to `````/``''``) and some
contractions ("don't" is ``do n't`` in nltk, ``don 't`` here: same token count, different split).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from seka_lightning.metrics._checks import require_examples

# Numbers with inner separators ("3.5", "1,000"), words with inner hyphens ("well-known"), clitics split off
# their word ("John's" -> "John", "'s"), an ellipsis, then any other non-space character on its own.
_WORD_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|\w+(?:-\w+)*|'\w+|\.\.\.|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Split ``text`` into words and punctuation marks, case preserved (an approximation of nltk's)."""
    return _WORD_TOKEN.findall(text)


def n_gram_entropy_of_order(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the n-gram distribution of ``tokens``; 0 when there are fewer than n tokens."""
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return sum(c / total * math.log2(total / c) for c in counts.values())


def n_gram_entropy(text: str, *, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's weighted n-gram entropy of one text: ``mean_n(w_n * H_n)`` over its word tokens."""
    tokens = word_tokenize(text)
    return sum(w * n_gram_entropy_of_order(tokens, n) for n, w in zip(ns, weights, strict=True)) / len(ns)


def is_degenerate(text: str, *, n: int = 3, share: float = 1 / 3) -> bool:
    """Whether ``text`` loops: one repeated n-gram's occurrences cover more than ``share`` of its word tokens.

    The rule, exactly: lower-case the text's :func:`word_tokenize` tokens; for each distinct n-gram (n
    consecutive tokens) that occurs at least twice, mark every token inside any of its occurrences
    (overlapping occurrences mark a token once); the text is degenerate if, for some such n-gram, the
    marked tokens are more than ``share`` of all tokens. A loop of period p covers about n / p of the text,
    so with n = 3 and a third, loops of up to 8 tokens are caught; text without a repeated n-gram never is.
    """
    if n < 1 or not 0 < share < 1:
        raise ValueError(f"n must be >= 1 and share in (0, 1), got n={n}, share={share}")
    tokens = [token.lower() for token in word_tokenize(text)]
    starts: dict[tuple[str, ...], list[int]] = {}
    for i in range(len(tokens) - n + 1):
        starts.setdefault(tuple(tokens[i : i + n]), []).append(i)
    for positions in starts.values():
        if len(positions) < 2:
            continue
        covered, reach = 0, 0
        for start in positions:  # ascending: count each token once across overlapping occurrences
            covered += start + n - max(start, reach)
            reach = start + n
        if covered > share * len(tokens):
            return True
    return False


class NGramEntropy(Metric):
    """Mean over generations of :func:`n_gram_entropy` (ROME's fluency; higher means less repetitive)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    entropy_sum: torch.Tensor
    texts: torch.Tensor

    def __init__(self, *, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3), **kwargs: Any) -> None:
        """``ns``/``weights``: n-gram orders and their weights; ``kwargs`` go to ``torchmetrics.Metric``."""
        super().__init__(**kwargs)
        if not ns or len(ns) != len(weights):
            raise ValueError(f"ns and weights must be non-empty and of equal length, got {ns!r} and {weights!r}")
        if any(not isinstance(n, int) or n < 1 for n in ns):
            raise ValueError(f"ns must hold positive integers (n-gram orders), got {ns!r}")
        if any(not math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be finite, got {weights!r}")
        self.ns = tuple(ns)
        self.weights = tuple(float(w) for w in weights)
        self.add_state("entropy_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("texts", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, generations: Sequence[str]) -> None:
        """Add generated texts (one string per example)."""
        if isinstance(generations, str):
            raise ValueError("generations is a single string; pass a list with one generation per example")
        total = sum(n_gram_entropy(text, ns=self.ns, weights=self.weights) for text in generations)
        self.entropy_sum += total
        self.texts += len(generations)

    def compute(self) -> torch.Tensor:
        require_examples(type(self).__name__, self.texts)
        return self.entropy_sum / self.texts
