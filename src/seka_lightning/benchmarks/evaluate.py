"""One evaluation loop: a method over a benchmark's batches, scored by the benchmark's scorer.

``seka predict`` (through :class:`~seka_lightning.lit.evaluator.BenchmarkEvaluator`, one :func:`evaluate_batch` per
step), ``seka search`` and a results runner all score through these functions, so they see the same tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from seka_lightning.benchmarks.base import BenchmarkDataModule, BenchmarkScorer, RecordError, RecordId
from seka_lightning.highlight import encode_spans, template_spans
from seka_lightning.methods import HighlightMethod

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` returns: one prediction row per scored record, the metrics, the skipped records."""

    records: list[dict[str, Any]]
    metrics: dict[str, float]
    skipped_highlight: list[RecordId]
    """Ids of the records left out because their highlight covers no whole token (the same for every method)."""


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, Any]],
    *,
    chat: bool = False,
    add_special_tokens: bool = False,
) -> dict[str, torch.Tensor]:
    """Encode benchmark examples (``text`` + character ``spans``) exactly as every method will see them.

    The spans travel as offsets, through the chat template too (:func:`template_spans`): the text is never re-marked,
    so whatever characters it contains, it cannot add or move a highlight.
    """
    texts, spans = [], []
    for i, example in enumerate(examples):
        text, row_spans = example["text"], [(start, end) for start, end in example["spans"]]
        if chat:
            text, row_spans = template_spans(tokenizer, text, row_spans, index=i)
        texts.append(text)
        spans.append(row_spans)
    return encode_spans(tokenizer, texts, spans, add_special_tokens=add_special_tokens)


def evaluate_batch(
    method: HighlightMethod,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    scorer: BenchmarkScorer,
    batch: list[dict[str, Any]],
    *,
    device: torch.device | str,
    chat: bool = False,
    add_special_tokens: bool = False,
) -> tuple[list[dict[str, Any]], list[RecordId]]:
    """Score one batch (``method.setup`` must have run): its prediction rows and the ids of the records skipped.

    A record whose highlight cannot be encoded is skipped with a warning; any other failure names the records.
    """
    encode = {"chat": chat, "add_special_tokens": add_special_tokens}
    try:
        kept, skipped, enc = batch, [], encode_examples(tokenizer, batch, **encode)
    except ValueError:
        kept, skipped = _encodable(tokenizer, scorer, batch, **encode)
        enc = encode_examples(tokenizer, kept, **encode) if kept else None
    if enc is None:
        return [], skipped
    enc = {k: v.to(device) for k, v in enc.items()}
    try:
        records = scorer.score(method, model, tokenizer, enc, kept)
    except RecordError:
        raise
    except ValueError as error:
        ids = [scorer.record_id(example) for example in kept]
        raise ValueError(f"{scorer.benchmark}: scoring the batch of records {ids} failed: {error}") from error
    rows = [
        {
            "uid": example["uid"],
            "text": example["text"],
            "highlights": [example["text"][s:e] for s, e in example["spans"]],
            **record,
        }
        for example, record in zip(kept, records, strict=True)
    ]
    return rows, skipped


@torch.no_grad()
def evaluate(
    method: HighlightMethod,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    benchmark: BenchmarkDataModule,
    *,
    device: torch.device | str | None = None,
    chat: bool = False,
    add_special_tokens: bool = False,
) -> Evaluation:
    """Run ``method`` over every batch of ``benchmark`` with a fresh scorer of the benchmark; records and metrics.

    ``device`` is where the inputs go (None = the device of the model's first parameter).
    """
    device = next(model.parameters()).device if device is None else torch.device(device)
    scorer = benchmark.scorer().to(device)
    method.setup(model, tokenizer)
    records: list[dict[str, Any]] = []
    skipped: list[RecordId] = []
    for batch in benchmark.batches():
        rows, batch_skipped = evaluate_batch(
            method, model, tokenizer, scorer, batch, device=device, chat=chat, add_special_tokens=add_special_tokens
        )
        records += rows
        skipped += batch_skipped
    return Evaluation(records, scorer.compute(), skipped)


def _encodable(
    tokenizer: PreTrainedTokenizerBase,
    scorer: BenchmarkScorer,
    batch: list[dict[str, Any]],
    *,
    chat: bool,
    add_special_tokens: bool,
) -> tuple[list[dict[str, Any]], list[RecordId]]:
    """The batch without records whose highlight cannot be encoded (it covers no whole token), and their ids; any
    other encoding error names the record's benchmark id.

    A record counts as a highlight failure when it fails alone but encodes without its spans. The skip depends on the
    tokenizer only, so every method skips the same records.
    """
    encode = {"chat": chat, "add_special_tokens": add_special_tokens}
    kept, skipped = [], []
    for example in batch:
        record_id = scorer.record_id(example)
        try:
            encode_examples(tokenizer, [example], **encode)
        except ValueError as error:
            try:
                encode_examples(tokenizer, [{**example, "spans": []}], **encode)
            except ValueError:
                raise RecordError(f"{scorer.benchmark} record {record_id!r}: {error}") from error
            log.warning(
                "%s record %r skipped: its highlight cannot be encoded (%s)", scorer.benchmark, record_id, error
            )
            skipped.append(record_id)
            continue
        kept.append(example)
    return kept, skipped
