"""The ``seka`` command: LightningCLI (fit / validate / predict) plus a few plain subcommands.

- ``seka fit -c configs/build/synthetic_qa.yaml ...`` builds a projection bank;
- ``seka predict -c configs/predict/highlight.yaml ...`` generates with and without highlighting;
- ``seka derive --stats X.stats.safetensors --top_pct 0.8 ...`` re-derives a bank from saved statistics.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

from jsonargparse import CLI
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from seka_lightning.bank import derive_bank
from seka_lightning.baselines.pasta_profile import profile_heads
from seka_lightning.lit.builder import ProjectionBuilder
from seka_lightning.lit.callbacks import BuildStopped
from seka_lightning.lit.strategies import FROZEN_DDP
from seka_lightning.report import report
from seka_lightning.search import search

PLAIN_COMMANDS = {"derive": derive_bank, "report": report, "search": search, "pasta-profile": profile_heads}


def requested_devices(accelerator: str, devices: int | str | Sequence[int]) -> int:
    """How many devices a Trainer with these settings would use (for choosing the DDP flavour)."""
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices)
    use_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and CUDAAccelerator.is_available())
    kind = CUDAAccelerator if use_cuda else CPUAccelerator
    if devices == "auto":
        return kind.auto_device_count()
    return len(kind.get_parallel_devices(kind.parse_devices(devices)))


class SekaCLI(LightningCLI):
    """LightningCLI that runs frozen-model builds on several devices without the DDP wrapper, lets the command line
    (never a checkpoint) decide the settings of a resumed run, and exits non-zero when a signal stopped a build."""

    def _parse_ckpt_path(self) -> None:
        """Apply nothing from ``--ckpt_path``'s hyper-parameters (LightningCLI would parse them over the command line).

        They could redirect the output of a resumed build onto an earlier bank, and their ``_class_path`` would make
        the parser import any installed module. A build checks its checkpoint against the command line instead
        (``ProjectionBuilder.check_resume``).
        """

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException as stop:  # Lightning's own SIGTERM stop is a SystemExit with status 0
            raise SystemExit(128 + signal.SIGTERM) from stop

    def after_fit(self) -> None:
        stop = getattr(self.model, "stop_signal", None)
        if stop is not None and stop.signum is not None:  # came after the last agreed check; the bank was written
            raise BuildStopped(stop.signum)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        model_class = str(config.get("model", {}).get("class_path", ""))
        if not model_class.endswith(ProjectionBuilder.__name__):
            return
        trainer = config["trainer"]
        processes = requested_devices(trainer.get("accelerator", "auto"), trainer.get("devices", "auto"))
        if trainer.get("strategy") in ("auto", "ddp") and processes * int(trainer.get("num_nodes") or 1) > 1:
            trainer["strategy"] = FROZEN_DDP  # several processes, on one machine or several (num_nodes)


def run_lightning(args: Sequence[str] | None = None, *, run: bool = True) -> SekaCLI:
    return SekaCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
        args=args,
        run=run,
    )


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(
            "seka: LightningCLI commands fit / validate / test / predict (below), and\n"
            + "".join(
                f"  seka {name:<14} {(fn.__doc__ or '').strip().splitlines()[0]}\n"
                for name, fn in PLAIN_COMMANDS.items()
            )
            + "(`seka COMMAND --help` for the options of each)\n\n"
        )
    if args and args[0] in PLAIN_COMMANDS:
        CLI(PLAIN_COMMANDS[args[0]], args=args[1:])
        return
    run_lightning(None if argv is None else args)


if __name__ == "__main__":
    main()
