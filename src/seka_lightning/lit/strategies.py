"""A DDP strategy for frozen models: processes, samplers and collectives without the DDP wrapper.

Building statistics trains nothing, and ``DistributedDataParallel`` refuses a module without trainable
parameters. Everything else about DDP (process group, ranks, metric all-reduce) is what the build needs.
"""

from __future__ import annotations

import logging

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

log = logging.getLogger(__name__)

FROZEN_DDP = "ddp_frozen"


class FrozenModelDDPStrategy(DDPStrategy):
    """DDP that leaves a module with no trainable parameter unwrapped (it has no gradients to synchronise)."""

    strategy_name = FROZEN_DDP

    def configure_ddp(self) -> None:
        if any(p.requires_grad for p in self.model.parameters()):
            super().configure_ddp()
        else:
            log.debug("no trainable parameters: running DDP processes without the DistributedDataParallel wrapper")


if FROZEN_DDP not in StrategyRegistry:
    StrategyRegistry.register(
        FROZEN_DDP, FrozenModelDDPStrategy, description="DDP for frozen models (statistics, no gradients)"
    )
