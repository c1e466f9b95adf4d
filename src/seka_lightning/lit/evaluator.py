"""BenchmarkEvaluator: ``seka predict`` over a benchmark DataModule with any highlighting method.

The module only wires: each step is one :func:`~seka_lightning.benchmarks.evaluate_batch`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from seka_lightning.benchmarks import BenchmarkScorer, encode_examples, evaluate_batch
from seka_lightning.lit.frozen import FrozenModelModule
from seka_lightning.methods import HighlightMethod
from seka_lightning.provenance import tokenizer_sha256

log = logging.getLogger(__name__)

__all__ = ["BenchmarkEvaluator", "encode_examples"]


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
        static_decoding_fuse: bool = False,
        static_decoding_split_kv: bool = False,
        static_decoding_prompt_pass: str = "batch",
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
            static_decoding_fuse: the static decoder's decode steps run each layer's q/k/v, and its MLP's gate/up, as
                one matmul each (``StaticGreedyDecoder(fuse_projections=True)``; the same tokens up to rounding).
            static_decoding_split_kv: the static decoder's decode steps attend through the split-KV Triton kernel
                (``StaticGreedyDecoder(split_kv=True)``; CUDA with Triton; the same tokens up to rounding).
            static_decoding_prompt_pass: ``rows`` runs a left-padded batch's prompts one row at a time without their
                padding (``StaticGreedyDecoder(prompt_pass="rows")``; no sliding-window models; the same tokens up to
                rounding); ``batch`` runs them as one padded batch.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["method"])
        if static_decoding is not None:
            from seka_lightning.fast_decode import StaticDecoding

            method = StaticDecoding(
                method,
                max_length=static_decoding,
                backend=static_decoding_backend,
                fuse_projections=static_decoding_fuse,
                split_kv=static_decoding_split_kv,
                prompt_pass=static_decoding_prompt_pass,
            )
        self.method = method
        self.load_frozen_model(pretrained, dtype=dtype, attn_implementation=attn_implementation, device_map=device_map)
        self.scorer: BenchmarkScorer | None = None
        self.data_settings: dict[str, Any] = {}
        self.data_counts: dict[str, int] = {}
        self.skipped_highlight: list[Any] = []
        self._started = 0.0
        # set by BenchmarkWriter when it resumes an interrupted run: the saved rows of the finished batches
        self.replay: dict[int, list[dict[str, Any]]] = {}
        self.resumed = {"batches": 0, "wall_time_s": 0.0}

    def on_predict_start(self) -> None:
        datamodule = self.trainer.datamodule
        self.scorer = datamodule.scorer().to(self.device)
        self.data_settings = datamodule.describe()
        self.data_counts = datamodule.counts()
        self.skipped_highlight: list[Any] = []
        self.replay, self.resumed = {}, {"batches": 0, "wall_time_s": 0.0}
        if hasattr(self.method, "reserve_rows"):  # static decoding: one decoder of the batch size, from any batch
            self.method.reserve_rows(min(datamodule.batch_size, max(1, len(datamodule.examples))))
        self.method.setup(self.model, self.tokenizer)
        self._started = time.perf_counter()

    @torch.no_grad()
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        if batch_idx in self.replay:  # finished before an interruption: its rows and metric updates are restored
            return self.replay.pop(batch_idx)
        hp = self.hparams
        rows, skipped = evaluate_batch(
            self.method,
            self.model,
            self.tokenizer,
            self.scorer,
            batch,
            device=self.input_device,
            chat=hp.chat,
            add_special_tokens=hp.add_special_tokens,
        )
        self.skipped_highlight += skipped
        return rows

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
            "wall_time_s": self.resumed["wall_time_s"] + time.perf_counter() - self._started,
            "tokenizer_sha256": tokenizer_sha256(self.tokenizer),
        }
        resumed = self._total(self.resumed["batches"])
        if resumed:
            result["counts"]["resumed_batches"] = resumed
        if "note" in self.data_settings:
            result["note"] = self.data_settings["note"]
        return result
