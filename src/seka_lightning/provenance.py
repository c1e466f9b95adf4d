"""Provenance of an evaluation run: the code (git commit), the command and config files, the model weights, the
bank and other input files, and the seeds, so that a number in ``metric_result.json`` can be traced and re-run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from seka_lightning.files import bank_metadata, file_sha256
from seka_lightning.models import EMBEDDED_PREFIX

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SOURCE_COMMIT_ENV = "SEKA_SOURCE_COMMIT"


def git_state(source: str | Path | None = None) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the checkout holding ``source`` (default: this package's sources); ``dirty`` means
    tracked files differ from the commit.

    A copy of the sources made elsewhere (as on a remote GPU machine) may sit in no checkout, or in a stale one whose
    HEAD is not the copied code: whoever copies the sources then sets ``$SEKA_SOURCE_COMMIT``, which wins (``dirty``
    is then unknown, and what git saw is kept as ``git_head``). Without either, both are None and ``reason`` says why.
    """
    where = Path(source) if source is not None else Path(__file__).resolve().parent
    try:
        commit = _git(where, "rev-parse", "HEAD")
        changed = _git(where, "status", "--porcelain", "--untracked-files=no")
        seen: dict[str, Any] = {"commit": commit, "dirty": bool(changed)}
    except (OSError, subprocess.CalledProcessError) as err:
        seen = {"commit": None, "dirty": None, "reason": f"not a git checkout or git unavailable ({err})"}
    copied = os.environ.get(SOURCE_COMMIT_ENV)
    if not copied:
        return seen
    return {
        "commit": copied,
        "dirty": None,
        "reason": f"the commit is ${SOURCE_COMMIT_ENV}, set by whoever copied the sources",
        "git_head": seen["commit"],
    }


def source_sha256(root: str | Path | None = None) -> str | None:
    """SHA-256 over the Python files of this package as installed (default) or of the package folder ``root``: each
    ``.py`` file's path relative to the folder, its length and its bytes, in path order. Other files do not count:
    hidden ones (editor swap files), caches, and the configs and data a wheel ships under ``shipped/`` (a run hashes
    the ones it reads as its input files), so an editable install and a wheel of one commit hash alike.

    It names the code a run imported, where the git state cannot: edits not committed, a copy outside any checkout
    (``$SEKA_SOURCE_COMMIT`` is only what the copier says), and commits that change nothing in the package (docs,
    tests, results), which leave the code the same. See ``SOURCE_SHA256_AT_IMPORT`` for the code a process runs.

    None where the files cannot be read (a package imported from a zip has none on disk; an unreadable file): the
    code is then unknown, never "the same"."""
    folder = Path(root) if root is not None else Path(__file__).resolve().parent
    digest, hashed = hashlib.sha256(), 0
    try:
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder)
            skipped = relative.parts[0] == "shipped" or any(part.startswith(".") for part in relative.parts)
            if skipped or "__pycache__" in relative.parts or not path.is_file():
                continue
            data = path.read_bytes()
            digest.update(f"{relative.as_posix()}\0{len(data)}\0".encode())
            digest.update(data)
            hashed += 1
    except OSError:
        return None
    return digest.hexdigest() if hashed else None


def git_record(at_start: Mapping[str, Any] | None) -> dict[str, Any]:
    """The git state a run records: the one at its start where known, with ``changed_during_run`` (the state at the
    end) if the commit or the dirty flag differs by the end; else the state now."""
    now = git_state()
    if at_start is None:
        return now
    record = dict(at_start)
    if (now.get("commit"), now.get("dirty")) != (at_start.get("commit"), at_start.get("dirty")):
        record["changed_during_run"] = {"commit": now.get("commit"), "dirty": now.get("dirty")}
    return record


def _git(where: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip()


def config_files(argv: Sequence[str]) -> list[dict[str, str | None]]:
    """The ``-c``/``--config`` files of a command line with their SHA-256 (None where the file is gone)."""
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return [{"path": p, "sha256": file_sha256(p) if Path(p).is_file() else None} for p in paths]


def weights_hash(pretrained: str) -> dict[str, Any]:
    """``{"sha256", "source"}`` of a model's weights: the pinned GGUF hash of an embedded model, a hash over the
    weight files of a local folder (sorted by name, concatenated), else None with the ``reason``."""
    if pretrained.startswith(EMBEDDED_PREFIX):
        from seka_lightning.embedded import embedded_spec

        spec = embedded_spec(pretrained[len(EMBEDDED_PREFIX) :])
        return {"sha256": spec.sha256, "source": f"GGUF {spec.gguf_name} (pinned, checked when loaded)"}
    path = Path(pretrained)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        if not files:
            return {"sha256": None, "reason": f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}"}
        digest = hashlib.sha256()
        for file in files:
            digest.update(file_sha256(file).encode())
        return {
            "sha256": digest.hexdigest(),
            "source": "sha256 of the files' sha256s",
            "files": [f.name for f in files],
        }
    return {
        "sha256": None,
        "reason": "a hub id: the weights come from the Hugging Face cache; pass a local folder to record a hash",
    }


def tokenizer_sha256(tokenizer: Any) -> str | None:
    """SHA-256 of what decides a fast tokenizer's tokens: its serialized pipeline (vocabulary, merges, normalizer,
    pre-tokenizer, added tokens; without the padding and truncation settings, which calls change), its chat template
    and its BOS / EOS / pad ids. None for a tokenizer without a fast pipeline. The serialization is that of the
    installed ``tokenizers`` (recorded beside it): the same tokenizer can hash differently under another version, so
    a different hash alone does not prove different tokens, while the same hash does prove the same."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    pipeline = json.loads(backend.to_str())
    pipeline.pop("padding", None)
    pipeline.pop("truncation", None)
    record = {
        "pipeline": pipeline,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_ids": [getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def input_files(settings: Any) -> dict[str, str]:
    """``{path: sha256}`` of every existing file named by a string in ``settings`` (nested dicts and lists): the
    bank, a negative bank, an experts list, a head profile."""
    found: dict[str, str] = {}
    if isinstance(settings, str):
        if Path(settings).is_file():
            found[settings] = file_sha256(settings)
    elif isinstance(settings, Mapping):
        for value in settings.values():
            found.update(input_files(value))
    elif isinstance(settings, list | tuple):
        for value in settings:
            found.update(input_files(value))
    return found


# what a bank file's metadata says it was built from (ProjectionBank.save); the file's own hash names one build
BANK_BUILD_KEYS = (
    "statistics_sha256",
    "data_fingerprint",
    "weights_sha256",
    "model_id",
    "top_pct",
    "min_diff",
    "head_filter",
    "positive_only",
)


def bank_builds(files: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``{path: what it was built from}`` for each seka-lightning ``.safetensors`` bank among ``files`` (statistics
    files, reference ``.pt`` banks and other files are left out).

    A bank derived again from the same statistics can have other bytes (on a CPU with another thread count its final
    decomposition rounds differently and flips singular vectors' signs), so two runs' bank hashes can differ while
    ``statistics_sha256`` (the float64 key sums it was derived from) is the same.
    """
    builds = {}
    for path in files:  # any other file's record is its hash in method_files
        if path.endswith(".safetensors") and (recorded := bank_metadata(path)) is not None:
            builds[path] = {key: recorded[key] for key in BANK_BUILD_KEYS if key in recorded}
    return builds


def run_provenance(
    *,
    pretrained: str,
    method: Mapping[str, Any],
    config: Mapping[str, Any],
    data: Mapping[str, Any],
    seeds: Mapping[str, Any],
    argv: Sequence[str] | None = None,
    git_at_start: Mapping[str, Any] | None = None,
    source_at_start: str | None = None,
    weights: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to trace a result: code, command, config (files and resolved values), model weights, the
    method's settings and input files, the data slice, the seeds and the library versions.

    ``git_at_start`` is :func:`git_state` when the run began (what the run imported); the record keeps it, and where
    the checkout moved or changed before the end it adds ``changed_during_run`` with the state at the end. None = the
    state now. ``source_at_start`` is the package's code hash the run imported (None = this process's,
    ``SOURCE_SHA256_AT_IMPORT``). ``weights`` is :func:`weights_hash` of ``pretrained`` where the caller took it already
    (None = take it now)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name in ("cli.py", "__main__.py", "seka"):
        argv[0] = "seka"  # the entry point, not where this machine keeps it
    method_files = input_files(dict(method))
    return {
        "git": git_record(git_at_start),
        "command": argv,
        "config_files": config_files(argv),
        "config": dict(config),
        "model": {"id": pretrained, **(weights if weights is not None else weights_hash(pretrained))},
        "method": dict(method),
        "method_files": method_files,
        "method_builds": bank_builds(method_files),
        "data": dict(data),
        "seeds": {**seeds, "global": os.environ.get("PL_GLOBAL_SEED")},
        "versions": library_versions(),
        "source_sha256": source_at_start if source_at_start is not None else SOURCE_SHA256_AT_IMPORT,
    }


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (None = not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    """Python's and the installed versions of the packages a result's numbers depend on (None = not installed)."""
    packages = ("torch", "transformers", "tokenizers", "gguf", "lightning", "torchmetrics", "seka-lightning")
    return {"python": sys.version.split()[0], **{name: installed_version(name) for name in packages}}


SOURCE_SHA256_AT_IMPORT = source_sha256()
"""The package's code as this process imported it: :func:`source_sha256` when this module was first imported (by
the CLI, before any model loads), so that an edit made while a run loads or runs cannot relabel it."""
