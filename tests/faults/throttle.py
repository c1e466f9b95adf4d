"""A callback for the signal tests' subprocesses (on their PYTHONPATH): after batch ``ready_after`` each rank writes
its pid to ``{folder}/ready.{rank}``, then every batch sleeps, so a signal sent then lands mid-build."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L


class Throttle(L.Callback):
    def __init__(self, folder: str, *, ready_after: int = 2, sleep_s: float = 0.2) -> None:
        self.folder, self.ready_after, self.sleep_s = Path(folder), ready_after, sleep_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx + 1 == self.ready_after:
            (self.folder / f"ready.{trainer.global_rank}").write_text(str(os.getpid()))
        if batch_idx + 1 >= self.ready_after:
            time.sleep(self.sleep_s)
