"""Random-projection ablation (SPEC §6): SEKA's steering with each projector replaced by a random one of the same rank.

Only the subspace changes: gains, layers, the fused formula and the skipped (zero) heads are SEKA's. The
reference builder (``random_projection_builder.py``) uses ``Q Qᵀ`` of a full square orthogonal ``Q``, which is
the identity; here each head keeps its real projector's rank, so the ablation isolates the learned directions.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from seka_lightning.bank import ProjectionBank
from seka_lightning.methods import SekaMethod

log = logging.getLogger(__name__)


def projector_ranks(projectors: torch.Tensor) -> torch.Tensor:
    """``round(trace(P))`` per head of ``[..., d, d]`` projectors (the rank of an orthogonal projector)."""
    return projectors.double().diagonal(dim1=-2, dim2=-1).sum(-1).round().long()


def random_projectors(ranks: torch.Tensor, head_dim: int, *, generator: torch.Generator) -> torch.Tensor:
    """Uniformly random orthogonal projectors ``[..., d, d]`` (float64, CPU) with the given ``ranks`` ``[...]``.

    Every head draws a full ``d x d`` Gaussian, so a head's projector depends only on the seed and its position,
    not on the other heads' ranks. ``Q[:, :r] Q[:, :r]ᵀ`` does not depend on QR's sign convention.
    """
    if ((ranks < 0) | (ranks > head_dim)).any():
        raise ValueError(f"projector ranks must lie in 0..{head_dim}, got {ranks.unique().tolist()}")
    gaussian = torch.randn(*ranks.shape, head_dim, head_dim, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)
    keep = torch.arange(head_dim) < ranks[..., None]  # [..., d]
    basis = q * keep[..., None, :]
    return basis @ basis.transpose(-1, -2)


def randomized_bank(bank: ProjectionBank, *, seed: int) -> ProjectionBank:
    """A copy of ``bank`` whose ``pos`` (then ``neg``) projectors are random with each head's rank kept.

    Drawn on the CPU in float64 from ``torch.Generator().manual_seed(seed)``, then cast to the bank's dtype,
    so the same seed gives the same bank on every machine. SVD factors are dropped: they describe the real bank.
    """
    generator = torch.Generator().manual_seed(seed)
    replaced: dict[str, torch.Tensor] = {}
    for name in ("pos", "neg"):
        real = getattr(bank, name)
        if real is None:
            continue
        ranks = projector_ranks(real.cpu())
        replaced[name] = random_projectors(ranks, bank.head_dim, generator=generator).to(real.dtype).to(real.device)
    metadata = {**bank.metadata, "projectors": "random", "random_seed": seed}
    return ProjectionBank(
        layers=list(bank.layers),
        pos=replaced["pos"],
        neg=replaced.get("neg"),
        diff=bank.diff,
        metadata=metadata,
    )


class RandomProjectionMethod(SekaMethod):
    """SEKA steering with random projectors of the real bank's ranks (the random-projection ablation)."""

    name = "random"

    def __init__(self, bank: str, *, seed: int = 0, **settings: Any) -> None:
        """
        Args:
            bank: projection bank whose ranks the random projectors copy (``.safetensors`` or a reference ``.pt``).
            seed: seed of the random projectors (a non-negative integer; same seed, same projectors everywhere).
            settings: SEKA's ``neg``, ``gain_pos``, ``gain_neg``, ``layers``, ``layer_mapping``, ``length_reference``
                and ``length_power`` (:class:`~seka_lightning.methods.SekaMethod`).
        """
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        super().__init__(bank, **settings)
        self.seed = seed

    def load_bank(self, model: nn.Module | None) -> ProjectionBank:
        real = super().load_bank(model)
        log.info(
            "random projectors (seed %d) with the ranks of %s: %d of %d heads non-zero",
            self.seed,
            self.bank_path,
            int((projector_ranks(real.pos) > 0).sum()),
            real.pos.shape[0] * real.pos.shape[1],
        )
        return randomized_bank(real, seed=self.seed)

    def describe(self) -> dict:
        return {**super().describe(), "seed": self.seed}
