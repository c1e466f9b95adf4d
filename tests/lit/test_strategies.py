"""ddp_frozen: the SIGTERM flag is shared every N batches, on every rank at the same batches."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from seka_lightning.lit.strategies import FrozenModelDDPStrategy, thin_sigterm_broadcast


def test_lightning_still_broadcasts_sigterm_per_batch_where_the_strategy_expects_it():
    # if Lightning renames or stops calling this, thin_sigterm_broadcast becomes a no-op and DDP builds lose overlap
    assert callable(getattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", None))
    assert "self._broadcast_sigterm_tensor()" in inspect.getsource(_TrainingEpochLoop.advance)


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


def _broadcasts_over_seven_batches(loop: SimpleNamespace) -> int:
    before = len(loop.calls)
    for _ in range(7):
        loop._broadcast_sigterm_tensor()
    return len(loop.calls) - before


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_setup_thins_the_broadcast_for_frozen_modules_only_and_never_twice(monkeypatch, trainable):
    monkeypatch.setattr(DDPStrategy, "setup", lambda self, trainer: None)  # no process group needed
    module = nn.Linear(2, 2).requires_grad_(trainable)
    loop = SimpleNamespace(calls=[])
    loop._broadcast_sigterm_tensor = lambda: loop.calls.append(1)
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=loop))
    strategy = FrozenModelDDPStrategy(sigterm_check_every_n_batches=3)
    strategy.model = module
    strategy.setup(trainer)
    assert _broadcasts_over_seven_batches(loop) == (7 if trainable else 3)  # batches 1, 4, 7
    strategy.setup(trainer)  # fit then validate on the same trainer: thinned once, not every 9 batches
    assert _broadcasts_over_seven_batches(loop) == (7 if trainable else 3)
