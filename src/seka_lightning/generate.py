"""Generation from highlighted prompts: ``generate_highlighted`` (the Python API) and ``seka generate`` (the command).

``generate`` runs more rows than it is given when it searches beams or returns several sequences: transformers
repeats each prompt's row in place (``repeat_interleave``), ``max(num_beams, num_return_sequences)`` times in
transformers 5. Rather than re-deriving that count from the merged generation config, the steering hooks are
attached at the prefill call itself, with the highlight mask repeated the same way to the batch that call has.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from seka_lightning.bank import ProjectionBank
from seka_lightning.highlight import encode_highlighted
from seka_lightning.layers import LayerSpec
from seka_lightning.methods import HighlightMethod, SekaMethod
from seka_lightning.models import check_model_source, load_model
from seka_lightning.steering import FusedGains, KeySteerer, highlight_mask_of

log = logging.getLogger(__name__)

GENERATE_INPUTS = ("input_ids", "attention_mask")


def expand_highlight(mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Repeat each row of ``mask`` ``[B, T]`` in place to ``batch_size`` rows, as ``generate`` expands its inputs."""
    rows = mask.shape[0]
    if batch_size % rows:
        raise ValueError(
            f"generate runs {batch_size} rows for a highlight mask of {rows}; it only expands each prompt to "
            "max(num_beams, num_return_sequences) rows, so pass the inputs of the encoding unchanged"
        )
    return mask if batch_size == rows else mask.repeat_interleave(batch_size // rows, dim=0)


def _call_batch_size(args: tuple, kwargs: dict[str, Any]) -> int:
    """Rows of a model call: from ``input_ids`` or ``inputs_embeds`` (keyword or first positional argument)."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError("the model was called without input_ids or inputs_embeds; cannot match the highlight rows")


def generate_highlighted(
    model: nn.Module,
    bank: ProjectionBank,
    enc: Mapping[str, torch.Tensor],
    *,
    gain_pos: float = 1.0,
    gain_neg: float | None = None,
    layers: LayerSpec = "all",
    layer_mapping: str = "by_id",
    **generate_kwargs: Any,
) -> Any:
    """``model.generate`` on the prompts of ``enc`` (from :func:`encode_highlighted`), steered towards their
    highlights; ``generate_kwargs`` go to ``generate`` (``num_beams`` and ``num_return_sequences`` included).
    Returns what ``generate`` returns (the prompt tokens followed by the new ones, per returned sequence)."""
    mask = highlight_mask_of(enc)
    given = sorted(set(GENERATE_INPUTS) & set(generate_kwargs))
    if given:
        raise ValueError(f"{given} come from enc; pass them there, not as generate arguments")
    if "input_ids" not in enc:
        raise ValueError(f"enc has no 'input_ids' (it has {sorted(enc)}); pass the dict encode_highlighted returns")
    if tuple(enc["input_ids"].shape) != tuple(mask.shape):
        raise ValueError(
            f"enc's input_ids {tuple(enc['input_ids'].shape)} and highlight_mask {tuple(mask.shape)} differ in shape; "
            "encode the prompts and their highlights together with encode_highlighted"
        )
    fused = FusedGains.build(bank, gain_pos=gain_pos, gain_neg=gain_neg)
    attached: list[KeySteerer] = []

    def attach_at_prefill(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if attached:
            return
        expanded = expand_highlight(mask, _call_batch_size(args, kwargs))
        attached.append(
            KeySteerer.attach(
                model,
                bank,
                expanded.to(enc["input_ids"].device),
                gain_pos=gain_pos,
                gain_neg=gain_neg,
                layers=layers,
                layer_mapping=layer_mapping,
                fused=fused,
            )
        )

    handle = model.register_forward_pre_hook(attach_at_prefill, with_kwargs=True)
    try:
        return model.generate(**{key: enc[key] for key in GENERATE_INPUTS if key in enc}, **generate_kwargs)
    finally:
        handle.remove()
        for steerer in attached:
            steerer.remove()


def require_file(path: str, what: str) -> None:
    """Raise ``FileNotFoundError`` naming ``path`` when it is not a file, before anything slow is loaded."""
    if not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"{what} {path!r} does not exist; build one with `seka fit` or pass the right path")


def generate(
    prompt: str,
    *,
    bank: str,
    pretrained: str = "embedded:smollm2-135m",
    neg: str | None = None,
    gain_pos: float = 2.0,
    gain_neg: float | None = None,
    layers: str = "last20",
    layer_mapping: str = "by_id",
    max_new_tokens: int = 24,
    chat: bool = True,
    dtype: str = "float32",
    device: str = "auto",
) -> dict[str, str]:
    """Continue one prompt with its **highlighted** spans, without and with SEKA steering, and print both.

    Args:
        prompt: the prompt, spans to highlight marked ``**like this**``.
        bank: projection bank (``.safetensors`` from ``seka fit``, or a reference ``*_pos_proj.pt``).
        pretrained: hub id, local path, or ``embedded:smollm2-135m`` / ``embedded:gemma3-270m``.
        neg: the reference negative ``.pt`` to pair with a reference positive file.
        gain_pos: g+ of SPEC §4 (the main job's setting for SmolLM2-135M is 2.0).
        gain_neg: g- of SPEC §4; None = positive projector only.
        layers: ``all`` (the bank's layers), ``lastN``, ``firstN`` or comma-separated ids.
        layer_mapping: ``by_id`` (default) or ``positional`` (the reference's pairing).
        max_new_tokens: tokens generated (greedy) per continuation.
        chat: wrap the prompt as a user message with the tokenizer's chat template.
        dtype: model dtype (float32, bfloat16, float16).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        ``{"unsteered": ..., "steered": ...}``, the two continuations.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    require_file(bank, "bank")
    if neg is not None:
        require_file(neg, "negative bank")
    check_model_source(pretrained)
    target = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model, tokenizer = load_model(pretrained, dtype=dtype)
    model.to(target)
    seka = SekaMethod(bank, neg=neg, gain_pos=gain_pos, gain_neg=gain_neg, layers=layers, layer_mapping=layer_mapping)
    seka.setup(model, tokenizer)
    enc = {k: v.to(target) for k, v in encode_highlighted(tokenizer, [prompt], chat=chat).items()}
    if not enc["highlight_mask"].any():
        log.warning("the prompt has no **highlighted** span, so both continuations are the same")
    continuations = {}
    for name, method in (("unsteered", HighlightMethod()), ("steered", seka)):
        tokens = method.generate(model, enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        continuations[name] = tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
    table = Table(title=f"{pretrained}, bank {bank} (gain {gain_pos}, layers {layers})", show_lines=True)
    table.add_column("")
    table.add_column("continuation", overflow="fold")
    table.add_row("prompt", prompt)
    for name, text in continuations.items():
        table.add_row(name, text)
    Console().print(table)
    return continuations
