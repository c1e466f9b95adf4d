"""Callbacks: periodic checkpoints for builds that train nothing (so ``global_step`` never moves), and a summary of
the bank a build wrote."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch

from seka_lightning.bank import ProjectionBank

log = logging.getLogger(__name__)


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
