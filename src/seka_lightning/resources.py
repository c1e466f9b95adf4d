"""The configs and data shipped with seka-lightning, usable from any directory after ``pip install``.

The wheel carries the repository's ``configs/`` and ``data/`` as ``seka_lightning/shipped/`` (``setup.py`` copies
them at build time; git holds one copy). An editable install or a checkout reads them from the repository itself.

- ``seka fit -c smollm2-135m``: a ``-c`` value that is not a file is looked up among the shipped configs
  (:func:`resolve_config`); ``configs/build/smollm2-135m.yaml`` resolves the same way outside a checkout.
- ``data/synthetic_qa.jsonl`` in a config: a relative data path that does not exist in the working directory but
  is shipped resolves to the shipped file, with an info log (:func:`resolve_data_path`). A file in the working
  directory always wins, so a user's data is never shadowed.
- ``seka init DIR`` copies the configs and data into ``DIR`` (:func:`init`), for editing.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from seka_lightning.files import atomic_path

log = logging.getLogger(__name__)

# what a wheel ships: folder -> file patterns (setup.py and MANIFEST.in list the same)
SHIPPED_FILES = {"configs": ("*.yaml", "*.json"), "data": ("*.jsonl",)}
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# the configs folders a bare name is looked up in, per command; other configs are named by their path under configs/
COMMAND_CONFIGS = {"fit": ("build",), "validate": ("validate",), "predict": ("predict", "eval")}
# a -c value that could be a config name (not inline YAML/JSON)
NAME_PATTERN = re.compile(r"[\w.\-/]+")


def shipped_root() -> Path | None:
    """The folder holding the shipped ``configs/`` and ``data/``: inside the installed package, else the checkout
    this module runs from (an editable install); None when neither has them."""
    packaged = Path(__file__).resolve().parent / "shipped"
    if (packaged / "configs").is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "configs").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout
    return None


def shipped_files(root: Path) -> Iterator[Path]:
    """Every shipped file under ``root``, as a path relative to it, in sorted order."""
    for folder, patterns in SHIPPED_FILES.items():
        found = {path for pattern in patterns for path in (root / folder).rglob(pattern) if path.is_file()}
        yield from sorted(path.relative_to(root) for path in found)


def shipped_configs(root: Path) -> dict[str, Path]:
    """The shipped configs by name: their paths under ``configs/`` without the suffix."""
    return {
        path.relative_to("configs").with_suffix("").as_posix(): root / path
        for path in shipped_files(root)
        if path.parts[0] == "configs" and path.suffix in CONFIG_SUFFIXES
    }


def resolve_config(value: str, *, command: str | None = None, root: Path | None = None) -> str:
    """The config file a ``-c`` value names: ``value`` itself when it is a file (or inline YAML), else a shipped config.

    A name with a ``/`` is a path under ``configs/`` (``adaseka/gate/smollm2-135m``; a leading ``configs/`` and the
    suffix are optional). A bare name (``smollm2-135m``) is looked up in the command's folders (``fit``: build,
    ``validate``: validate, ``predict``: predict and eval; other commands: all). Raises ``FileNotFoundError`` for an
    unknown name (with the nearest) and ``ValueError`` for a bare name several configs share (with all of them).
    """
    if Path(value).exists() or not NAME_PATTERN.fullmatch(value):
        return value
    root = shipped_root() if root is None else root
    if root is None:
        return value
    configs = shipped_configs(root)
    key = value.removeprefix("configs/")
    if Path(key).suffix in CONFIG_SUFFIXES:
        key = key.removesuffix(Path(key).suffix)
    if "/" in key:
        candidates = list(configs)
        matches = [name for name in candidates if name == key]
    else:
        folders = COMMAND_CONFIGS.get(command or "")
        candidates = [name for name in configs if folders is None or name.rpartition("/")[0] in folders]
        matches = [name for name in candidates if name.rpartition("/")[2] == key]
    if len(matches) > 1:
        raise ValueError(f"config name {value!r} is ambiguous: it names {', '.join(matches)}; give one of these")
    if not matches:
        elsewhere = [name for name in configs if name.rpartition("/")[2] == key]
        guess = nearest_config(key, candidates)
        hint = (
            f"; give its path: {', '.join(elsewhere)}" if elsewhere else f"; did you mean {guess!r}?" if guess else ""
        )
        raise FileNotFoundError(
            f"config {value!r} is neither a file nor a shipped config{hint} (shipped: {', '.join(configs)})"
        )
    log.info("config %s: the shipped %s", value, configs[matches[0]])
    return str(configs[matches[0]])


def nearest_config(key: str, names: Iterable[str]) -> str | None:
    """The config name closest to ``key``, compared by path, or by file name for a bare ``key``."""
    by_key = {name if "/" in key else name.rpartition("/")[2]: name for name in names}
    guess = difflib.get_close_matches(key, list(by_key), n=1)
    return by_key[guess[0]] if guess else None


def resolve_data_path(path: str | Path, *, root: Path | None = None) -> Path:
    """``path``, or the shipped file of that relative path when ``path`` does not exist here (logged once).

    Only a relative path that is missing in the working directory falls back, so a user's file is never shadowed;
    a path that exists nowhere is returned unchanged (its reader names the problem).
    """
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    root = shipped_root() if root is None else root
    if root is None or not path.parts or path.parts[0] not in SHIPPED_FILES:
        return path
    shipped = root / path
    if not shipped.is_file():
        return path
    _log_fallback(str(path), str(shipped))
    return shipped


@functools.cache
def _log_fallback(path: str, shipped: str) -> None:
    log.info("%s is not in the working directory; reading the shipped %s", path, shipped)


def init(directory: str, *, overwrite: bool = False) -> list[Path]:
    """Copy the shipped configs/ and data/ into DIRECTORY, ready to edit and run there.

    Files already there with the same content are left alone; any other existing file stops the copy before
    anything is written, unless ``overwrite`` (``--overwrite true``) replaces it. Returns the files written.

    Args:
        directory: where ``configs/`` and ``data/`` go (created if missing).
        overwrite: replace existing files whose content differs from the shipped ones.
    """
    root = shipped_root()
    if root is None:
        raise FileNotFoundError(
            "this installation of seka-lightning has no shipped configs; reinstall it from a wheel or a checkout"
        )
    target = Path(directory)
    plan = [(root / name, target / name) for name in shipped_files(root)]
    blocked = sorted(
        {dest for _, dest in plan if dest.is_dir()}
        | {folder for _, dest in plan for folder in dest.parents if folder.exists() and not folder.is_dir()}
    )
    if blocked:
        raise FileExistsError(
            f"{', '.join(map(str, blocked))} is in the way of the shipped files (a folder where a file goes, or a "
            "file where a folder goes); nothing was copied: move it away or choose another directory"
        )
    differing = [dest for source, dest in plan if dest.exists() and dest.read_bytes() != source.read_bytes()]
    if differing and not overwrite:
        raise FileExistsError(
            f"{len(differing)} file(s) in {target} differ from the shipped ones ({', '.join(map(str, differing))}); "
            "nothing was copied: pass --overwrite true to replace them, or choose another directory"
        )
    written = []
    for source, dest in plan:
        if dest.exists() and dest.read_bytes() == source.read_bytes():
            continue
        with atomic_path(dest) as tmp:
            tmp.write_bytes(source.read_bytes())
        written.append(dest)
    log.info("copied %d file(s) to %s (%d already there)", len(written), target, len(plan) - len(written))
    log.info("next: cd %s && seka fit -c configs/build/smollm2-135m.yaml", target)
    return written
