"""Synthetic expert banks for the tiny test model (3 layers, 2 KV heads, head_dim 16)."""

from __future__ import annotations

import pytest
import torch

from seka_lightning.adaseka.experts import ExpertSet
from seka_lightning.bank import ProjectionBank


def random_expert(seed: int, *, layers: int = 3, heads: int = 2, d: int = 16, nan_heads=()) -> ProjectionBank:
    """An expert bank with random orthonormal U, decreasing S, and NaN factors on ``nan_heads`` ((layer, head))."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(layers, heads, d, d, generator=g))
    s = torch.rand(layers, heads, d, generator=g).sort(-1, descending=True).values * 3
    for layer, head in nan_heads:
        u[layer, head] = float("nan")
        s[layer, head] = float("nan")
    valid = torch.isfinite(s).all(-1)
    u_k = torch.where(valid[..., None, None], u[..., :4], torch.zeros(()))
    pos = u_k @ u_k.transpose(-1, -2)
    return ProjectionBank(
        layers=list(range(layers)), pos=pos, u_pos=u, s_pos=s, metadata={"positive_only": True, "num_layers": layers}
    )


@pytest.fixture
def expert_banks() -> dict[str, ProjectionBank]:
    return {
        "alpha": random_expert(1, nan_heads=[(0, 1)]),
        "beta": random_expert(2, nan_heads=[(2, 0)]),
        "gamma": random_expert(3),
    }


@pytest.fixture
def experts(expert_banks) -> ExpertSet:
    return ExpertSet.from_banks(expert_banks)
