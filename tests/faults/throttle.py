"""A callback for the signal tests' subprocesses (on their PYTHONPATH): after batch ``ready_after`` each rank writes
its pid to ``{folder}/ready.{rank}``, then every batch sleeps, so a signal sent then lands mid-run (fit or predict).

With ``hold_rank``, that rank instead waits after batch ``ready_after`` until ``{folder}/sent`` exists (the test writes
it once it has signalled the rank), so the signal lands at a known point of the run, not at a time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L

HOLD_AT_MOST_S = 60.0


class Throttle(L.Callback):
    def __init__(
        self, folder: str, *, ready_after: int = 2, sleep_s: float = 0.2, hold_rank: int | None = None
    ) -> None:
        self.folder, self.ready_after, self.sleep_s, self.hold_rank = Path(folder), ready_after, sleep_s, hold_rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._after(trainer, batch_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._after(trainer, batch_idx)

    def _after(self, trainer: L.Trainer, batch_idx: int) -> None:
        if batch_idx + 1 == self.ready_after:
            (self.folder / f"ready.{trainer.global_rank}").write_text(str(os.getpid()))
            if trainer.global_rank == self.hold_rank:
                deadline = time.monotonic() + HOLD_AT_MOST_S
                while not (self.folder / "sent").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)  # the signal handler runs in between
                return
        if batch_idx + 1 >= self.ready_after and self.hold_rank is None:
            time.sleep(self.sleep_s)
