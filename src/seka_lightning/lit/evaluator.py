"""BenchmarkEvaluator: ``seka predict`` over a benchmark DataModule with any highlighting method."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from seka_lightning.highlight import encode_spans, template_spans
from seka_lightning.lit.frozen import FrozenModelModule
from seka_lightning.methods import HighlightMethod
from seka_lightning.scoring import BenchmarkScorer, RecordError

log = logging.getLogger(__name__)


def encode_examples(
    tokenizer, examples: list[dict[str, Any]], *, chat: bool = False, add_special_tokens: bool = False
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


class BenchmarkEvaluator(FrozenModelModule):
    """Runs ``method`` on every batch of the benchmark DataModule and scores it with the DataModule's scorer.

    Every method sees the same tokens: baselines that ignore highlights get the same plain prompt.
    """

    def __init__(
        self,
        pretrained: str,
        method: HighlightMethod,
        *,
        dtype: str = "float32",
        chat: bool = False,
        add_special_tokens: bool = False,
        attn_implementation: str = "sdpa",
        device_map: str | dict | None = None,
        static_decoding: int | None = None,
        static_decoding_backend: str = "inductor",
    ) -> None:
        """
        Args:
            pretrained: hub id, local path, or ``embedded:smollm2-135m`` / ``embedded:gemma3-270m``.
            method: the highlighting method (``seka_lightning.methods.HighlightMethod`` = none, ``SekaMethod``, ...).
            dtype: model dtype.
            chat: wrap prompts as user messages with the tokenizer's chat template.
            add_special_tokens: let the tokenizer add its special tokens (BOS for base models such as Gemma-3).
            attn_implementation: ``sdpa`` or ``eager``.
            device_map: shard a model too large for one GPU over this process's GPUs (``auto``, ``balanced`` or a
                ``{module: device}`` map; run with ``--trainer.devices 1``); None = Lightning places the whole model.
            static_decoding: generate through ``StaticGreedyDecoder`` with this many cache positions (longest prompt
                + new tokens; one compiled decode step for every batch); methods confined to the prompt pass only
                (none, SEKA, random, AdaSEKA). None = ``model.generate``.
            static_decoding_backend: ``torch.compile`` backend of the static decoder.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["method"])
        if static_decoding is not None:
            from seka_lightning.fast_decode import StaticDecoding

            method = StaticDecoding(method, max_length=static_decoding, backend=static_decoding_backend)
        self.method = method
        self.load_frozen_model(pretrained, dtype=dtype, attn_implementation=attn_implementation, device_map=device_map)
        self.scorer: BenchmarkScorer | None = None
        self.data_settings: dict[str, Any] = {}
        self.data_counts: dict[str, int] = {}
        self.skipped_highlight: list[Any] = []
        self._started = 0.0

    def on_predict_start(self) -> None:
        datamodule = self.trainer.datamodule
        self.scorer = datamodule.scorer().to(self.device)
        self.data_settings = datamodule.describe()
        self.data_counts = datamodule.counts()
        self.skipped_highlight: list[Any] = []
        self.method.setup(self.model, self.tokenizer)
        self._started = time.perf_counter()

    @torch.no_grad()
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        batch, enc = self._encode_batch(batch)
        if not batch:
            return []
        enc = {k: v.to(self.input_device) for k, v in enc.items()}
        try:
            records = self.scorer.score(self.method, self.model, self.tokenizer, enc, batch)
        except RecordError:
            raise
        except ValueError as error:
            ids = [self.scorer.record_id(example) for example in batch]
            raise ValueError(f"{self.scorer.benchmark}: scoring the batch of records {ids} failed: {error}") from error
        return [
            {
                "uid": example["uid"],
                "text": example["text"],
                "highlights": [example["text"][s:e] for s, e in example["spans"]],
                **record,
            }
            for example, record in zip(batch, records, strict=True)
        ]

    def _encode(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        hp = self.hparams
        return encode_examples(self.tokenizer, batch, chat=hp.chat, add_special_tokens=hp.add_special_tokens)

    def _encode_batch(self, batch: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor] | None]:
        """The batch's encodable records and their encoding (None when no record is left)."""
        try:
            return batch, self._encode(batch)
        except ValueError:
            kept = self._encodable(batch)
        return kept, (self._encode(kept) if kept else None)

    def _encodable(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The batch without records whose highlight cannot be encoded (it covers no whole token), which are
        skipped with a warning and counted; any other encoding error names the record's benchmark id.

        A record counts as a highlight failure when it fails alone but encodes without its spans. The skip depends
        on the tokenizer only, so every method skips the same records.
        """
        kept = []
        for example in batch:
            record_id = self.scorer.record_id(example)
            try:
                self._encode([example])
            except ValueError as error:
                try:
                    self._encode([{**example, "spans": []}])
                except ValueError:
                    raise RecordError(f"{self.scorer.benchmark} record {record_id!r}: {error}") from error
                log.warning(
                    "%s record %r skipped: its highlight cannot be encoded (%s)",
                    self.scorer.benchmark,
                    record_id,
                    error,
                )
                self.skipped_highlight.append(record_id)
                continue
            kept.append(example)
        return kept

    def _total(self, count: int) -> int:
        """``count`` summed over the DDP ranks (every rank must call this)."""
        total = self.trainer.strategy.reduce(torch.tensor(count, device=self.device), reduce_op="sum")
        return int(total.item())

    def results(self) -> dict[str, Any]:
        """Metrics (reduced over ranks: every rank must call this), the run's settings and counts."""
        skipped = self._total(len(self.skipped_highlight))
        if skipped:
            log.warning(
                "%s: %d records were skipped because their highlight covers no whole token (see counts)",
                self.scorer.benchmark,
                skipped,
            )
        result = {
            "metrics": self.scorer.compute(),
            "method": self.method.describe(),
            "model": self.hparams.pretrained,
            "config": {**{k: v for k, v in self.hparams.items() if k != "pretrained"}, "data": self.data_settings},
            "counts": {**self.data_counts, "skipped_highlight": skipped, "world_size": self.trainer.world_size},
            "wall_time_s": time.perf_counter() - self._started,
        }
        if "note" in self.data_settings:
            result["note"] = self.data_settings["note"]
        return result
