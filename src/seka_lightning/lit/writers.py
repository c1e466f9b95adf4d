"""Prediction writers: per-rank JSONL parts merged by rank 0 into one file, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from rich.console import Console
from rich.table import Table


def write_jsonl_atomic(records: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class ComparisonWriter(BasePredictionWriter):
    """Writes ``{prompt, unsteered, steered}`` per prompt to ``output`` (JSONL) and prints a table."""

    def __init__(self, output: str = "outputs/predictions.jsonl", *, show_table: bool = True) -> None:
        """
        Args:
            output: the merged JSONL file.
            show_table: print an unsteered-vs-steered table at the end.
        """
        super().__init__(write_interval="epoch")
        self.output, self.show_table = Path(output), show_table

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions, batch_indices) -> None:
        part = self.output.with_name(f"{self.output.name}.rank{trainer.global_rank}")
        write_jsonl_atomic([record for batch in predictions for record in batch], part)
        trainer.strategy.barrier("ComparisonWriter")
        if not trainer.is_global_zero:
            return
        records = []
        for rank in range(trainer.world_size):
            rank_part = self.output.with_name(f"{self.output.name}.rank{rank}")
            records += [json.loads(line) for line in rank_part.read_text(encoding="utf-8").splitlines()]
            rank_part.unlink()
        records.sort(key=lambda r: r["index"])
        write_jsonl_atomic(records, self.output)
        if self.show_table:
            table = Table(title=f"SEKA highlighting ({self.output})", show_lines=True)
            for column in ("prompt", "unsteered", "steered"):
                table.add_column(column, overflow="fold")
            for record in records:
                table.add_row(record["prompt"], record["unsteered"].strip(), record["steered"].strip())
            Console(width=max(120, Console().width)).print(table)
