"""Fixtures for the scorer tests: a two-rank DDP reduction simulated through torchmetrics' own sync path."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torchmetrics import Metric


def _synced_compute(rank0: Metric, rank1: Metric) -> Any:
    """``rank0.compute()`` after an all-gather that returns ``[rank0 state, rank1 state]`` for every state.

    The gather is injected as ``dist_sync_fn`` with ``distributed_available_fn`` forced on, so the states go
    through ``Metric._sync_dist`` (stack + ``dist_reduce_fx``) exactly as under DDP.
    """
    names = {id(tensor): name for name, tensor in rank0.metric_state.items()}
    incoming = rank1.metric_state

    def gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        return [tensor, incoming[names[id(tensor)]]]

    rank0.dist_sync_fn = gather
    rank0.distributed_available_fn = lambda: True
    return rank0.compute()


def _assert_same(actual: Any, expected: Any) -> None:
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-12, atol=1e-12, equal_nan=True)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.fixture
def assert_same_result() -> Callable[[Any, Any], None]:
    """Compare two ``compute()`` results (tensor or dict of tensors) to float64 precision."""
    return _assert_same


def _assert_ranks_match(make: Callable[[], Metric], rank0_args: tuple, rank1_args: tuple, expected: Any) -> None:
    """Two ranks' metrics (``make()`` updated with ``*rank0_args`` / ``*rank1_args``) give ``expected`` both through
    ``merge_state`` and through the simulated DDP all-gather."""
    rank0, rank1 = make(), make()
    rank0.update(*rank0_args)
    rank1.update(*rank1_args)
    merged = copy.deepcopy(rank0)
    merged.merge_state(rank1)
    _assert_same(merged.compute(), expected)
    _assert_same(_synced_compute(rank0, rank1), expected)


@pytest.fixture
def assert_ranks_match() -> Callable[[Callable[[], Metric], tuple, tuple, Any], None]:
    return _assert_ranks_match
