"""Safe output files: one overwrite policy for every writer, and atomic writes (a temp file beside the target, then
a rename, so a reader never sees half a file).

The policy (:func:`check_output`), applied by every command before it loads a model or computes anything:

- an output is never one of the command's inputs (``seka derive --stats S --output S`` is refused);
- an existing file of another kind (statistics where a bank goes, a data file where predictions go, a file seka does
  not write) is never replaced, not even with ``overwrite``;
- an existing result of the same kind is replaced only when the user asks: ``--overwrite`` on plain commands,
  ``--model.overwrite true`` or a writer's ``overwrite`` init arg under LightningCLI;
- the output's folder must exist and be writable, or be creatable (:func:`require_writable_folder`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BANK = "projection bank"
STATISTICS = "key-statistics file"
GATE = "routing gate"
PREDICTIONS = "predictions file"
BENCHMARK_RESULTS = "benchmark result"
SEARCH_RESULTS = "search result"
PASTA_HEADS = "PASTA head set"
VALIDATION_REPORT = "validation report"
HIGHLIGHT_SUMMARY = "highlight summary"
REPORT = "results table"
PLOT = "plot"

STATISTICS_TENSORS = {"count", "a0", "a_pos", "a_neg", "d_pos_neg", "d_pos_neutral"}
REPORT_HEADER = "| benchmark | model | method |"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp file beside ``path`` to write; renamed onto ``path`` when the block ends, removed if it raises.

    The file gets mode 0666 less the umask (what ``open(path, "w")`` gives), not the 0600 of ``tempfile.mkstemp``,
    so it is as readable as any other file the user creates; the mode is set again before the rename because some
    writers (safetensors) replace the temp file with one of their own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        mode = stat.S_IMODE(tmp.stat().st_mode)
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_temp(path: Path) -> Path:
    """Create an empty, new temp file beside ``path`` with the umask's permissions."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; the temp file is removed if anything fails."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Indented JSON; values JSON cannot hold (paths, dtypes) are written as strings."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per line (non-ASCII kept as is; readers must split on ``\\n`` only)."""
    return write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def check_output(
    path: str | Path,
    *,
    kind: str,
    inputs: Mapping[str, str | Path | Iterable[str | Path] | None] | None = None,
    overwrite: bool = False,
    flag: str = "--overwrite",
) -> Path:
    """Apply the overwrite policy (module docstring) to the output ``path`` of a file of ``kind``; returns the path.

    ``inputs`` maps each input's option name to its path(s), so an error can name it; ``flag`` is how the user
    passes ``overwrite`` to this command. Raises ``ValueError`` (an input) or ``FileExistsError`` (an existing
    file), each naming the path and the fix.
    """
    path = Path(path)
    for option, value in (inputs or {}).items():
        for source in _paths(value):
            if _same_file(path, source):
                raise ValueError(
                    f"the output {path} is also this command's input {option} ({source}); writing it would destroy "
                    f"the input: choose another output path"
                )
    if path.is_dir():
        raise FileExistsError(f"the output {path} is a directory; give a file path for the {kind}")
    require_writable_folder(path)
    if not path.exists():
        return path
    found = file_kind(path)
    if found is None:
        raise FileExistsError(
            f"{path} already exists and is not a {kind} written by seka; choose another output path "
            f"({flag} never replaces other files)"
        )
    if found != kind:
        raise FileExistsError(
            f"{path} already holds a {found}, not a {kind}; choose another output path "
            f"({flag} never replaces a file of another kind)"
        )
    if not overwrite:
        raise FileExistsError(f"{path} already holds a {kind}; pass {flag} to replace it, or choose another path")
    return path


def require_writable_folder(path: str | Path) -> Path:
    """Raise unless ``path``'s folder exists and is writable, or can be created: checked before any compute, so a
    long run never ends in an output it cannot write. Returns the nearest existing folder."""
    path = Path(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(
            f"cannot write {path}: {folder} is a file, not a folder; choose an output path under a folder"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write {path}: the folder {folder} is not writable; choose an output path you can write to"
        )
    return folder


def _paths(value: str | Path | Iterable[str | Path] | None) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, str | Path):
        return [Path(value)]
    return [Path(v) for v in value if v is not None]


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (also through links); a path that does not exist is compared by name."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def file_kind(path: str | Path) -> str | None:
    """Which kind of file seka writes ``path`` holds, read from its format tag or content; None if none."""
    path = Path(path)
    if path.stat().st_size == 0:
        return None
    for suffixes, sniff in _SNIFFERS:
        if path.name.endswith(suffixes):
            try:
                return sniff(path)
            except (OSError, ValueError, UnicodeDecodeError):
                return None
    return None


def _safetensors_header(path: Path) -> tuple[dict[str, str], set[str], dict[str, Any]]:
    """A safetensors file's header metadata, its tensor names and the JSON under the header's ``seka`` key (``{}``
    when there is none); reads the header only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header, names = f.metadata() or {}, set(f.keys())
    seka = json.loads(header.get("seka", "{}"))
    return header, names, seka if isinstance(seka, dict) else {}


def bank_metadata(path: str | Path) -> dict[str, Any] | None:
    """The metadata a seka-lightning bank file records (``ProjectionBank.save``); None for any other file."""
    from safetensors import SafetensorError

    try:
        seka = _safetensors_header(Path(path))[2]
    except (OSError, ValueError, SafetensorError):
        return None
    return seka if seka.get("format") == "seka-lightning-bank" else None


def _safetensors_kind(path: Path) -> str | None:
    from safetensors import SafetensorError

    try:
        header, names, seka = _safetensors_header(path)
    except SafetensorError:
        return None
    if header.get("format") == "seka-routing-gate":  # adaseka.gate.GATE_FORMAT (not imported: gate imports this module)
        return GATE
    if seka.get("format") == "seka-lightning-bank":
        return BANK
    if seka.get("format") == "seka-lightning-statistics" or STATISTICS_TENSORS <= names:
        return STATISTICS
    return None


def _jsonl_kind(path: Path) -> str | None:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    if isinstance(first, dict) and (
        {"unsteered", "steered"} <= first.keys()
        or {"uid", "highlights"} <= first.keys()
        or {"id", "scores"} <= first.keys()
    ):
        return PREDICTIONS
    return None


def _json_kind(path: Path) -> str | None:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        return None
    for keys, kind in (
        ({"metrics", "method"}, BENCHMARK_RESULTS),
        ({"grid", "best"}, SEARCH_RESULTS),
        ({"layers", "scores", "settings"}, PASTA_HEADS),
        ({"summary", "attention_mass_per_layer"}, VALIDATION_REPORT),
        ({"follows_highlight", "attention_on_highlight"}, HIGHLIGHT_SUMMARY),
    ):
        if keys <= data.keys():
            return kind
    return None


def _markdown_kind(path: Path) -> str | None:
    with path.open(encoding="utf-8") as f:
        return REPORT if f.readline().startswith(REPORT_HEADER) else None


def _png_kind(path: Path) -> str | None:
    with path.open("rb") as f:
        head = f.read(4096)
    return PLOT if head.startswith(b"\x89PNG") and b"Matplotlib" in head else None


_SNIFFERS: tuple[tuple[tuple[str, ...], Callable[[Path], str | None]], ...] = (
    ((".safetensors",), _safetensors_kind),
    ((".jsonl", ".jsonl.gz"), _jsonl_kind),
    ((".json",), _json_kind),
    ((".md",), _markdown_kind),
    ((".png",), _png_kind),
)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
