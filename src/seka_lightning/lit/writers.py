"""Prediction writers: per-rank JSONL parts merged by rank 0 into one file, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from rich.console import Console
from rich.table import Table

from seka_lightning.files import BENCHMARK_RESULTS, PREDICTIONS, check_output, write_json, write_jsonl

OVERWRITE_FLAG = "the writer's `overwrite: true` init arg"


def merge_rank_parts(trainer: L.Trainer, predictions: list, output: Path, *, key: str) -> list[dict[str, Any]] | None:
    """Each rank writes its records to ``output.rankN``; rank 0 merges them (sorted by ``key``) into ``output``.

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
    write_jsonl(output, records)
    return records


class ComparisonWriter(BasePredictionWriter):
    """Writes ``{prompt, unsteered, steered}`` per prompt to ``output`` (JSONL) and prints a table."""

    def __init__(
        self, output: str = "outputs/predictions.jsonl", *, show_table: bool = True, overwrite: bool = False
    ) -> None:
        """
        Args:
            output: the merged JSONL file.
            show_table: print an unsteered-vs-steered table at the end.
            overwrite: replace an existing predictions file at ``output`` (checked here, before the model runs).
        """
        super().__init__(write_interval="epoch")
        check_output(output, kind=PREDICTIONS, overwrite=overwrite, flag=OVERWRITE_FLAG)
        self.output, self.show_table = Path(output), show_table

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions, batch_indices) -> None:
        records = merge_rank_parts(trainer, predictions, self.output, key="index")
        if records is not None and self.show_table:
            table = Table(title=f"SEKA highlighting ({self.output})", show_lines=True)
            for column in ("prompt", "unsteered", "steered"):
                table.add_column(column, overflow="fold")
            for record in records:
                table.add_row(record["prompt"], record["unsteered"].strip(), record["steered"].strip())
            Console(width=max(120, Console().width)).print(table)


class BenchmarkWriter(BasePredictionWriter):
    """Per-example ``predictions.jsonl`` and ``metric_result.json`` (metrics, method, model, config, counts, wall time)
    in ``output_dir``; metrics are reduced over DDP ranks, files are written by rank 0, atomically."""

    def __init__(self, output_dir: str = "outputs/eval", *, overwrite: bool = False) -> None:
        """
        Args:
            output_dir: folder for ``predictions.jsonl`` and ``metric_result.json``.
            overwrite: replace the results of an earlier run in ``output_dir`` (checked here, before the model runs).
        """
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)
        check_output(self.output_dir / "predictions.jsonl", kind=PREDICTIONS, overwrite=overwrite, flag=OVERWRITE_FLAG)
        check_output(
            self.output_dir / "metric_result.json", kind=BENCHMARK_RESULTS, overwrite=overwrite, flag=OVERWRITE_FLAG
        )

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions, batch_indices) -> None:
        results = pl_module.results()  # collective: every rank takes part in the metric reduction
        records = merge_rank_parts(trainer, predictions, self.output_dir / "predictions.jsonl", key="uid")
        if records is None:
            return
        write_json(self.output_dir / "metric_result.json", results)
        table = Table(
            title=f"{results['config']['data'].get('benchmark')} / {results['method']['method']} / {results['model']}"
        )
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in results["metrics"].items():
            table.add_row(name, f"{value:.4f}")
        Console().print(table)
