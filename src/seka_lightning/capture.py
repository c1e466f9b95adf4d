"""Capturing keys during batched forward passes, for building projections (SPEC §3).

Hooks on the key sites copy out only the answer-token rows; the forward pass stops right after the last layer
that is needed, and no hidden states are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from seka_lightning.data.triplets import Triplet, answer_token_indices
from seka_lightning.families import LayerSites, ModelLayout, keys_view


class _StopForward(Exception):
    """Raised by the last capture hook: the layers above it are not needed."""


def _make_capture_hook(sites: LayerSites, layout: ModelLayout, rows: torch.Tensor, out: list, *, stop: bool):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        keys = keys_view(output, sites, layout)  # [B, T, H, d]
        out.append(keys.reshape(-1, *keys.shape[2:]).index_select(0, rows))  # [M, H, d]
        if stop:
            raise _StopForward

    return hook


@torch.no_grad()
def capture_keys(
    model: nn.Module,
    layout: ModelLayout,
    layer_ids: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Keys of the flat token ``rows`` (indices into ``[B * T]``) at ``layer_ids``: ``[L, M, H, d]``."""
    captured: list[torch.Tensor] = []
    last = max(layer_ids)
    handles = [
        layout.layers[layer].key_module.register_forward_hook(
            _make_capture_hook(layout.layers[layer], layout, rows, captured, stop=layer == last)
        )
        for layer in sorted(layer_ids)
    ]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    by_layer = dict(zip(sorted(layer_ids), captured, strict=True))
    return torch.stack([by_layer[layer] for layer in layer_ids])


@dataclass
class TripletKeys:
    """Answer-token keys of the kept triplets, each ``[L, M, H, d]``, and what was skipped."""

    neutral: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    kept: int
    skipped_no_answer: int
    skipped_count_mismatch: int


def _right_padded(ids: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids.to(device), attention_mask.to(device)


def collect_triplet_keys(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    layer_ids: Sequence[int],
    triplets: Sequence[Triplet],
    *,
    device: torch.device,
) -> TripletKeys | None:
    """Run the neutral, positive and negative texts of ``triplets`` (one right-padded pass each) and return the
    keys of their answer tokens. Right padding keeps positions identical to unpadded runs. ``None`` when no
    triplet of the batch has its answer in all three texts."""
    texts = [triplet.texts() for triplet in triplets]
    kinds = list(zip(*texts, strict=True))  # 3 lists of B texts
    encoded = [tokenizer(list(kind), add_special_tokens=False, return_offsets_mapping=True) for kind in kinds]
    kept: list[int] = []
    indices: list[list[list[int]]] = []
    no_answer = mismatch = 0
    for b, triplet in enumerate(triplets):
        found = [answer_token_indices(encoded[k]["offset_mapping"][b], texts[b][k], triplet.answer) for k in range(3)]
        if not all(found):
            no_answer += 1
            continue
        if len({len(f) for f in found}) != 1:
            mismatch += 1
            continue
        kept.append(b)
        indices.append(found)
    if not kept:
        return None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    keys = []
    for k in range(3):
        ids = [encoded[k]["input_ids"][b] for b in kept]
        input_ids, attention_mask = _right_padded(ids, pad_id, device)
        width = input_ids.shape[1]
        rows = torch.tensor(
            [row * width + token for row, found in enumerate(indices) for token in found[k]], dtype=torch.long
        ).to(device)
        keys.append(capture_keys(model, layout, layer_ids, input_ids, attention_mask, rows))
    return TripletKeys(*keys, kept=len(kept), skipped_no_answer=no_answer, skipped_count_mismatch=mismatch)
