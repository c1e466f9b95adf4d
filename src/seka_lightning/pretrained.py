"""A bank as a shareable folder: ``bank.safetensors``, its statistics where known, and a ``README.md`` model card.

``ProjectionBank.save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` call these. The folder is built in a
temp directory beside the target and renamed into place, so a reader never sees half a folder; the statistics
file has the ``seka fit`` layout, so ``seka derive --stats DIR/bank.stats.safetensors`` works on it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from seka_lightning.stats import KeySums

if TYPE_CHECKING:
    from seka_lightning.bank import ProjectionBank

log = logging.getLogger(__name__)

BANK_FILE = "bank.safetensors"
STATS_FILE = "bank.stats.safetensors"
CARD_FILE = "README.md"
DERIVED_KEYS = ("top_pct", "min_diff", "positive_only", "num_rows", "heads_kept", "heads_total")
"""Metadata a bank derives from its statistics; a statistics file does not carry them (``derive_bank`` drops them)."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def require_huggingface_hub(action: str) -> Any:
    """Import ``huggingface_hub`` or raise an ImportError that says how to install it."""
    try:
        import huggingface_hub
    except ImportError as err:
        raise ImportError(
            f"{action} needs the huggingface_hub package, which is not installed; install it with "
            "`pip install huggingface_hub` (saving and loading local folders works without it)"
        ) from err
    return huggingface_hub


def write_folder(bank: ProjectionBank, directory: Path) -> None:
    """Write the bank, its statistics (when attached) and the model card into the existing ``directory``."""
    bank.save(directory / BANK_FILE)
    if bank.statistics is not None:
        meta = {k: v for k, v in bank.metadata.items() if k not in DERIVED_KEYS}
        bank.statistics.save(
            directory / STATS_FILE, metadata={**meta, "layers": bank.layers, "head_dim": bank.head_dim}
        )
    (directory / CARD_FILE).write_text(model_card(bank), encoding="utf-8")


def save_pretrained(bank: ProjectionBank, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``bank`` as a folder, atomically; an existing non-empty ``directory`` is replaced only with
    ``overwrite=True`` (and is left as it was if writing fails)."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose a directory path for the bank")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{target} exists and is not empty; pass overwrite=True to replace it or choose a new directory"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        write_folder(bank, staging)
        _replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("saved the bank to %s", target)
    return target


def _replace_dir(staging: Path, target: Path) -> None:
    """Rename ``staging`` onto ``target``; an existing ``target`` is moved aside first and restored on failure."""
    if not target.exists() or not any(target.iterdir()):
        os.replace(staging, target)  # a rename replaces an empty directory
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.replace(target, aside / target.name)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside / target.name, target)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def load_pretrained(
    cls: type[ProjectionBank], name_or_path: str | Path, *, revision: str | None = None
) -> ProjectionBank:
    """Read a folder written by :func:`save_pretrained` (a local path, or a hub repo id via ``huggingface_hub``)."""
    directory = Path(name_or_path)
    if not directory.exists():
        if not HUB_ID.match(str(name_or_path)):
            raise FileNotFoundError(
                f"{directory} does not exist; pass a folder written by bank.save_pretrained or a hub repo id"
            )
        hub = require_huggingface_hub(f"loading {name_or_path!r} from the Hugging Face Hub")
        try:
            directory = Path(hub.snapshot_download(repo_id=str(name_or_path), revision=revision))
        except Exception as err:
            raise FileNotFoundError(
                f"{name_or_path!r} is neither a local folder nor a hub repo that could be downloaded ({err}); "
                "check the path or the repo id"
            ) from err
    if not (directory / BANK_FILE).is_file():
        raise FileNotFoundError(
            f"{directory} holds no {BANK_FILE}; pass a folder written by bank.save_pretrained "
            "(a single bank file loads with ProjectionBank.load)"
        )
    bank = cls.load(directory / BANK_FILE)
    stats_path = directory / STATS_FILE
    if stats_path.is_file():
        sums, meta = KeySums.load(stats_path)
        expected = (len(bank.layers), bank.num_kv_heads, bank.head_dim, bank.head_dim)
        if tuple(sums.a0.shape) != expected or meta.get("layers", bank.layers) != bank.layers:
            raise ValueError(
                f"{stats_path} holds statistics of shape {tuple(sums.a0.shape)} on layers {meta.get('layers')} but "
                f"the bank is {expected} on layers {bank.layers}; the folder mixes two builds, save it again"
            )
        bank.statistics = sums
    return bank


def push_to_hub(
    bank: ProjectionBank,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload SEKA projection bank",
) -> str:
    """Upload the folder :func:`save_pretrained` writes to the hub repo ``repo_id`` (created if missing);
    returns the commit URL."""
    hub = require_huggingface_hub("push_to_hub")
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(bank, Path(tmp) / "bank")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision
        )
    return str(info)


def p_plus_ranks(bank: ProjectionBank) -> torch.Tensor:
    """Rank of every head's P+ ``[n_layers, n_kv]`` (0 for skipped heads): its eigenvalues above 1/2, as a
    projector's are 0 or 1 (a float32 projector's zero eigenvalues are ~1e-7, too big for a float64 rank cut)."""
    return (torch.linalg.eigvalsh(bank.pos.to(torch.float64)) > 0.5).sum(-1)


def _layer_table(bank: ProjectionBank) -> list[str]:
    ranks = p_plus_ranks(bank)
    rows = ["| layer | heads kept | mean rank of P+ (kept heads) |", "|---:|---:|---:|"]
    for layer, layer_ranks in zip(bank.layers, ranks, strict=True):
        kept = layer_ranks[layer_ranks > 0]
        mean = f"{kept.double().mean().item():.1f}" if kept.numel() else "-"
        rows.append(f"| {layer} | {kept.numel()}/{bank.num_kv_heads} | {mean} |")
    return rows


def model_card(bank: ProjectionBank) -> str:
    """The ``README.md`` of a saved bank: what it was built from, with which settings, and how to use it."""
    meta = bank.metadata
    model = str(meta.get("model_id") or meta.get("source") or "unknown")
    weights = meta.get("weights_sha256") or meta.get("model_revision") or "unknown"
    ranks = p_plus_ranks(bank)
    settings = {
        key: meta[key]
        for key in (
            "top_pct",
            "min_diff",
            "positive_only",
            "attention_ratio",
            "chat",
            "model_dtype",
            "num_rows",
            "triplets_used",
            "triplets_skipped",
            "triplets_filtered_attention",
            "seka_lightning_version",
        )
        if key in meta
    }
    front = ["---", "library_name: seka-lightning", "tags:", "- seka", "- attention-steering"]
    if HUB_ID.match(model) and not Path(model).exists():
        front.append(f"base_model: {model}")
    lines = [
        *front,
        "---",
        "",
        f"# SEKA projection bank for `{model}`",
        "",
        "Key projectors for spectral key steering (SEKA / AdaSEKA), built with seka-lightning.",
        "",
        f"- Model: `{model}` (weights: `{weights}`)",
        f"- Layers: {len(bank.layers)} ({_layer_span(bank.layers)}), KV heads {bank.num_kv_heads}, "
        f"head dim {bank.head_dim}",
        f"- Heads kept: {int((ranks > 0).sum())}/{ranks.numel()}",
        f"- Negative projectors (P-): {'yes' if bank.neg is not None else 'no'}",
        f"- Statistics included: {'yes (`bank.stats.safetensors`)' if bank.statistics is not None else 'no'}",
        f"- Data fingerprint: `{meta.get('data_fingerprint') or 'unknown'}`",
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(settings, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "## Layers",
        "",
        *_layer_table(bank),
        "",
        "## Use",
        "",
        "```python",
        "from seka_lightning import ProjectionBank, encode_highlighted, generate_highlighted, load_model",
        "",
        f'model, tokenizer = load_model("{model}")',
        'bank = ProjectionBank.from_pretrained("path/to/this/folder")',
        'enc = encode_highlighted(tokenizer, "Context ... **the part to attend to** ... Question?")',
        "out = generate_highlighted(model, bank, enc, gain_pos=1.0, max_new_tokens=20)",
        "```",
        "",
    ]
    return "\n".join(lines)


def _layer_span(layers: list[int]) -> str:
    """``0..29`` for consecutive ids, else the ids (the first six and a count)."""
    if layers == list(range(layers[0], layers[0] + len(layers))):
        return f"{layers[0]}..{layers[-1]}" if len(layers) > 1 else str(layers[0])
    shown = ", ".join(str(layer) for layer in layers[:6])
    return shown + (f", ... ({len(layers) - 6} more)" if len(layers) > 6 else "")


def bank_repr(bank: ProjectionBank) -> str:
    """One line: the model, layers, geometry, kept heads and settings (the tensors are left out)."""
    meta = bank.metadata
    model = meta.get("model_id") or meta.get("source") or "unknown"
    kept = int((bank.pos.flatten(2).abs().sum(-1) > 0).sum())
    parts = [
        f"model={model!r}",
        f"layers={len(bank.layers)} [{_layer_span(bank.layers)}]",
        f"kv_heads={bank.num_kv_heads}",
        f"head_dim={bank.head_dim}",
        f"heads_kept={kept}/{len(bank.layers) * bank.num_kv_heads}",
    ]
    if "top_pct" in meta:
        parts.append(f"top_pct={meta['top_pct']}")
    parts.append(f"negative={bank.neg is not None}")
    return f"ProjectionBank({', '.join(parts)})"
