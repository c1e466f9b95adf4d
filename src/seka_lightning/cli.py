"""The ``seka`` command: LightningCLI (fit / validate / predict) plus plain subcommands, with one set of conventions.

- ``seka fit -c configs/build/smollm2-135m.yaml ...`` builds a projection bank;
- ``seka validate -c configs/validate/smollm2-135m.yaml ...`` checks that a bank moves attention onto highlights;
- ``seka predict -c configs/predict/highlight.yaml ...`` generates with and without highlighting;
- ``seka generate "Where is **X**?" --bank B`` does the same for one prompt, without a config;
- ``seka derive --stats X.stats.safetensors --top_pct 0.8 ...`` re-derives a bank from saved statistics;
- ``seka init DIR`` copies the shipped configs and data into DIR.

Every subcommand takes ``-c/--config`` (YAML), ``--help``, and suggests the nearest name for a typo. A ``-c`` value
that is not a file may name a shipped config (``seka fit -c smollm2-135m``; see ``resources.resolve_config``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import pkgutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import ActionConfigFile
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from seka_lightning import __version__
from seka_lightning.bank import derive_bank
from seka_lightning.baselines.pasta_profile import profile_heads
from seka_lightning.console import PlainParser, SuggestingParser, install_quiet_console, suggest
from seka_lightning.generate import generate, require_file
from seka_lightning.lit.builder import ProjectionBuilder
from seka_lightning.lit.callbacks import BuildStopped
from seka_lightning.lit.strategies import FROZEN_DDP
from seka_lightning.models import check_model_source
from seka_lightning.report import report
from seka_lightning.resources import init, resolve_config
from seka_lightning.search import search

log = logging.getLogger(__name__)

PLAIN_COMMANDS: dict[str, Callable[..., Any]] = {
    "generate": generate,
    "derive": derive_bank,
    "search": search,
    "report": report,
    "pasta-profile": profile_heads,
    "init": init,
}
LIGHTNING_COMMANDS = {
    "fit": "build a projection bank (or train an AdaSEKA routing gate) from a config",
    "validate": "attention on the highlight and answer likelihood, unsteered vs steered",
    "predict": "generate with and without highlighting, or score a benchmark",
}
# packages whose classes a config may name by their short name (`--model ProjectionBuilder`): jsonargparse resolves
# short names among the imported subclasses of the expected base class
CONFIGURABLE_PACKAGES = (
    "seka_lightning.lit",
    "seka_lightning.data",
    "seka_lightning.baselines",
    "seka_lightning.adaseka",
    "seka_lightning.benchmarks",
)
CONFIG_FLAGS = ("-c", "--config")
# init arguments that name input files a run reads: checked before any model is loaded
INPUT_FILE_KEYS = ("bank", "neg", "gate")


def requested_devices(accelerator: str, devices: int | str | Sequence[int]) -> int:
    """How many devices a Trainer with these settings would use (for choosing the DDP flavour)."""
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices)
    use_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and CUDAAccelerator.is_available())
    kind = CUDAAccelerator if use_cuda else CPUAccelerator
    if devices == "auto":
        return kind.auto_device_count()
    return len(kind.get_parallel_devices(kind.parse_devices(devices)))


def process_group_open() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def end_process_group() -> None:
    """Close the DDP process group before the interpreter exits. Lightning leaves it open; a gloo group still open
    at exit can abort the process (``terminate called without an active exception``, exit -6) after a good run.
    Never raises: it runs on the way out of a stopped or failed command, whose exit status must stay."""
    try:
        torch.distributed.destroy_process_group()
    except Exception as error:
        log.warning("could not close the process group (%s: %s)", type(error).__name__, error)


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
        caller_group = process_group_open()  # a caller's own group (torchrun script, say) is theirs to close
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException as stop:  # Lightning's own SIGTERM stop is a SystemExit with status 0
            raise SystemExit(128 + signal.SIGTERM) from stop
        finally:
            if not caller_group and process_group_open():
                end_process_group()

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and predict (no module here has a test step)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in LIGHTNING_COMMANDS}

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_input_paths(config.get("model"))
        model_class = str(config.get("model", {}).get("class_path", ""))
        if not model_class.endswith(ProjectionBuilder.__name__):
            return
        trainer = config["trainer"]
        processes = requested_devices(trainer.get("accelerator", "auto"), trainer.get("devices", "auto"))
        if trainer.get("strategy") in ("auto", "ddp") and processes * int(trainer.get("num_nodes") or 1) > 1:
            trainer["strategy"] = FROZEN_DDP  # several processes, on one machine or several (num_nodes)

    def after_fit(self) -> None:
        stop = getattr(self.model, "stop_signal", None)
        if stop is not None and stop.signum is not None:  # came after the last agreed check; the bank was written
            raise BuildStopped(stop.signum)
        if self.trainer.is_global_zero:
            log_next_steps(fit_summary(self.model, self.trainer))

    def after_validate(self) -> None:
        if self.trainer.is_global_zero:
            log_next_steps(validate_summary(self.model))

    def after_predict(self) -> None:
        if self.trainer.is_global_zero:
            log_next_steps(predict_summary(self.trainer))


def check_input_paths(model_config: Any) -> None:
    """Fail before any model loads when a bank/gate file or a local model path in the model's config is missing."""
    if model_config is None:
        return
    for key, value in model_config.items():
        name = key.rpartition(".")[2]
        if name in INPUT_FILE_KEYS and isinstance(value, str):
            require_file(value, f"--model.{key.replace('init_args.', '')}")
        elif name == "pretrained" and isinstance(value, str):
            check_model_source(value)


PREDICT_CONFIGS = {  # (model, chat-built bank) -> the shipped predict config for its banks
    ("embedded:smollm2-135m", False): "configs/predict/highlight.yaml",
    ("embedded:smollm2-135m", True): "configs/predict/highlight-chat.yaml",
    ("embedded:gemma3-270m", False): "configs/predict/highlight-gemma3.yaml",
}


def fit_summary(model: Any, trainer: Any) -> list[str]:
    """What a fit wrote, and the command that uses it."""
    lines = []
    if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
        lines.append(f"metrics logged to {trainer.logger.log_dir}")
    if isinstance(model, ProjectionBuilder):
        bank, pretrained = model.hparams.output, model.hparams.pretrained
        shipped = (pretrained, bool(model.hparams.get("chat", False)))
        if shipped in PREDICT_CONFIGS:  # a shipped model: its own predict config (chat template, layers)
            predict_config, model_option = PREDICT_CONFIGS[shipped], ""
        else:
            predict_config, model_option = "configs/predict/highlight.yaml", f" --model.pretrained {pretrained}"
        lines.append(f"next: seka predict -c {predict_config}{model_option} --model.method.bank {bank}")
        lines.append(f'  or: seka generate "Currently **X is in Rome**. Where is X?" --bank {bank}')
    return lines


def validate_summary(model: Any) -> list[str]:
    """Where ``seka validate`` wrote its curves, and the command that uses the bank."""
    output = getattr(model, "output", None)
    if output is None:
        return []
    return [
        f"curves in {output}, figure in {Path(output).with_suffix('.png')}",
        f"next: seka predict -c configs/predict/highlight.yaml --model.method.bank {model.method.bank_path}",
    ]


def predict_summary(trainer: Any) -> list[str]:
    """What ``seka predict`` wrote and, on a benchmark, its headline metric."""
    from seka_lightning.lit.writers import BenchmarkWriter, ComparisonWriter
    from seka_lightning.report import LAYOUT, results_root

    lines = []
    for callback in trainer.callbacks:
        if isinstance(callback, ComparisonWriter):
            lines.append(f"unsteered and steered generations in {callback.output}")
            bank = getattr(trainer.lightning_module.method, "bank_path", None)
            if bank is not None:
                lines.append(
                    "next, on a benchmark: seka predict -c configs/eval/counterfact.yaml --model.method SekaMethod "
                    f"--model.method.bank {bank}"
                )
            if callback.summary_written:
                lines.append(f"summary in {callback.summary_path}")
            if callback.summary_line is not None:
                lines.append(callback.summary_line)
        elif isinstance(callback, BenchmarkWriter):
            results_file = callback.output_dir / "metric_result.json"
            metrics = json.loads(results_file.read_text())["metrics"] if results_file.is_file() else {}
            headline = next(iter(metrics.items()), None)
            score = f"{headline[0]} {headline[1]:.4f}; " if headline else ""
            lines.append(f"{score}metrics and predictions in {callback.output_dir}")
            root = results_root(callback.output_dir)
            if root is not None:
                lines.append(f"next: seka report --results {root} --output report.md")
            else:
                lines.append(f"compare runs with seka report once they sit in its layout {LAYOUT}")
    return lines


def log_next_steps(lines: Sequence[str]) -> None:
    for line in lines:
        log.info(line)


def import_configurable_classes() -> None:
    """Import every module that defines a configurable class, so configs may name classes by their short names."""
    for package_name in CONFIGURABLE_PACKAGES:
        package = importlib.import_module(package_name)
        for module in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            importlib.import_module(module.name)


def run_lightning(args: Sequence[str] | None = None, *, run: bool = True) -> SekaCLI:
    """``seka fit / validate / predict``: no optimizer options (nothing is optimised by a config here)."""
    import_configurable_classes()
    return SekaCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
        auto_configure_optimizers=False,
        parser_class=SuggestingParser,
        seed_everything_default=0,
        args=args,
        run=run,
    )


def first_line(fn: Callable[..., Any]) -> str:
    return (fn.__doc__ or "").strip().splitlines()[0]


def overview() -> str:
    """The top-level ``seka --help``: every subcommand with its one-line description."""
    rows = [f"  {name:<14} {text}\n" for name, text in LIGHTNING_COMMANDS.items()]
    plain = [f"  {name:<14} {first_line(fn)}\n" for name, fn in PLAIN_COMMANDS.items()]
    return (
        "usage: seka [-h] [-V] COMMAND [-c CONFIG] [options]\n\n"
        "Prompt highlighting by spectral key steering (SEKA / AdaSEKA).\n\n"
        "Lightning commands (a YAML config with -c; every option can be overridden on the command line):\n"
        + "".join(rows)
        + "\nplain commands (options on the command line or in a YAML config with -c):\n"
        + "".join(plain)
        + "\n`seka COMMAND --help` lists the options of each; `seka --version` prints the version.\n"
    )


def plain_parser(name: str) -> PlainParser:
    """The parser of one plain subcommand: its function's parameters, ``-c/--config`` and ``--print_config``."""
    fn = PLAIN_COMMANDS[name]
    parser = PlainParser(prog=f"seka {name}", description=first_line(fn))
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML file with these options")
    parser.add_function_arguments(fn, as_positional=True, fail_untyped=True)
    return parser


# the natural next command after each plain command, from its options (the Lightning commands have theirs above)
PLAIN_NEXT_STEPS: dict[str, Callable[[dict[str, Any]], str]] = {
    "derive": lambda o: f"next: seka predict -c configs/predict/highlight.yaml --model.method.bank {o['output']}",
    "search": lambda o: f"next: put the best setting in {o['output']} into a method config, then seka predict",
    "report": lambda o: (
        f"next: seka report --verify true --results {o['results']}"
        if not o.get("verify")
        else "next: commit the results folder with its predictions"
    ),
    "pasta-profile": lambda o: (
        "next: seka predict -c configs/eval/counterfact.yaml --model.method PastaMethod "
        f"--model.method.heads {o['output']}"
    ),
    "init": lambda o: f"next: cd {o['directory']} && seka fit -c configs/build/smollm2-135m.yaml",
}


def bare_flags_as_true(fn: Callable[..., Any], args: Sequence[str]) -> list[str]:
    """``--overwrite`` alone means ``--overwrite true`` for a boolean option of ``fn`` (the spelling the error
    messages use); ``--overwrite true/false`` still works."""
    flags = {f"--{name}" for name, p in inspect.signature(fn).parameters.items() if p.annotation in (bool, "bool")}
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        following = args[i + 1] if i + 1 < len(args) else None
        if arg in flags and (following is None or following.startswith("-")):
            out.append("true")
    return out


def run_plain(name: str, args: Sequence[str]) -> Any:
    """Parse ``args`` for the plain subcommand ``name``, call its function and log the natural next command."""
    parser = plain_parser(name)
    config = parser.instantiate_classes(parser.parse_args(bare_flags_as_true(PLAIN_COMMANDS[name], args)))
    parameters = inspect.signature(PLAIN_COMMANDS[name]).parameters
    options = {key: config[key] for key in parameters if key in config}
    result = PLAIN_COMMANDS[name](**options)
    if name in PLAIN_NEXT_STEPS:
        log_next_steps([PLAIN_NEXT_STEPS[name](options)])
    return result


def unknown_command(name: str) -> NoReturn:
    guess = suggest(name, [*LIGHTNING_COMMANDS, *PLAIN_COMMANDS])
    hint = f"; did you mean {guess!r}?" if guess else ""
    sys.stderr.write(f"seka: error: unknown command {name!r}{hint}\n(`seka --help` lists the commands)\n")
    raise SystemExit(2)


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with each ``-c/--config`` value that names a shipped config replaced by that config's file."""
    command = args[0] if args and not args[0].startswith("-") else None
    resolved = list(args)
    for i, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if equals and flag in CONFIG_FLAGS:
            resolved[i] = f"{flag}={resolve_config(value, command=command)}"
        elif i > 0 and args[i - 1] in CONFIG_FLAGS:
            resolved[i] = resolve_config(arg, command=command)
    return resolved


def main(argv: Sequence[str] | None = None) -> None:
    """The ``seka`` entry point."""
    install_quiet_console()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        (sys.stdout if args else sys.stderr).write(overview())
        raise SystemExit(0 if args else 2)
    if args[0] in ("-V", "--version"):
        sys.stdout.write(f"seka {__version__}\n")
        return
    try:
        args = resolve_config_args(args)
    except (FileNotFoundError, ValueError) as err:
        sys.stderr.write(f"seka: error: {err}\n")
        raise SystemExit(2) from None
    if argv is None:
        sys.argv[1:] = args  # DDP starts its other processes from sys.argv: they get the same config files
    if args[0] in PLAIN_COMMANDS:
        run_plain(args[0], args[1:])
    elif args[0] in LIGHTNING_COMMANDS or args[0].startswith("-"):
        run_lightning(None if argv is None else args)
    else:
        unknown_command(args[0])


if __name__ == "__main__":
    main()
