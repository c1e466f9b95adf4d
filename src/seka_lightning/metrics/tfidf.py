"""Consistency as TF-IDF cosine similarity between a generation and same-label reference texts.

The vectorizer reproduces scikit-learn's ``TfidfVectorizer()`` defaults without depending on it: lowercase,
tokens matching ``\\b\\w\\w+\\b``, raw term counts, smooth idf ``idf(t) = ln((1 + n) / (1 + df(t))) + 1`` over
the n fitted documents, and each vector l2-normalised. Terms unseen at fit time are dropped.

Following PASTA's BiasBios evaluation (``benchmarks.biasbios_prediction_evaluation``), a label's reference
vector is the mean of its texts' (normalised) TF-IDF vectors, and the score is the cosine between the
generation's vector and that mean. A generation with no known term scores 0 (ROME/PASTA would give NaN or
0 through a 1e-6 epsilon).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from seka_lightning.metrics._checks import check_same_length, require_examples

_TERM = re.compile(r"\b\w\w+\b")

SparseVector = dict[str, float]


def _dot(a: SparseVector, b: SparseVector) -> float:
    if len(b) < len(a):
        a, b = b, a
    return sum(w * b.get(t, 0.0) for t, w in a.items())


def cosine_similarity(a: SparseVector, b: SparseVector) -> float:
    """Cosine of two sparse vectors; 0 when either is the zero vector."""
    norms = math.sqrt(_dot(a, a)) * math.sqrt(_dot(b, b))
    return _dot(a, b) / norms if norms > 0 else 0.0


class TfidfVectorizer:
    """Plain-Python TF-IDF with scikit-learn's default formula (see the module docstring)."""

    def __init__(self, idf: Mapping[str, float]) -> None:
        self.idf = dict(idf)

    @staticmethod
    def terms(text: str) -> list[str]:
        """Lowercased tokens of two or more word characters (scikit-learn's default ``token_pattern``)."""
        return _TERM.findall(text.lower())

    @classmethod
    def fit(cls, corpus: Iterable[str]) -> TfidfVectorizer:
        """Learn the vocabulary and smooth idf from ``corpus`` (one document per string)."""
        document_frequency: Counter[str] = Counter()
        n = 0
        for document in corpus:
            document_frequency.update(set(cls.terms(document)))
            n += 1
        if n == 0 or not document_frequency:
            raise ValueError("the TF-IDF corpus has no terms; pass reference texts with words in them")
        return cls({t: math.log((1 + n) / (1 + df)) + 1.0 for t, df in document_frequency.items()})

    def transform(self, text: str) -> SparseVector:
        """The l2-normalised TF-IDF vector of ``text`` as ``{term: weight}`` (empty if no known term)."""
        counts = Counter(t for t in self.terms(text) if t in self.idf)
        weights = {t: c * self.idf[t] for t, c in counts.items()}
        norm = math.sqrt(sum(w * w for w in weights.values()))
        return {t: w / norm for t, w in weights.items()} if norm > 0 else {}


def mean_vector(vectors: Sequence[SparseVector]) -> SparseVector:
    """Element-wise mean of sparse vectors."""
    total: Counter[str] = Counter()
    for vector in vectors:
        total.update(vector)
    return {t: w / len(vectors) for t, w in total.items()}


class TfidfConsistency(Metric):
    """Mean TF-IDF cosine between each generation and the reference texts of its label.

    ``references`` maps each label to its reference texts (e.g. the bios of that occupation). The vectorizer
    is fitted once, on ``corpus`` if given, otherwise on all reference texts (one document each).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    similarity_sum: torch.Tensor
    texts: torch.Tensor

    def __init__(
        self, references: Mapping[str, Sequence[str]], *, corpus: Sequence[str] | None = None, **kwargs: Any
    ) -> None:
        """``kwargs`` go to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``)."""
        super().__init__(**kwargs)
        if not references:
            raise ValueError("references is empty; pass {label: [reference texts]} for every evaluated label")
        empty = [label for label, texts in references.items() if isinstance(texts, str) or len(texts) == 0]
        if empty:
            raise ValueError(f"references for labels {empty} must be non-empty lists of texts")
        fit_texts = corpus if corpus is not None else [t for texts in references.values() for t in texts]
        self.vectorizer = TfidfVectorizer.fit(fit_texts)
        self.reference_vectors = {
            label: mean_vector([self.vectorizer.transform(t) for t in texts]) for label, texts in references.items()
        }
        self.add_state("similarity_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("texts", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def similarity(self, generation: str, label: str) -> float:
        """Cosine between one generation and its label's reference vector (for per-example records)."""
        if label not in self.reference_vectors:
            raise ValueError(f"label {label!r} has no reference texts; known labels: {sorted(self.reference_vectors)}")
        return cosine_similarity(self.vectorizer.transform(generation), self.reference_vectors[label])

    def update(self, generations: Sequence[str], labels: Sequence[str]) -> None:
        """Add generations with their gold labels (one of each per example)."""
        check_same_length(generations=generations, labels=labels)
        self.similarity_sum += sum(self.similarity(g, label) for g, label in zip(generations, labels, strict=True))
        self.texts += len(generations)

    def compute(self) -> torch.Tensor:
        require_examples(type(self).__name__, self.texts)
        return self.similarity_sum / self.texts
