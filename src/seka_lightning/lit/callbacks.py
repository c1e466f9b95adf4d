"""Callbacks and signal handling for builds that train nothing (so ``global_step`` never moves), and a summary
of the bank a build wrote.

A statistics build stops on SIGTERM or SIGINT in three steps: the signal only sets a flag (:class:`StopSignal`), the
ranks agree on the flags at batch boundaries (:func:`agree_to_stop`, one all-reduce), and every rank then raises
:class:`BuildStopped` at the same batch, so :class:`BatchCheckpoint` saves a resumable checkpoint with all ranks
present and the process exits with ``128 + signum``. ``seka predict`` under DDP stops with the same pieces
(:class:`~seka_lightning.lit.writers.BenchmarkWriter`), agreeing only at the batch ends every rank reaches
(:func:`fewest_over_ranks`) and at the epoch end.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import lightning as L
import torch
import torch.distributed as dist

from seka_lightning.bank import ProjectionBank
from seka_lightning.files import atomic_path

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class BuildStopped(SystemExit):
    """Raised on every rank at the same batch once the ranks agreed to stop for a signal; exits ``128 + signum``
    (143 for SIGTERM, 130 for SIGINT), so ``seka fit ... && seka predict ...`` does not carry on without a bank."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class StopSignal:
    """SIGTERM/SIGINT handlers that only record the first signal; the build stops at an agreed batch boundary.

    A handler must not run a collective (Lightning's SIGTERM handler broadcasts from inside the handler, which pairs
    with whatever collective the other ranks are in and can hang them all), nor stop this rank alone. A second
    signal restores the default action and re-delivers it, for a user who does not want to wait.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Replace the SIGTERM/SIGINT handlers (a no-op outside the main thread, where Python allows none)."""
        self.signum = None
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)

    def restore(self) -> None:
        """Put back the handlers that :meth:`install` replaced, where this one is still installed (Lightning's
        teardown may already have put back the handlers from before the run)."""
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._record:
                signal.signal(signum, handler)
        self._previous = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning(
                "received %s: the build stops at the next batch boundary all ranks agree on and saves a checkpoint "
                "(send it again to stop at once)",
                signal.Signals(signum).name,
            )
            return
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        signal.raise_signal(signum)


def agree_to_stop(trainer: L.Trainer, signum: int | None) -> int | None:
    """The signal any rank received (the largest number if several), the same on every rank; None = carry on.

    Under DDP this is one all-reduce that every rank must enter at the same batch; on one process it reads the flag.
    """
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return signum
    flag = torch.tensor([signum or 0], device=trainer.strategy.root_device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def fewest_over_ranks(trainer: L.Trainer, count: float) -> float:
    """The smallest of the ranks' ``count`` (``inf`` allowed), the same on every rank: under DDP one all-reduce that
    every rank must enter; on one process ``count`` itself."""
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return count
    smallest = torch.tensor([count], dtype=torch.float64, device=trainer.strategy.root_device)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return float(smallest.item())


class BatchCheckpoint(L.Callback):
    """Save ``last.ckpt`` every ``every_n_batches`` training batches, and when a signal stops the build, atomically
    (a temp file unique to the process, renamed over ``last.ckpt``), for ``--ckpt_path`` resume.

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
        self._saved_after: int | None = None  # batches processed when last.ckpt was last written by this run

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def due(self, batch_idx: int) -> bool:
        """Whether a checkpoint is saved after batch ``batch_idx``."""
        return (batch_idx + 1) % self.every_n_batches == 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self.due(batch_idx):
            self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, BuildStopped):
            return  # other failures may have left ranks out of step (or the sums incomplete): no collective here
        if self._saved_after != self._processed(trainer):
            self.save(trainer)
        if trainer.is_global_zero:
            log.warning(
                "stopped by %s; resume with the same command plus --ckpt_path %s",
                signal.Signals(exception.signum).name,
                self.last_path,
            )

    def save(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` (every rank takes part in the statistics sync; rank 0 writes)."""
        if trainer.is_global_zero:
            with atomic_path(self.last_path) as tmp:
                trainer.save_checkpoint(tmp)
        else:
            trainer.save_checkpoint(self.last_path)  # joins the sync; only rank 0 writes files
        self._saved_after = self._processed(trainer)
        trainer.strategy.barrier("BatchCheckpoint")

    @staticmethod
    def _processed(trainer: L.Trainer) -> int:
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def bank_summary(bank: ProjectionBank) -> dict[str, torch.Tensor]:
    """Per bank layer ``[n_layers]``: ``heads_kept`` (heads with a non-zero P+), ``rank_mean`` (mean rank of P+ over
    the kept heads: a projector's trace is its rank) and ``top_singular_share`` (mean over kept heads of the first
    singular value's share of the spectrum, where the bank holds its singular values; NaN otherwise)."""
    kept = bank.pos.flatten(-2).abs().amax(-1) > 0  # [L, H]
    ranks = bank.pos.diagonal(dim1=-2, dim2=-1).sum(-1).round()  # [L, H]
    heads = kept.sum(-1)
    per_kept = heads.clamp(min=1).to(torch.float64)
    rank_mean = (ranks * kept).sum(-1).to(torch.float64) / per_kept
    share = torch.full((len(bank.layers),), float("nan"), dtype=torch.float64)
    if bank.s_pos is not None:
        s = bank.s_pos.to(torch.float64)  # [L, H, d]
        head_share = torch.nan_to_num(s[..., 0] / s.sum(-1), nan=0.0)
        share = (head_share * kept).sum(-1) / per_kept
    return {"heads_kept": heads, "rank_mean": rank_mean, "top_singular_share": share}


class BankSummary(L.Callback):
    """After ``seka fit``, reads the bank file the build wrote and logs, per layer, the heads kept, the mean rank of
    P+ and the first singular value's share of the spectrum (to the trainer's loggers, step = layer id), and prints
    a two-line summary."""

    def __init__(self, path: str | None = None) -> None:
        """
        Args:
            path: the bank file; None = the LightningModule's ``output`` hyper-parameter (``ProjectionBuilder``).
        """
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = self.path if self.path is not None else pl_module.hparams.get("output")
        if path is None:
            raise ValueError("BankSummary needs a bank: set its path, or use it with a module that has `output`")
        bank = ProjectionBank.load(path)
        summary = bank_summary(bank)
        for logger in trainer.loggers:  # already finalized by the fit: each logs, saves and closes again
            for index, layer in enumerate(bank.layers):
                logger.log_metrics({f"bank/{name}": float(values[index]) for name, values in summary.items()}, layer)
            logger.save()
            logger.finalize("success")
        heads, ranks = summary["heads_kept"], summary["rank_mean"]
        log.info(
            "bank %s: %d/%d heads kept over %d layers; P+ rank per kept head %.1f on average (layers %.1f to %.1f)",
            path,
            int(heads.sum()),
            bank.pos.shape[0] * bank.num_kv_heads,
            len(bank.layers),
            float((ranks * heads).sum() / heads.sum().clamp(min=1)),
            float(ranks.min()),
            float(ranks.max()),
        )
        log.info("heads kept per layer: %s", " ".join(str(int(h)) for h in heads))
