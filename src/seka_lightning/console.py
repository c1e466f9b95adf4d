"""What the ``seka`` command shows: no known-benign library chatter, short log lines, and typo suggestions.

Only messages known to be harmless here are dropped (each by its own pattern), so warnings of ours and unexpected
library warnings still show.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

# Lightning warnings that describe what a frozen-model build or evaluation does on purpose.
BENIGN_WARNINGS = (
    r"You passed in a `val_dataloader` but have no `validation_step`",  # fit: validation data is for `seka validate`
    r"`LightningModule.configure_optimizers` returned `None`",  # nothing is optimised in a build
    r"Found \d+ module\(s\) in eval mode",  # the pretrained model is frozen in eval mode
    r"Your `IterableDataset` has `__len__` defined",  # our datasets know their length
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of a torch API
    r"GPU available but not used",
    r"TPU available but not used",
    r".*does not have many workers",  # tokenisation happens in the step, not in the loader
    r"No seed found, seed set to 0",
    r"Couldn't infer the batch indices",  # our writers key each prediction by its example id, not a batch index
)
# Lightning log lines (info) that are advertising or restate the obvious.
BENIGN_LOG_LINES = (
    r"💡 Tip:",
    r"(GPU|TPU|HPU) available: ",
    r"`weights_only` was not set",
    r"Seed set to ",
    r"`Trainer\.\w+` stopped: `max_epochs=\d+` reached",
)
LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
    "lightning.pytorch.trainer.connectors.checkpoint_connector",
)


class DropMatching(logging.Filter):
    """Drops log records whose message starts with one of ``patterns`` (regular expressions)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


class LevelFormatter(logging.Formatter):
    """Info lines as bare messages; warnings and errors keep their level and logger name."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return record.getMessage()
        return f"{record.levelname} {record.name}: {record.getMessage()}"


def install_quiet_console() -> None:
    """Targeted filters for known-benign warnings and log lines, a short log format, no weight-loading bars."""
    for pattern in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    drop = DropMatching(BENIGN_LOG_LINES)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMatching) for f in logger.filters):
            logger.addFilter(drop)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(LevelFormatter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights: 100%" on every model load


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word`` (difflib ratio >= 0.6), or None."""
    matches = difflib.get_close_matches(word, list(candidates), n=1)
    return matches[0] if matches else None


def known_class_names() -> set[str]:
    """Names of the classes defined in the imported ``seka_lightning`` and Lightning callback / logger modules."""
    names = set()
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(
            ("seka_lightning.", "lightning.pytorch.callbacks", "lightning.pytorch.loggers")
        ):
            continue
        names.update(
            name for name, value in vars(module).items() if inspect.isclass(value) and not name.startswith("_")
        )
    return names


def option_names(parser: Any) -> list[str]:
    """The long options of a parser (``--trainer.max_epochs``, ...)."""
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def class_parameters(class_path: str) -> list[str]:
    """``__init__`` parameter names of the class at ``class_path`` (empty where it cannot be imported)."""
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(sys.modules.get(module_name), name, None)
    if cls is None:
        return []
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


def hint_for(message: str, parser: Any) -> str | None:
    """A "did you mean" line for a parser error message, where a close match exists."""
    if match := re.search(r"unrecognized arguments: (--[\w.\-]+)", message):
        given = match.group(1)
        guess = suggest(given, option_names(parser))
        return f"did you mean {guess}?" if guess else None
    if match := re.search(r"class_path '([\w.]+)':\s*(?:Option|Key) '([\w.]+)' is not accepted", message):
        key = re.search(r'Parser key "([\w.]+)"', message)
        guess = suggest(match.group(2), class_parameters(match.group(1)))
        prefix = f"--{key.group(1)}." if key else "--"
        return f"did you mean {prefix}{guess}?" if guess else None
    if match := re.search(r"Expected a dot import path string: ([\w.]+)", message):
        guess = suggest(match.group(1).rpartition(".")[2], known_class_names())
        return f"did you mean {guess}?" if guess else None
    if match := re.search(r"invalid choice: '([^']+)' \(choose from ([^)]*)\)", message):
        guess = suggest(match.group(1), re.findall(r"'([^']+)'", match.group(2)))
        return f"did you mean {guess}?" if guess else None
    return None


class SuggestingMixin:
    """Parser errors end with the nearest valid option, class name or choice."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self
        hint = hint_for(message, parser)
        super().error(f"{message}\n{hint}" if hint else message, ex)  # type: ignore[misc]


class SuggestingParser(SuggestingMixin, LightningArgumentParser):
    """The parser of ``seka fit / validate / predict``."""

    def parse_args(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        """As jsonargparse's, except that an option two classes deep set to null stays null.

        jsonargparse (4.53) hands such an option (``--model.method.bank null``: an argument of the method of the
        model) to the inner class's parser as ``--bank=None``, the text of the value it already parsed, so
        ``str | None`` options got the string ``'None'`` and ``int | None`` ones were refused. The inner parsers
        are of this class (built with ``exit_on_error=False``); there a value of exactly ``None`` is read back as
        null, so ``--model.method.bank None`` is null too (an option one class deep, ``--data.path None``, keeps the
        string, as jsonargparse gives it)."""
        if not self.exit_on_error and args is not None and len(args) == 1:
            key, sep, value = str(args[0]).partition("=")
            if sep and value == "None":
                args = [f"{key}=null"]
        return super().parse_args(args, *rest, **kwargs)


class PlainParser(SuggestingMixin, ArgumentParser):
    """The parser of the plain subcommands (``seka derive``, ``seka generate``, ...)."""
