"""Prediction writers: per-rank JSONL parts merged by rank 0 into one file (plain or gzipped JSONL), written
atomically."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.table import Table
from torchmetrics import Metric

from seka_lightning import files
from seka_lightning.effect import highlight_effect, summary_line
from seka_lightning.evidence import METRIC_RESULT, PREDICTIONS, summarize, write_predictions
from seka_lightning.files import BENCHMARK_RESULTS, check_output, write_json, write_jsonl
from seka_lightning.lit.callbacks import BuildStopped, StopSignal, agree_to_stop, fewest_over_ranks
from seka_lightning.lit.partial import (
    PartialRun,
    fingerprint,
    load_metric_states,
    load_partial,
    metric_states,
    partial_files,
    partial_path,
    save_partial,
)
from seka_lightning.provenance import (
    SOURCE_SHA256_AT_IMPORT,
    git_state,
    input_files,
    library_versions,
    run_provenance,
    tokenizer_sha256,
    weights_hash,
)
from seka_lightning.significance import BOOTSTRAP_SEED

log = logging.getLogger(__name__)

OVERWRITE_FLAG = "the writer's `overwrite: true` init arg"


def merge_rank_parts(
    trainer: L.Trainer,
    predictions: list,
    output: Path,
    *,
    key: str,
    write: Callable[[Path, list[dict[str, Any]]], Path] = write_jsonl,
) -> list[dict[str, Any]] | None:
    """Each rank writes its records to ``output.rankN``; rank 0 merges them (sorted by ``key``) into ``output``
    with ``write`` (plain JSONL by default).

    Returns the merged records on rank 0, None elsewhere.
    """
    part = output.with_name(f"{output.name}.rank{trainer.global_rank}")
    write_jsonl(part, [record for batch in predictions for record in batch])
    trainer.strategy.barrier("merge_rank_parts")
    if not trainer.is_global_zero:
        return None
    records = []
    for rank in range(trainer.world_size):
        rank_part = output.with_name(f"{output.name}.rank{rank}")
        # split on "\n" only: generations may contain U+2028 and friends, which str.splitlines() would break
        records += [json.loads(line) for line in rank_part.read_text(encoding="utf-8").split("\n") if line]
        rank_part.unlink()
    records.sort(key=lambda r: r[key])
    write(output, records)
    return records


class ComparisonWriter(BasePredictionWriter):
    """Writes ``{prompt, unsteered, steered}`` per prompt to ``output`` (JSONL), prints a table, and keeps the run's
    summary line (:mod:`seka_lightning.effect`, printed last by ``seka predict``) in ``summary_line``; when prompts
    carry ``target`` answers the summary is also written to ``<output stem>.summary.json``."""

    def __init__(
        self, output: str = "outputs/predictions.jsonl", *, show_table: bool = True, overwrite: bool = False
    ) -> None:
        """
        Args:
            output: the merged JSONL file.
            show_table: print an unsteered-vs-steered table at the end.
            overwrite: replace an existing predictions file at ``output`` and its summary (checked here, before
                the model runs).
        """
        super().__init__(write_interval="epoch")
        check_output(output, kind=files.PREDICTIONS, overwrite=overwrite, flag=OVERWRITE_FLAG)
        self.output, self.show_table = Path(output), show_table
        self.summary_line: str | None = None
        self.summary_written = False
        check_output(self.summary_path, kind=files.HIGHLIGHT_SUMMARY, overwrite=overwrite, flag=OVERWRITE_FLAG)

    @property
    def summary_path(self) -> Path:
        """The summary JSON beside the predictions: ``<output stem>.summary.json``."""
        return self.output.with_name(f"{self.output.stem}.summary.json")

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions, batch_indices) -> None:
        records = merge_rank_parts(trainer, predictions, self.output, key="index")
        if records is not None and self.show_table:
            table = Table(title=f"SEKA highlighting ({self.output})", show_lines=True)
            for column in ("prompt", "unsteered", "steered"):
                table.add_column(column, overflow="fold")
            for record in records:
                table.add_row(record["prompt"], record["unsteered"].strip(), record["steered"].strip())
            Console(width=max(120, Console().width)).print(table)
        if records is not None:
            self.write_summary(records)

    def write_summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Keep the summary line; write the summary JSON when prompts carry target answers. Returns the summary."""
        summary = highlight_effect(records)
        self.summary_line = summary_line(summary)
        if summary["follows_highlight"] is not None:
            write_json(self.summary_path, {**summary, "predictions": str(self.output), "line": self.summary_line})
            self.summary_written = True
        return summary


class BenchmarkWriter(BasePredictionWriter):
    """Per-example ``predictions.jsonl.gz`` and ``metric_result.json`` in ``output_dir``, written by rank 0, atomically.

    ``metric_result.json`` holds the headline ``metrics`` recomputed from the written records by the contract rule
    (:mod:`seka_lightning.evidence`, the same function ``seka report --verify`` uses), their 95% ``intervals`` and
    id counts ``n``, the method, model, config and counts, and the run's ``provenance``. The scorer's own
    (torchmetrics, DDP-reduced) values must agree with the recomputation; a disagreement is a scorer bug and
    raises after the predictions are written, so the evidence is kept.

    SIGTERM (and under DDP SIGINT) stops the run: every rank saves its partial file and the process exits
    ``128 + signum``. On one process it stops at the next batch end, and any other interruption or failure during the
    batches (Ctrl-C, an error) saves the finished batches too, when the scorer holds exactly their updates (a batch
    that failed after updating it cannot be told apart, and then the last periodic save stands); Ctrl-C then exits 1,
    as Lightning does. Under DDP the signal only sets a flag
    (:class:`StopSignal`) and the ranks agree on the flags (:func:`agree_to_stop`) where every rank arrives: at the
    batch ends up to the smallest rank's batch count (a rank may have one batch more than another) and at the epoch
    end, before the metric reduction; a signal after that still makes the run exit ``128 + signum`` once written.
    """

    def __init__(
        self,
        output_dir: str = "outputs/eval",
        *,
        overwrite: bool = False,
        progress_every_s: float = 60.0,
        checkpoint_every_s: float | None = 120.0,
        resume: bool = True,
    ) -> None:
        """
        Args:
            output_dir: folder for ``predictions.jsonl.gz`` and ``metric_result.json``.
            overwrite: replace the results of an earlier run in ``output_dir`` (checked here, before the model runs).
            progress_every_s: log a progress line (batches done, elapsed, estimated time left) at most this often,
                for runs whose output is a log file rather than a terminal; 0 logs every batch.
            checkpoint_every_s: save the finished batches' rows and the scorer's state to
                ``output_dir/predict_partial.rank<r>.pt`` at most this often (0: after every batch; None: never), so
                that the same command resumes an interrupted run (:mod:`seka_lightning.lit.partial`); the file is
                removed once the results are written.
            resume: continue from a partial file of a run with the same settings; False starts over (and replaces
                it). A partial file of a run with other settings is refused either way unless ``resume`` is False.
        """
        super().__init__(write_interval="epoch")
        if not progress_every_s >= 0:
            raise ValueError(f"progress_every_s must be >= 0 seconds, got {progress_every_s}")
        if checkpoint_every_s is not None and not checkpoint_every_s >= 0:
            raise ValueError(f"checkpoint_every_s must be >= 0 seconds or None, got {checkpoint_every_s}")
        self.output_dir = Path(output_dir)
        self.progress_every_s, self.checkpoint_every_s, self.resume = progress_every_s, checkpoint_every_s, resume
        self.git_at_start: dict | None = None
        self.source_at_start: str | None = None  # the package's code hash this run imported (rank 0's)
        self._weights: dict | None = None  # the model's weights hash, taken once per run (fingerprint, provenance)
        self._started = self._last_progress = self._last_checkpoint = 0.0
        self._partial: PartialRun | None = None
        self.stop_signal: StopSignal | None = None  # under DDP, from the start of the run to its teardown
        self._common_batches, self._batch_ends = 0.0, 0  # batch ends every rank reaches; this rank's so far
        # the scorer's update counts when its state last matched the finished batches' rows, and how many rows the
        # partial file holds; None outside the batch loop (an exception then saves nothing)
        self._consistent_counts: dict[str, int] | None = None
        self._consistent_skipped = 0  # how many skipped-highlight ids the finished batches have
        self._saved_rows = 0
        check_output(self.output_dir / PREDICTIONS, kind=files.PREDICTIONS, overwrite=overwrite, flag=OVERWRITE_FLAG)
        check_output(self.output_dir / METRIC_RESULT, kind=BENCHMARK_RESULTS, overwrite=overwrite, flag=OVERWRITE_FLAG)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stop_signal = None
        if trainer.world_size > 1:  # first, and after Lightning has registered its SIGTERM handler, which this replaces
            self.stop_signal = StopSignal()
            self.stop_signal.install()
            if trainer.received_sigterm:  # a signal that reached Lightning's handler before this one took over
                self.stop_signal.signum = signal.SIGTERM
        # the code this run imported: a checkout that moves during a long run must not relabel it
        self.git_at_start = git_state()
        # the code this process imported, as rank 0 saw it: every rank then checks a partial file against one value
        self.source_at_start = trainer.strategy.broadcast(SOURCE_SHA256_AT_IMPORT, src=0)
        self._weights = None
        self._started = self._last_progress = time.monotonic()

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch_ends = 0
        if self.stop_signal is not None:
            common = fewest_over_ranks(trainer, sum(trainer.num_predict_batches))
            self._common_batches = common if math.isfinite(common) else 0  # unknown lengths: agree at the end only
        # after the evaluator's on_predict_start: its scorer exists, so a saved state can be put back into it
        if self.checkpoint_every_s is None:
            return
        self._partial = PartialRun(
            run_fingerprint(
                trainer, pl_module, self.source_at_start, self.git_at_start, self.weights(pl_module.hparams.pretrained)
            )
        )
        self._last_checkpoint = time.monotonic()
        self._saved_rows = 0
        self._mark_consistent(pl_module)
        path = partial_path(self.output_dir, trainer.global_rank)
        if not path.exists():
            return
        if not self.resume:
            log.info("resume is false: starting over; %s will be replaced", path)
            return
        saved = load_partial(path, self._partial.fingerprint)
        load_metric_states(pl_module.scorer, saved.metric_states, pl_module.device)
        pl_module.replay = dict(enumerate(saved.rows))
        pl_module.skipped_highlight = list(saved.skipped_highlight)
        pl_module.resumed = {"batches": len(saved.rows), "wall_time_s": saved.wall_time_s}
        self._partial = saved
        self._saved_rows = len(saved.rows)
        self._mark_consistent(pl_module)
        log.info("resuming from %s: %d of %s batches done", path, len(saved.rows), trainer.num_predict_batches[0])

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        now = time.monotonic()
        self._batch_ends += 1
        signum = self._agreed_stop(trainer)
        if self._partial is not None and batch_idx == len(self._partial.rows):  # a new batch, not a replayed one
            self._partial.rows.append(outputs)
            self._mark_consistent(pl_module)
            if signum is None and now - self._last_checkpoint >= self.checkpoint_every_s:
                self._save_partial(trainer, pl_module)
                self._last_checkpoint = now
        if signum is not None:  # Lightning's predict loop itself does not stop on SIGTERM
            self._stop(trainer, pl_module, signum, f"after batch {batch_idx + 1}")
        if now - self._last_progress < self.progress_every_s or not trainer.is_global_zero:
            return
        self._last_progress = now
        done, total = batch_idx + 1, trainer.num_predict_batches[dataloader_idx]
        resumed = min(pl_module.resumed["batches"], done)  # replayed from the partial file: no time spent here
        log.info(progress_line(done, total, now - self._started, resumed=resumed))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stop_signal is not None and self.stop_signal.signum is not None:
            log.warning(
                "received %s after the ranks' last agreement, so the results are written; exiting non-zero",
                signal.Signals(self.stop_signal.signum).name,
            )
            raise BuildStopped(self.stop_signal.signum)

    def _mark_consistent(self, pl_module: L.LightningModule) -> None:
        """The scorer's state and the skipped ids now belong to exactly the finished batches' rows."""
        self._consistent_counts = update_counts(pl_module.scorer)
        self._consistent_skipped = len(pl_module.skipped_highlight)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """On one process, save the finished batches that the partial file lacks, if the scorer's state is theirs."""
        counts, self._consistent_counts = self._consistent_counts, None
        run = self._partial
        if counts is None or run is None or trainer.world_size > 1 or len(run.rows) == self._saved_rows:
            return  # outside the batch loop, nothing new, or DDP (ranks may be out of step: no collective here)
        path = partial_path(self.output_dir, trainer.global_rank)
        what = f"{type(exception).__name__} after {len(run.rows)} finished batches"
        if update_counts(pl_module.scorer) != counts:
            log.warning(
                "%s: the failed batch had already updated the scorer, so they are not saved; %s",
                what,
                f"{path} keeps {self._saved_rows} of them" if self._saved_rows else "nothing is kept",
            )
            return
        try:  # without the ids the failed batch may have added to the skipped list before it failed
            self._save_partial(trainer, pl_module, skipped=pl_module.skipped_highlight[: self._consistent_skipped])
        except Exception as error:  # e.g. a failed CUDA context cannot copy the scorer's states
            log.warning("%s: saving them failed (%s); %s keeps %d of them", what, error, path, self._saved_rows)
            return
        log.warning("%s: saved in %s; the same command resumes from them", what, path)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.stop_signal is not None:
            self.stop_signal.restore()

    def _agreed_stop(self, trainer: L.Trainer) -> int | None:
        """The signal to stop for at this batch end (the same on every rank under DDP); None = carry on."""
        if self.stop_signal is None:  # one process: Lightning's handler records SIGTERM, also on the last batch
            return signal.SIGTERM if trainer.received_sigterm else None
        if self._batch_ends > self._common_batches:
            return None  # a batch another rank does not have: the ranks agree at the epoch end instead
        return agree_to_stop(trainer, self.stop_signal.signum)

    def _stop(self, trainer: L.Trainer, pl_module: L.LightningModule, signum: int, when: str) -> NoReturn:
        """Save this rank's finished batches and stop the run (every rank at the same agreed point)."""
        where = None
        if self._partial is not None:
            self._save_partial(trainer, pl_module)
            where = partial_path(self.output_dir, trainer.global_rank)
        log.warning(
            "stopped by %s %s; %s",
            signal.Signals(signum).name,
            when,
            f"the same command resumes from {where}" if where else "nothing is kept (checkpoint_every_s is None)",
        )
        if self.stop_signal is None:
            raise SIGTERMException  # Lightning's own exits 0; the CLI turns it into 143
        raise BuildStopped(signum)

    def weights(self, pretrained: str) -> dict:
        """:func:`weights_hash` of the run's model, computed once (a local model's files are read only once)."""
        if self._weights is None:
            self._weights = weights_hash(str(pretrained))
        return self._weights

    def _save_partial(self, trainer: L.Trainer, pl_module: L.LightningModule, *, skipped: list | None = None) -> None:
        run = self._partial
        run.skipped_highlight = list(pl_module.skipped_highlight if skipped is None else skipped)
        run.metric_states = metric_states(pl_module.scorer)
        run.wall_time_s = pl_module.resumed["wall_time_s"] + time.monotonic() - self._started
        save_partial(partial_path(self.output_dir, trainer.global_rank), run)
        self._saved_rows = len(run.rows)

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions, batch_indices) -> None:
        self._consistent_counts = None  # the batches are done: a failure from here on saves no partial state
        if self.stop_signal is not None:  # a signal during a batch that not every rank has is honoured here
            signum = agree_to_stop(trainer, self.stop_signal.signum)
            if signum is not None:
                self._stop(trainer, pl_module, signum, "after its last batch")
        results = pl_module.results()  # collective: every rank takes part in the metric reduction
        records = merge_rank_parts(
            trainer, predictions, self.output_dir / PREDICTIONS, key="uid", write=write_predictions
        )
        if records is None:
            return
        seeds = {
            "method": results["method"].get("seed"),
            "data": getattr(trainer.datamodule, "seed", None),
            "bootstrap": BOOTSTRAP_SEED,
        }
        metric_result = build_metric_result(
            records,
            results,
            seeds=seeds,
            git_at_start=self.git_at_start,
            source_at_start=self.source_at_start,
            weights=self.weights(results["model"]),
        )
        write_json(self.output_dir / METRIC_RESULT, metric_result)
        # the results are written: every rank's partial state has served (rank 0 reads the ranks' parts from this
        # folder, so it sees their partial files too; those of a run with more ranks go as well)
        for served in partial_files(self.output_dir):
            served.unlink(missing_ok=True)
        show_metrics(metric_result)


def run_fingerprint(
    trainer: L.Trainer, pl_module: L.LightningModule, source: str | None, git: dict | None, weights: dict
) -> str:
    """What a predict run's rows depend on: the code (the hash of the package's Python files, not the git commit: a
    commit that changes no code keeps the run resumable, an uncommitted edit does not; the git state only where the
    files cannot be hashed; library versions), the model's weights, the
    evaluator's settings and the trainer's precision and accelerator, the method (with its files' hashes), the data
    (settings, files' hashes, batching), and the number of ranks (a rank's batches depend on it)."""
    method = pl_module.method.describe()
    datamodule = trainer.datamodule
    hparams = {key: value for key, value in pl_module.hparams.items() if key != "method"}
    return fingerprint(
        {
            "code": {"source_sha256": source, "versions": library_versions(), **({} if source else {"git": git})},
            "weights": weights,
            "tokenizer": tokenizer_sha256(getattr(pl_module, "tokenizer", None)),
            "evaluator": hparams,
            "trainer": {"precision": trainer.precision, "accelerator": type(trainer.accelerator).__name__},
            "method": method,
            "method_files": input_files(method),
            "data": datamodule.describe(),
            "data_files": input_files(datamodule.describe()),
            "data_settings": plain_attributes(datamodule),  # batch_size, max_new_tokens, ...
            "scorer": plain_attributes(pl_module.scorer),
            "batches": list(trainer.num_predict_batches),
            "world_size": trainer.world_size,
        }
    )


def update_counts(scorer: Any) -> dict[str, int]:
    """The update count of every torchmetrics metric in ``scorer``, by submodule name (host integers: read without
    touching the device, so also after a failed CUDA call)."""
    return {name: metric._update_count for name, metric in scorer.named_modules() if isinstance(metric, Metric)}


def plain_attributes(obj: Any) -> dict[str, Any]:
    """The public attributes of ``obj`` that are plain values (numbers, strings, None, and lists / tuples of them)."""
    plain = (str, int, float, bool, type(None))
    return {
        key: value
        for key, value in vars(obj).items()
        if not key.startswith("_")
        and (isinstance(value, plain) or (isinstance(value, list | tuple) and all(isinstance(v, plain) for v in value)))
    }


def progress_line(done: int, total: float, elapsed_s: float, resumed: int = 0) -> str:
    """``predict: 3/44 batches in 61 s, about 834 s left`` (no estimate while the total is unknown).

    ``resumed`` of the ``done`` batches came from a partial file, not from the ``elapsed_s`` of this process, so the
    estimate times only the others (none is given until one of them has run).
    """
    line = f"predict: {done}/{total if math.isfinite(total) else '?'} batches"
    line += f" ({resumed} resumed) in {elapsed_s:.0f} s" if resumed else f" in {elapsed_s:.0f} s"
    if math.isfinite(total) and done > resumed:
        line += f", about {elapsed_s / (done - resumed) * (total - done):.0f} s left"
    return line


def scorer_disagreements(recomputed: dict[str, float], scorer: dict[str, float]) -> list[str]:
    """Metrics where the scorer's value differs from the contract recomputation (float32 states: ~1e-5 relative)."""
    return [
        f"{name}: scorer {scorer[name]!r}, recomputed from the predictions {value!r}"
        for name, value in recomputed.items()
        if name in scorer and not math.isclose(value, scorer[name], rel_tol=1e-5, abs_tol=1e-7)
    ]


def build_metric_result(
    records: list[dict[str, Any]],
    results: dict[str, Any],
    *,
    seeds: dict[str, Any],
    argv: list[str] | None = None,
    git_at_start: dict[str, Any] | None = None,
    source_at_start: str | None = None,
    weights: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``metric_result.json``'s content from the written ``records`` and the evaluator's ``results``.

    Metrics the scorer reports but no record scores cannot be re-checked: they go to ``aggregate_metrics`` with a
    warning, never into ``metrics``.
    """
    summary = summarize(records, seed=seeds.get("bootstrap", BOOTSTRAP_SEED))
    scorer = results["metrics"]
    disagreements = scorer_disagreements(summary["metrics"], scorer)
    if disagreements:
        raise ValueError(
            "the scorer's metrics disagree with their recomputation from the per-example scores ("
            + "; ".join(disagreements)
            + "); the scorer's records do not follow the contract in seka_lightning.evidence, fix the scorer"
        )
    aggregate = {name: value for name, value in scorer.items() if name not in summary["metrics"]}
    if aggregate:
        log.warning("metrics without per-example scores cannot be verified: %s", sorted(aggregate))
    model = dict(weights if weights is not None else weights_hash(results["model"]))
    if "tokenizer_sha256" in results:  # the evaluator's tokenizer, recorded beside the weights it goes with
        model["tokenizer_sha256"] = results["tokenizer_sha256"]
    provenance = run_provenance(
        pretrained=results["model"],
        method=results["method"],
        config={k: v for k, v in results["config"].items() if k != "data"},
        data=results["config"].get("data", {}),
        seeds=seeds,
        argv=argv,
        git_at_start=git_at_start,
        source_at_start=source_at_start,
        weights=model,
    )
    return {
        **summary,
        "aggregate_metrics": aggregate,
        **{k: v for k, v in results.items() if k not in ("metrics", "tokenizer_sha256")},
        "provenance": provenance,
    }


def show_metrics(metric_result: dict[str, Any]) -> None:
    """A rich table of the headline metrics with their 95% intervals."""
    title = (
        f"{metric_result['config']['data'].get('benchmark')} / {metric_result['method']['method']} / "
        f"{metric_result['model']}"
    )
    table = Table(title=title)
    for column, justify in (("metric", "left"), ("value", "right"), ("95% interval", "right"), ("n", "right")):
        table.add_column(column, justify=justify)
    for name, value in metric_result["metrics"].items():
        low, high = metric_result["intervals"][name]
        table.add_row(name, f"{value:.4f}", f"[{low:.4f}, {high:.4f}]", str(metric_result["n"][name]))
    Console().print(table)
