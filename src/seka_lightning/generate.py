"""``seka generate``: one highlighted prompt, continued without and with SEKA steering, side by side."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from seka_lightning.highlight import encode_highlighted
from seka_lightning.methods import HighlightMethod, SekaMethod
from seka_lightning.models import check_model_source, load_model

log = logging.getLogger(__name__)


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
