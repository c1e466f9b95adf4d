"""ProjectionBuilder: ``seka fit`` streams key statistics over synthetic QA triplets, then runs one SVD step."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import Metric

from seka_lightning import __version__
from seka_lightning.bank import ProjectionBank, stats_path_for
from seka_lightning.build import accumulate_triplets, no_statistics_error
from seka_lightning.capture import check_pack_tokens, check_packable, packing_metadata
from seka_lightning.data.triplets import Triplet, check_chat_template
from seka_lightning.families import resolve_layout
from seka_lightning.files import BANK, STATISTICS, check_output
from seka_lightning.layers import parse_layers
from seka_lightning.lit.callbacks import BatchCheckpoint, BuildStopped, StopSignal, agree_to_stop
from seka_lightning.lit.frozen import FrozenModelModule
from seka_lightning.models import model_id
from seka_lightning.projections import DEFAULT_HEAD_FILTER, DEFAULT_MIN_DIFF, validate_hyperparameters
from seka_lightning.provenance import SOURCE_SHA256_AT_IMPORT, weights_hash
from seka_lightning.stats import KeyStatistics, KeySums, require_finite_sums

log = logging.getLogger(__name__)

BUILD_RECORD = "seka_build"
# what the sums depend on; top_pct, min_diff and output only shape the final SVD, so a resume may change them
STATISTICS_SETTINGS = (
    "model.pretrained",
    "model.layers",
    "model.dtype",
    "model.positive_only",
    "model.attention_ratio",
    "model.chat",
    "model.pack_tokens",
    "data.class",
    "data.path",
    "data.fingerprint",
    "data.batch_size",
    "data.max_samples",
    "data.length_window",
    "trainer.world_size",
    "code.source_sha256",  # the package's Python files (provenance.source_sha256): the capture code makes the sums
)
# settings added to the record later, with the value every build before them had (so their checkpoints resume)
RECORD_DEFAULTS = {"model.chat": False, "model.pack_tokens": None}
# recorded later, with no value to assume for older checkpoints: not checked on theirs (as before it was recorded)
UNRECORDED = ("code.source_sha256",)
RESUME_NOTES = {"code.source_sha256": " (the package's code changed since the checkpoint: resume with that code)"}
DEFAULT_STOP_CHECK_EVERY_N_BATCHES = 50


class Count(Metric):
    """A DDP-summed count of Python ints. Adding one launches a kernel and copies nothing to the device, so it never
    makes the host wait for the GPU (``SumMetric.update`` copies its input over and NaN-checks it on the host)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        # SumMetric's state name, so checkpoints written when the counters were SumMetrics still resume
        self.add_state("sum_value", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum", persistent=True)

    def update(self, value: int) -> None:
        self.sum_value += value

    def compute(self) -> torch.Tensor:
        return self.sum_value


def _local_path(value: str | None) -> str | None:
    """A path that exists, made absolute (so a resume from another folder compares equal); other values as given."""
    return str(Path(value).resolve()) if value and Path(value).exists() else value


class ProjectionBuilder(FrozenModelModule):
    """Holds the frozen model; each training step adds a batch of triplets' answer-token keys to float64 sums
    (DDP-reduced by sum); at the end rank 0 derives the bank (SPEC §3) and writes it with its statistics.

    Checkpoints hold the sums and a ``seka_build`` record of the settings they depend on; a resume with other
    statistics settings is refused. SIGTERM/SIGINT stop the build at a batch boundary that all ranks agree on (one
    all-reduce every ``sigterm_check_every_n_batches`` of the strategy, 50 by default, at every ``BatchCheckpoint``
    and at the last batch; every batch on one process), save ``last.ckpt`` and exit ``128 + signum``. Agreeing at
    intervals keeps batches free of per-batch host syncs, at the price of a stop that may take that many batches.
    """

    def __init__(
        self,
        pretrained: str,
        *,
        dtype: str = "float32",
        layers: str = "all",
        top_pct: float = 0.9,
        min_diff: float = DEFAULT_MIN_DIFF,
        head_filter: str = DEFAULT_HEAD_FILTER,
        positive_only: bool = False,
        attention_ratio: float | None = None,
        chat: bool = False,
        pack_tokens: int | None = None,
        output: str = "checkpoints/bank.safetensors",
        attn_implementation: str = "sdpa",
        device_map: str | dict | None = None,
        overwrite: bool = False,
    ) -> None:
        """
        Args:
            pretrained: hub id, local path, or ``embedded:smollm2-135m`` / ``embedded:gemma3-270m``.
            dtype: model dtype (float32, bfloat16, float16, float64); statistics are float64 regardless.
            layers: decoder layers to build for: ``all``, ``lastN``, ``firstN`` or comma-separated ids.
            top_pct: fraction of the singular spectrum kept by P+ (its complement gives P-), in (0, 1].
            min_diff: heads whose head-filter value is below this are skipped (zero projectors); a value that skips
                every head is an error.
            head_filter: how the head-filter value is measured: ``relative`` (default; ``sqrt(D / trace(A0))``, the
                RMS distance between positive and negative keys relative to the RMS key norm, independent of N) or
                ``reference`` (the reference's ``sqrt(D) / N``, with ``D = Σ||h+ - h-||²``).
            positive_only: build an AdaSEKA expert (``||h+ - h||`` filter, NaN for skipped heads); the negative
                text is then never run.
            attention_ratio: AdaSEKA triplet filter (SPEC §5; the reference uses 1.2): keep a triplet only if the
                attention from the last token to the answer, summed over all heads of the selected layers, grows by
                at least this ratio from H to H+ (eager attention for those passes). None = no filter.
            chat: build from the texts wrapped as user messages in the tokenizer's chat template (the reference's
                ``--chat``), for instruct models; a tokenizer without a chat template is refused once it loads.
            pack_tokens: pack each batch's texts into rows of this many tokens (e.g. 512), each text attending only
                to itself, instead of one padded row per text: far less padding, so faster on a GPU; causal models
                only. The statistics are the same sums up to the rounding of other matmul shapes in bf16/fp16.
                None = one right-padded row per text.
            output: the bank file (``.safetensors``); its statistics go beside it as ``*.stats.safetensors``.
            attn_implementation: ``sdpa`` or ``eager`` (keys are the same either way).
            device_map: shard a model too large for one GPU over this process's GPUs (``auto``, ``balanced`` or a
                ``{module: device}`` map; run with ``--trainer.devices 1``); None = Lightning places the whole model.
            overwrite: replace an existing bank and statistics at ``output`` (checked before the model loads).
        """
        super().__init__()
        validate_hyperparameters(top_pct, min_diff, head_filter)
        if attention_ratio is not None and not attention_ratio > 0:
            raise ValueError(f"attention_ratio must be > 0 (the reference uses 1.2) or None, got {attention_ratio}")
        check_pack_tokens(pack_tokens)
        if not output.endswith(".safetensors"):
            raise ValueError(f"output must end with .safetensors, got {output!r}")
        flag = "--model.overwrite true"
        check_output(output, kind=BANK, overwrite=overwrite, flag=flag)
        check_output(stats_path_for(output), kind=STATISTICS, overwrite=overwrite, flag=flag)
        self.save_hyperparameters()
        self.load_frozen_model(pretrained, dtype=dtype, attn_implementation=attn_implementation, device_map=device_map)
        if chat:
            check_chat_template(self.tokenizer, pretrained)
        self.layout = resolve_layout(self.model)
        check_packable(self.model, self.layout, pack_tokens)  # once the model is known, before any batch
        self.layer_ids = parse_layers(layers, self.layout.num_layers)
        self.stats = KeyStatistics(len(self.layer_ids), self.layout.num_kv_heads, self.layout.head_dim)
        # the triplet counts resume with the sums (persistent states), so the metadata stays exact
        self.kept, self.skipped, self.filtered = Count(), Count(), Count()
        self.strict_loading = False  # checkpoints hold the statistics, not the (pretrained) model weights
        self.automatic_optimization = False  # nothing is optimised: each step only adds to the sums
        self._started = 0.0
        self._examples = 0
        self.stop_signal = StopSignal()
        self._code_sha256: str | None = None  # rank 0's code hash, taken when a checkpoint is loaded

    def configure_optimizers(self) -> None:
        return None

    def on_train_start(self) -> None:
        self._started = time.perf_counter()
        self._examples = 0
        # here, after Lightning has registered its own handlers (which it restores when fit ends)
        self.stop_signal.install()

    def training_step(self, batch: list[Triplet], batch_idx: int) -> None:
        if batch:
            hp = self.hparams
            counts = accumulate_triplets(
                self.stats,
                self.model,
                self.tokenizer,
                self.layout,
                self.layer_ids,
                batch,
                device=self.input_device,
                positive_only=hp.positive_only,
                attention_ratio=hp.attention_ratio,
                chat=hp.chat,
                pack_tokens=hp.pack_tokens,
            )
            self.kept.update(counts.kept)
            self.filtered.update(counts.filtered)
            self.skipped.update(counts.skipped)
        self._examples += len(batch)
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        # a CPU tensor: logging a Python number would copy it to the GPU, and the progress bar would read it back
        rate = torch.tensor(self._examples * self.trainer.world_size / elapsed)
        self.log("examples_per_s", rate, prog_bar=True, batch_size=1)
        return None

    def on_train_batch_end(self, outputs: Any, batch: list[Triplet], batch_idx: int) -> None:
        if self._agree_now(batch_idx):
            signum = agree_to_stop(self.trainer, self.stop_signal.signum)
            if signum is not None:
                raise BuildStopped(signum)  # on every rank at this batch; BatchCheckpoint saves in on_exception

    def _agree_now(self, batch_idx: int) -> bool:
        """Whether the ranks compare their stop flags after this batch (the same answer on every rank)."""
        trainer = self.trainer
        if trainer.world_size == 1:
            return True  # no collective needed: the flag is read on the host
        every = getattr(trainer.strategy, "sigterm_check_every_n_batches", DEFAULT_STOP_CHECK_EVERY_N_BATCHES)
        checkpoint_due = any(cb.due(batch_idx) for cb in trainer.callbacks if isinstance(cb, BatchCheckpoint))
        return checkpoint_due or (batch_idx + 1) % every == 0 or batch_idx + 1 >= trainer.num_training_batches

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keep only the statistics and counters, summed over ranks (the data position needs the same device count).
        state = {}
        for metric_name in ("stats", "kept", "skipped", "filtered"):
            metric = getattr(self, metric_name)
            with metric.sync_context(should_unsync=True):
                for key, value in metric.state_dict().items():
                    state[f"{metric_name}.{key}"] = value.detach().clone().cpu()
        # never checkpoint NaN sums (resuming from them could not recover); the sums are global, so every rank
        # raises alike, after the metrics are unsynced
        require_finite_sums(value for key, value in state.items() if key.startswith("stats."))
        checkpoint["state_dict"] = state
        checkpoint[BUILD_RECORD] = self.build_record()

    def build_record(self) -> dict[str, Any]:
        """The settings the statistics depend on, as this run was started (see ``STATISTICS_SETTINGS``)."""
        hp = self.hparams
        datamodule = getattr(self._trainer, "datamodule", None)
        return {
            "model.pretrained": _local_path(hp.pretrained),
            "model.layers": list(self.layer_ids),
            "model.dtype": hp.dtype,
            "model.positive_only": hp.positive_only,
            "model.attention_ratio": hp.attention_ratio,
            "model.chat": hp.chat,
            "model.pack_tokens": hp.pack_tokens,
            "data.class": None if datamodule is None else type(datamodule).__qualname__,
            "data.path": _local_path(getattr(datamodule, "path", None)),
            "data.fingerprint": self._data_fingerprint(),
            "data.batch_size": getattr(datamodule, "batch_size", None),
            "data.max_samples": getattr(datamodule, "max_samples", None),
            "data.length_window": getattr(datamodule, "length_window", None),
            "trainer.world_size": None if self._trainer is None else self._trainer.world_size,
            "code.source_sha256": self._code_sha256 or SOURCE_SHA256_AT_IMPORT,
        }

    def check_resume(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose statistics were built with other settings than this command line's."""
        where = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
        saved = checkpoint.get(BUILD_RECORD)
        if saved is None:
            raise ValueError(
                f"{where} has no '{BUILD_RECORD}' record of the settings its statistics were built with (it was "
                "written by an older seka-lightning), so it cannot be checked against this command line; start the "
                "build again without --ckpt_path"
            )
        current = self.build_record()
        # a setting recorded later is checked only where both sides know it (an older checkpoint, unknown code)
        checked = [
            name
            for name in STATISTICS_SETTINGS
            if name not in UNRECORDED or (saved.get(name) is not None and current[name] is not None)
        ]
        saved = {name: saved.get(name, RECORD_DEFAULTS.get(name)) for name in checked}
        differ = [
            f"{name}: checkpoint {saved[name]!r}, command line {current[name]!r}{RESUME_NOTES.get(name, '')}"
            for name in checked
            if saved[name] != current[name]
        ]
        if differ:
            raise ValueError(
                f"cannot resume from {where}: these settings differ from the build that wrote it, and the statistics "
                "would mix: " + "; ".join(differ) + ". Resume with the checkpoint's settings, or start a new build "
                "without --ckpt_path (top_pct, min_diff and output may differ on resume)"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is None:
            return
        # every rank checks against rank 0's code hash, so that all of them refuse or none does
        self._code_sha256 = self.trainer.strategy.broadcast(SOURCE_SHA256_AT_IMPORT, src=0)
        self.check_resume(checkpoint)
        if self.trainer.global_rank != 0:
            # the saved sums are global: only rank 0 restores them, so the final all-reduce counts them once
            checkpoint["state_dict"] = {k: torch.zeros_like(v) for k, v in checkpoint["state_dict"].items()}

    def on_train_end(self) -> None:
        sums = self.stats.compute()
        kept, skipped = int(self.kept.compute().item()), int(self.skipped.compute().item())
        filtered = int(self.filtered.compute().item())
        self._write_bank(sums, kept=kept, skipped=skipped, filtered=filtered)
        if self.stop_signal.signum is not None:
            log.warning("the signal came after the last batch, so the build finished; the command still exits non-zero")

    @rank_zero_only
    def _write_bank(self, sums: KeySums, *, kept: int, skipped: int, filtered: int) -> None:
        if kept == 0:
            raise no_statistics_error(filtered)
        hp = self.hparams
        metadata = {
            "model_id": model_id(self.model) if not hp.pretrained.startswith("embedded:") else hp.pretrained,
            "weights_sha256": weights_hash(hp.pretrained)["sha256"],
            "family": self.layout.family,
            "num_layers": self.layout.num_layers,
            "feature": "none",
            "triplets_used": kept,
            "triplets_skipped": skipped,
            "negative_text": not hp.positive_only,
            "attention_ratio": hp.attention_ratio,
            "triplets_filtered_attention": filtered,
            "chat": hp.chat,
            "data_fingerprint": self._data_fingerprint(),
            "seka_lightning_version": __version__,
            "model_dtype": hp.dtype,
            **packing_metadata(hp.pack_tokens),
        }
        bank = ProjectionBank.from_statistics(
            sums,
            layers=self.layer_ids,
            top_pct=hp.top_pct,
            min_diff=hp.min_diff,
            head_filter=hp.head_filter,
            positive_only=hp.positive_only,
            metadata=metadata,
        )
        stats_path = stats_path_for(hp.output)
        statistics_metadata = {**metadata, "layers": self.layer_ids, "head_dim": self.layout.head_dim}
        bank.save_with_statistics(hp.output, sums, statistics_metadata=statistics_metadata)
        log.info(
            "wrote %s (%d/%d heads kept, N=%d rows from %d triplets; %d skipped) and %s",
            hp.output,
            bank.metadata["heads_kept"],
            bank.metadata["heads_total"],
            bank.metadata["num_rows"],
            kept,
            skipped,
            stats_path,
        )

    def _data_fingerprint(self) -> str | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        return datamodule.fingerprint() if hasattr(datamodule, "fingerprint") else None
