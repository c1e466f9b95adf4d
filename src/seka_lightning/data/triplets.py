"""Synthetic QA pairs -> triplets -> the three texts of SPEC §3, and the answer tokens inside them."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

PAIR_FIELDS = ("context_1", "question_1", "answer_1", "context_2", "question_2", "answer_2")


class Triplet(NamedTuple):
    """One building example: a context, a question it answers, the answer, and an unrelated question."""

    context: str
    relevant_question: str
    answer: str
    irrelevant_question: str

    def texts(self) -> tuple[str, str, str]:
        """The neutral ``H``, positive ``H+`` and negative ``H-`` texts (SPEC §3, note the trailing space of H)."""
        return (
            f"Context: {self.context} ",
            f"Question: {self.relevant_question}\nContext: {self.context}",
            f"Question: {self.irrelevant_question}\nContext: {self.context}",
        )


def triplets_from_pair(pair: dict) -> tuple[Triplet, Triplet]:
    """``(c1, q1, a1, c2, q2, a2)`` -> ``(c1, q1, a1, q2)`` and ``(c2, q2, a2, q1)``."""
    return (
        Triplet(pair["context_1"], pair["question_1"], pair["answer_1"], pair["question_2"]),
        Triplet(pair["context_2"], pair["question_2"], pair["answer_2"], pair["question_1"]),
    )


def read_pairs(path: str | Path, *, max_samples: int | None = None) -> list[dict]:
    """Read QA pairs from a JSONL file, checking every line has the six fields as non-empty strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"synthetic QA file {path} does not exist; generate one with `python -m seka_lightning.data.generator`"
        )
    pairs: list[dict] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if max_samples is not None and len(pairs) >= max_samples:
                break
            if not line.strip():
                continue
            try:
                pair = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{line_no}: not valid JSON ({err.msg}); the file is corrupt or truncated"
                ) from None
            missing = [f for f in PAIR_FIELDS if not isinstance(pair.get(f), str) or not pair[f].strip()]
            if missing:
                raise ValueError(
                    f"{path}:{line_no}: missing or empty fields {missing}; each line needs {list(PAIR_FIELDS)}"
                )
            pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path} holds no QA pairs; point data.path at a non-empty JSONL file")
    return pairs


def iter_triplets(pairs: Sequence[dict]) -> Iterator[Triplet]:
    for pair in pairs:
        yield from triplets_from_pair(pair)


def answer_token_indices(offsets: Sequence[tuple[int, int]], text: str, answer: str) -> list[int]:
    """Tokens of the first case-insensitive occurrence of ``answer`` in ``text`` (the reference's rule).

    Tokens whose offsets lie inside the answer; fallbacks when none do: allow ``s >= start - 1``, then
    ``e <= end + 1``. Returns ``[]`` when the answer is absent.
    """
    start = text.lower().find(answer.lower())
    if start < 0:
        return []
    end = start + len(answer)
    real = [(i, s, e) for i, (s, e) in enumerate(offsets) if not (s == 0 and e == 0)]
    for lo, hi in ((start, end), (start - 1, end), (start, end + 1)):
        found = [i for i, s, e in real if s >= lo and e <= hi]
        if found:
            return found
    return []
