"""Callbacks: periodic checkpoints for builds that train nothing (so ``global_step`` never moves)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L


class BatchCheckpoint(L.Callback):
    """Save ``last.ckpt`` every ``every_n_batches`` training batches, atomically, for ``--ckpt_path`` resume.

    Lightning's ``ModelCheckpoint`` counts optimizer steps; a statistics build has none.
    """

    def __init__(self, dirpath: str = "checkpoints/build", *, every_n_batches: int = 50) -> None:
        """
        Args:
            dirpath: folder for ``last.ckpt``.
            every_n_batches: save after every N training batches.
        """
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1, got {every_n_batches}")
        self.dirpath, self.every_n_batches = Path(dirpath), every_n_batches

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % self.every_n_batches:
            return
        tmp = self.dirpath / ".last.ckpt.tmp"
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.last_path)
        trainer.strategy.barrier("BatchCheckpoint")
