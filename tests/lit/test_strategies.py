"""ddp_frozen: the SIGTERM flag is shared every N batches, on every rank at the same batches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

from seka_lightning.lit.strategies import FrozenModelDDPStrategy, thin_sigterm_broadcast


def test_lightning_still_broadcasts_sigterm_per_batch_where_the_strategy_expects_it():
    # if Lightning renames this, thin_sigterm_broadcast becomes a no-op and DDP builds lose their overlap
    assert callable(getattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", None))


@pytest.mark.parametrize(("every", "expected"), [(1, [1, 2, 3, 4, 5, 6, 7]), (3, [1, 4, 7]), (50, [1])])
def test_the_broadcast_runs_on_the_first_batch_and_every_nth_after(every, expected):
    batch, calls = [0], []
    loop = SimpleNamespace(_broadcast_sigterm_tensor=lambda: calls.append(batch[0]))
    assert thin_sigterm_broadcast(loop, every)
    for batch[0] in range(1, 8):
        loop._broadcast_sigterm_tensor()
    assert calls == expected


def test_a_loop_without_the_broadcast_is_left_alone():
    loop = SimpleNamespace()
    assert not thin_sigterm_broadcast(loop, 50) and vars(loop) == {}


def test_the_interval_is_validated():
    with pytest.raises(ValueError, match="sigterm_check_every_n_batches must be >= 1, got 0"):
        FrozenModelDDPStrategy(sigterm_check_every_n_batches=0)
