"""Shared guards for the scorers: an evaluation that saw no examples is a bug, not a zero."""

from __future__ import annotations

from collections.abc import Sized

import torch


def require_examples(metric_name: str, count: torch.Tensor) -> None:
    """Raise if the (DDP-summed) example count is zero, so an empty evaluation cannot pass as a score."""
    if int(count.item()) == 0:
        raise ValueError(
            f"{metric_name}.compute() found no examples: update() was never called with data "
            "(check that the evaluation dataloader is not empty)"
        )


def check_same_length(**sequences: Sized) -> int:
    """Return the common length of the named sequences; raise naming them when they disagree."""
    for name, seq in sequences.items():
        if isinstance(seq, str):
            raise ValueError(f"{name} is a single string; pass a list with one entry per example")
    lengths = {name: len(seq) for name, seq in sequences.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"batch sizes differ ({described}); pass one entry per example in each")
    return next(iter(lengths.values()))
