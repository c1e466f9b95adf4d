"""``generate_highlighted``: steered ``model.generate`` from an :func:`encode_highlighted` encoding.

``generate`` runs more rows than it is given when it searches beams or returns several sequences: transformers
repeats each prompt's row in place (``repeat_interleave``), ``max(num_beams, num_return_sequences)`` times in
transformers 5. Rather than re-deriving that count from the merged generation config, the steering hooks are
attached at the prefill call itself, with the highlight mask repeated the same way to the batch that call has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from seka_lightning.bank import ProjectionBank
from seka_lightning.steering import FusedGains, KeySteerer, LayerSpec, highlight_mask_of

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
