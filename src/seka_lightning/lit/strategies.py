"""A DDP strategy for frozen models: processes, samplers and collectives without the DDP wrapper.

Building statistics trains nothing, and ``DistributedDataParallel`` refuses a module without trainable
parameters. Everything else about DDP (process group, ranks, metric all-reduce) is what the build needs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)

FROZEN_DDP = "ddp_frozen"


def thin_sigterm_broadcast(epoch_loop: Any, every_n_batches: int) -> bool:
    """Share rank 0's SIGTERM flag every ``every_n_batches`` training batches instead of before every batch.

    Lightning broadcasts the flag and reads it on the host before each batch, so every rank waits for its GPU to
    drain and for the other ranks, once per batch: nothing of one batch overlaps the next, and each batch takes as
    long as the slowest rank's. A statistics build keeps no gradients in step, so that wait buys nothing; measured
    on two H200s it cost each rank about an eighth of its throughput (``docs/performance.md``). Every rank runs the
    same number of batches, so all ranks still enter each broadcast together. ``seka fit``'s ``ProjectionBuilder``
    replaces Lightning's SIGTERM handler while it trains (Lightning's broadcasts from inside the handler and stops the
    signalled rank alone, which can hang the others at their next collective): its ranks agree on a stop with an
    all-reduce at the same interval (see ``seka_lightning.lit.callbacks``), so this broadcast then always carries 0.
    Applying it again replaces the earlier thinning rather than compounding it. Returns False (and changes nothing)
    if this Lightning version has no such broadcast.
    """
    broadcast = getattr(epoch_loop, "_seka_unthinned_broadcast", None) or getattr(
        epoch_loop, "_broadcast_sigterm_tensor", None
    )
    if broadcast is None:
        return False
    calls = 0

    def every_nth() -> None:
        nonlocal calls
        calls += 1
        if (calls - 1) % every_n_batches == 0:
            broadcast()

    epoch_loop._seka_unthinned_broadcast = broadcast
    epoch_loop._broadcast_sigterm_tensor = every_nth
    return True


class FrozenModelDDPStrategy(DDPStrategy):
    """DDP that leaves a module with no trainable parameter unwrapped (it has no gradients to synchronise), and
    that, for such a module, checks for SIGTERM every ``sigterm_check_every_n_batches`` batches instead of every
    batch (:func:`thin_sigterm_broadcast`)."""

    strategy_name = FROZEN_DDP

    def __init__(self, *args: Any, sigterm_check_every_n_batches: int = 50, **kwargs: Any) -> None:
        if sigterm_check_every_n_batches < 1:
            raise ValueError(f"sigterm_check_every_n_batches must be >= 1, got {sigterm_check_every_n_batches}")
        super().__init__(*args, **kwargs)
        self.sigterm_check_every_n_batches = sigterm_check_every_n_batches

    def _frozen(self) -> bool:
        return not any(p.requires_grad for p in self.model.parameters())

    def configure_ddp(self) -> None:
        if self._frozen():
            log.debug("no trainable parameters: running DDP processes without the DistributedDataParallel wrapper")
        else:
            super().configure_ddp()

    def setup(self, trainer: L.Trainer) -> None:
        super().setup(trainer)
        if self._frozen() and not thin_sigterm_broadcast(
            trainer.fit_loop.epoch_loop, self.sigterm_check_every_n_batches
        ):
            log.debug("this Lightning version has no per-batch SIGTERM broadcast to thin out")


if FROZEN_DDP not in StrategyRegistry:
    StrategyRegistry.register(
        FROZEN_DDP, FrozenModelDDPStrategy, description="DDP for frozen models (statistics, no gradients)"
    )
