"""Synthetic QA pairs -> triplets -> the three texts of SPEC §3, and the answer tokens inside them."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from datasets import load_dataset
from transformers import PreTrainedTokenizerBase

from seka_lightning.highlight import apply_chat_template
from seka_lightning.resources import resolve_data_path

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


class ChatTriplet(NamedTuple):
    """A triplet whose three texts are user messages in the tokenizer's chat template (the reference's ``--chat``
    building texts, for instruct models); the keys are still those of the answer tokens only. The template adds the
    generation prompt after the message, which a causal model's answer-token keys never see."""

    triplet: Triplet
    tokenizer: PreTrainedTokenizerBase

    @property
    def answer(self) -> str:
        """The answer of the wrapped triplet, whose tokens' keys are captured."""
        return self.triplet.answer

    def texts(self) -> tuple[str, str, str]:
        """The wrapped triplet's ``H``, ``H+`` and ``H-``, each rendered as a user message."""
        return tuple(apply_chat_template(self.tokenizer, text) for text in self.triplet.texts())


def check_chat_template(tokenizer: PreTrainedTokenizerBase, model: str) -> None:
    """Raise ``ValueError`` naming ``model`` and the fix when ``chat`` building texts are asked for a tokenizer that
    has no chat template (checked before any key is captured)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"chat=True wraps the building texts in the tokenizer's chat template, and {model}'s tokenizer has none; "
            "set chat: false (--model.chat false) for a base model, or use its instruct variant"
        )


def triplets_from_pair(pair: dict) -> tuple[Triplet, Triplet]:
    """``(c1, q1, a1, c2, q2, a2)`` -> ``(c1, q1, a1, q2)`` and ``(c2, q2, a2, q1)``."""
    return (
        Triplet(pair["context_1"], pair["question_1"], pair["answer_1"], pair["question_2"]),
        Triplet(pair["context_2"], pair["question_2"], pair["answer_2"], pair["question_1"]),
    )


def read_pairs(path: str | Path, *, max_samples: int | None = None) -> list[dict]:
    """Read QA pairs from a JSONL file, checking every line (see :func:`iter_pairs`)."""
    return list(iter_pairs(path, max_samples=max_samples))


def check_pairs(path: str | Path, *, max_samples: int | None = None) -> None:
    """Check the first ``max_samples`` pairs of a JSONL file (all when None) without keeping them."""
    deque(iter_pairs(path, max_samples=max_samples), maxlen=0)


def iter_pairs(path: str | Path, *, max_samples: int | None = None) -> Iterator[dict]:
    """Stream QA pairs from a JSONL file through 🤗 datasets, one line at a time (memory flat in the file's size).

    Every non-blank line must be a JSON object with the six fields as non-empty strings, each answer occurring in
    its context (case-insensitive, as the answer-token rule needs); an error names the file, the line and the fix.
    A relative ``path`` missing here but shipped with the package reads the shipped file (``resources``).

    The lines come from the ``text`` loader and are parsed with ``json``, which keeps every string as written: the
    ``json`` loader's Arrow type inference turns a column of ISO-date strings (answers such as ``"1999-01-01"``)
    into timestamps, and it reports bad lines without their line numbers.
    """
    path = resolve_data_path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"synthetic QA file {path} does not exist; generate one with `python -m seka_lightning.data.generator`"
        )
    lines = load_dataset("text", data_files=str(path), split="train", streaming=True)
    count = 0
    try:
        for line_no, row in enumerate(lines, start=1):
            if max_samples is not None and count >= max_samples:
                break
            if row["text"].strip():
                count += 1
                yield parse_pair(row["text"], f"{path}:{line_no}")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason}); save it as UTF-8 JSONL") from None
    if not count:
        raise ValueError(f"{path} holds no QA pairs; point data.path at a non-empty JSONL file")


def parse_pair(line: str, where: str) -> dict:
    """One JSONL line as a QA pair, checked; ``where`` (``file:line``) prefixes the errors."""
    try:
        pair = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}); the file is corrupt or truncated") from None
    if not isinstance(pair, dict):
        raise ValueError(f"{where}: a JSON {type(pair).__name__}, not an object; each line needs {list(PAIR_FIELDS)}")
    missing = [f for f in PAIR_FIELDS if not isinstance(pair.get(f), str) or not pair[f].strip()]
    if missing:
        raise ValueError(f"{where}: missing or empty fields {missing}; each line needs {list(PAIR_FIELDS)}")
    # an answer that does not occur in its context is not an error: SPEC §3 skips that triplet (counted as skipped)
    return pair


def iter_triplets(pairs: Iterable[dict]) -> Iterator[Triplet]:
    for pair in pairs:
        yield from triplets_from_pair(pair)


def check_length_window(window: int | None) -> None:
    """Raise ``ValueError`` unless ``window`` is None (no bucketing) or a number of batches >= 1."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(
            f"length_window must be a number of batches >= 1 (e.g. 8), or None to keep the data order; got {window!r}"
        )


def iter_bucketed(triplets: Iterable[Triplet], *, batch_size: int, window: int | None) -> Iterator[Triplet]:
    """``triplets`` with each run of ``window x batch_size`` of them sorted (stably) by the characters of their
    longest text, so consecutive batches of ``batch_size`` hold texts of similar length and their passes carry less
    padding. Deterministic; a triplet never leaves its run, and at most one run is held in memory. ``window=None``
    yields ``triplets`` as they are.

    The statistics are the same sums in another order: equal up to float64 rounding when the keys are computed in
    float64, but in bf16/fp16 another batch shape can round a key differently, which is why bucketing is opt-in.
    """
    check_length_window(window)
    if window is None:
        yield from triplets
        return
    run: list[Triplet] = []
    for triplet in triplets:
        run.append(triplet)
        if len(run) == window * batch_size:
            yield from sorted(run, key=_longest_text)
            run = []
    yield from sorted(run, key=_longest_text)


def _longest_text(triplet: Triplet) -> int:
    return max(len(text) for text in triplet.texts())


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
