"""Capturing keys during batched forward passes, for building projections (SPEC §3) and AdaSEKA experts (§5).

Hooks on the key sites copy out only the answer-token rows; the forward pass stops right after the last layer
that is needed, and no hidden states are kept. For the AdaSEKA triplet filter the same pass also sums, on hooks
of the attention modules (eager attention, which returns the weights), the attention from each text's last token
to its answer tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from seka_lightning.data.triplets import Triplet, answer_token_indices
from seka_lightning.families import LayerSites, ModelLayout, keys_view
from seka_lightning.models import model_id


class _StopForward(Exception):
    """Raised by the last capture hook: the layers above it are not needed."""


def _make_capture_hook(sites: LayerSites, layout: ModelLayout, rows: torch.Tensor, out: list, *, stop: bool):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        keys = keys_view(output, sites, layout)  # [B, T, H, d]
        # a sharded model runs this layer on its own device; the rows come from, and the keys go back to, the inputs'
        selected = keys.reshape(-1, *keys.shape[2:]).index_select(0, rows.to(keys.device))  # [M, H, d]
        out.append(selected.to(rows.device))
        if stop:
            raise _StopForward

    return hook


def _make_attention_hook(
    layer_id: int, text_rows: torch.Tensor, last: torch.Tensor, answer: torch.Tensor, out: list, *, stop: bool
):
    """Adds ``Σ_heads Σ_answer-tokens attn[row_i, head, last_i, token]`` per text ``i`` (in row ``text_rows[i]``,
    its last token at ``last[i]``, its answer tokens the ``True`` entries of ``answer[i]``) to ``out`` (``[N]``)."""

    def hook(module: nn.Module, args: tuple, output: tuple) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(
                f"layer {layer_id}: the attention module returned no weights; the attention filter needs eager "
                "attention (capture_keys_and_attention switches to it)"
            )
        from_last = weights[text_rows.to(weights.device), :, last.to(weights.device)].sum(1)  # [N, T]: over heads
        out.append((from_last.to(answer.device, torch.float64) * answer).sum(-1))  # [B]
        if stop:
            raise _StopForward

    return hook


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with eager attention (which returns attention weights) for the block, then restore."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@torch.no_grad()
def capture_keys(
    model: nn.Module,
    layout: ModelLayout,
    layer_ids: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keys of the flat token ``rows`` (indices into ``[B * T]``) at ``layer_ids``: ``[L, M, H, d]``. With
    ``position_ids`` that restart inside a row, the texts packed in it attend only within themselves."""
    keys, _ = _capture(model, layout, layer_ids, input_ids, attention_mask, rows, position_ids, attention=None)
    return keys


@torch.no_grad()
def capture_keys_and_attention(
    model: nn.Module,
    layout: ModelLayout,
    layer_ids: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    text_rows: torch.Tensor,
    last: torch.Tensor,
    answer: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys as :func:`capture_keys`, and per text ``i`` the attention mass ``[N]`` (float64) from token ``last[i]``
    of row ``text_rows[i]`` to the tokens of the bool mask ``answer[i]`` (``[N, T]``), summed over all query heads
    of ``layer_ids`` (eager pass)."""
    attention = (text_rows, last, answer.to(torch.float64))
    with eager_attention(model):
        return _capture(model, layout, layer_ids, input_ids, attention_mask, rows, position_ids, attention=attention)


def _capture(
    model: nn.Module,
    layout: ModelLayout,
    layer_ids: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    position_ids: torch.Tensor | None,
    *,
    attention: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    captured: list[torch.Tensor] = []
    masses: list[torch.Tensor] = []
    last = max(layer_ids)
    handles = []
    try:
        for layer in sorted(layer_ids):
            sites = layout.layers[layer]
            stop_at_key = attention is None and layer == last
            handles.append(
                sites.key_module.register_forward_hook(
                    _make_capture_hook(sites, layout, rows, captured, stop=stop_at_key)
                )
            )
            if attention is not None:
                hook = _make_attention_hook(layer, *attention, masses, stop=layer == last)
                handles.append(sites.attention.register_forward_hook(hook))
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    by_layer = dict(zip(sorted(layer_ids), captured, strict=True))
    keys = torch.stack([by_layer[layer] for layer in layer_ids])
    return keys, (torch.stack(masses).sum(0) if attention is not None else None)


@dataclass
class TripletKeys:
    """Answer-token keys of the kept triplets, each ``[L, M, H, d]``, and what was skipped.

    ``negative`` is None for positive-only (AdaSEKA expert) collection, which never runs the negative text;
    ``skipped_attention`` counts triplets removed by the attention-ratio filter; ``lengths`` are the token counts
    of the texts the pass ran (padding excluded) and ``slots`` the pass's ``rows x width``, for measuring the work
    done.
    """

    neutral: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor | None
    kept: int
    skipped_no_answer: int
    skipped_count_mismatch: int
    skipped_attention: int = 0
    lengths: tuple[int, ...] = ()
    slots: int = 0


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device``. To a GPU it goes through pinned memory without blocking: a plain copy from
    pageable memory makes the host wait until the GPU has finished all queued work (the previous forward pass)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def is_causal(model: nn.Module) -> bool:
    """Whether every token attends only to itself and earlier tokens (False for configs that ask for bidirectional
    attention, e.g. Gemma-3 embedding models, or that declare ``is_causal=False``)."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and (
            getattr(cfg, "use_bidirectional_attention", False) or getattr(cfg, "is_causal", True) is False
        ):
            return False
    return True


@dataclass
class _Pass:
    """The token layout of one forward pass over texts: ``[R, W]`` ids (and mask / positions when needed), and
    where each text starts (``row``, ``offset``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    starts: list[tuple[int, int]]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    @property
    def slots(self) -> int:
        return self.input_ids.numel()


def _right_padded(ids: list[list[int]], pad_id: int, device: torch.device, *, with_mask: bool) -> _Pass:
    """One row per text, padded on the right; the attention mask only if ``with_mask``. A causal model needs
    none: a token never sees the padding after it, so the keys of real tokens (and their attention) are those of the
    unpadded text, and a mask would cost a host-device sync per pass (transformers checks it to choose SDPA's causal
    path). A model with bidirectional attention does need it."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    mask = to_device(mask, device) if with_mask else None
    return _Pass(to_device(input_ids, device), mask, None, [(i, 0) for i in range(len(ids))])


def _first_fit(lengths: list[int], width: int) -> tuple[list[int], list[tuple[int, int]]]:
    """First fit in decreasing length into rows of ``width`` tokens: tokens used per row, and each text's
    ``(row, offset)``."""
    filled: list[int] = []
    starts: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(filled) if used + lengths[i] <= width), len(filled))
        if row == len(filled):
            filled.append(0)
        starts[i] = (row, filled[row])
        filled[row] += lengths[i]
    return filled, starts


def _packed(ids: list[list[int]], pad_id: int, device: torch.device, *, pack_tokens: int) -> _Pass:
    """The texts packed into as few rows of at most ``max(pack_tokens, longest text)`` tokens as the tokens need,
    first fit in decreasing length, with positions restarting at 0 for each text. The rows are made as even as
    first fit allows (the narrowest width that still needs no extra row), so the last row is not mostly padding.

    transformers reads restarting ``position_ids`` (and no attention mask) as packed sequences and masks attention to
    causal within each text, so every text's keys are those of the text run alone (up to the rounding of another
    matmul shape), with far less padding than one row per text. Padding tokens get position 0, so each is a text of
    its own and no position exceeds the longest text's (rotary scalings such as Phi-3's ``longrope`` change with the
    largest position). Reading the positions costs transformers one host-device sync per mask."""
    lengths = [len(row) for row in ids]
    longest, total = max(lengths), sum(lengths)
    widest = max(pack_tokens, longest)
    rows = -(-total // widest)
    width = max(longest, -(-total // rows))
    filled, starts = _first_fit(lengths, width)
    while len(filled) > rows and width < widest:  # a few percent wider at a time until the rows suffice
        width = min(widest, width + max(1, width // 50))
        filled, starts = _first_fit(lengths, width)
    width = max(filled)
    input_ids = torch.full((len(filled), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(filled), width), dtype=torch.long)  # padding: 0, each a text of its own
    for i, (row, offset) in enumerate(starts):
        input_ids[row, offset : offset + lengths[i]] = torch.tensor(ids[i], dtype=torch.long)
        positions[row, offset : offset + lengths[i]] = torch.arange(lengths[i], dtype=torch.long)
    return _Pass(to_device(input_ids, device), None, to_device(positions, device), starts)


def packing_metadata(pack_tokens: int | None) -> dict[str, int]:
    """The bank metadata entry of a packed build; none for the default padded rows, so a default build writes the
    same bank file (the same SHA-256, which results name) as builds made before packing existed."""
    return {} if pack_tokens is None else {"pack_tokens": pack_tokens}


PACKABLE_ATTENTION = ("sdpa", "eager", "flex_attention")  # those for which transformers masks packed rows apart


def check_packable(model: nn.Module, layout: ModelLayout, pack_tokens: int | None) -> None:
    """Raise ``ValueError`` naming the fix unless ``model`` keeps texts packed in one row apart (see :func:`_packed`):
    a causal model of a family in ``seka_lightning.families.FAMILIES`` (whose forward hands the restarting
    positions to transformers' mask builder; models discovered by structure may not, e.g. OPT and BART do not) with
    an attention implementation whose mask transformers builds per packed text (flash attention gets no mask for
    several rows). Nothing to check when ``pack_tokens`` is None."""
    check_pack_tokens(pack_tokens)
    if pack_tokens is None:
        return
    name = model_id(model)
    fix = "or set pack_tokens to None (one padded row per text)"
    if not is_causal(model):
        raise ValueError(
            f"pack_tokens={pack_tokens} packs texts into shared rows, which only a causal model keeps apart; "
            f"{name} attends bidirectionally, so set pack_tokens to None"
        )
    if layout.family == "discovered":
        raise ValueError(
            f"pack_tokens={pack_tokens} needs a model family listed in seka_lightning.families.FAMILIES (their "
            f"forward passes the restarting positions to the attention mask); {name} was discovered by structure, "
            f"so its packed texts might attend to each other: add its model type to the table after checking, {fix}"
        )
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in PACKABLE_ATTENTION:
        raise ValueError(
            f"pack_tokens={pack_tokens} keeps packed texts apart through transformers' packed-sequence masks, which "
            f"{implementation!r} attention does not build for several rows; load {name} with attn_implementation "
            f"one of {list(PACKABLE_ATTENTION)}, {fix}"
        )


def check_pack_tokens(pack_tokens: int | None) -> None:
    """Raise ``ValueError`` unless ``pack_tokens`` is None (one padded row per text) or a row width >= 1."""
    if pack_tokens is not None and (
        isinstance(pack_tokens, bool) or not isinstance(pack_tokens, int) or pack_tokens < 1
    ):
        raise ValueError(
            f"pack_tokens must be a row width in tokens >= 1 (e.g. 512), or None for one padded row per text; "
            f"got {pack_tokens!r}"
        )


def attention_kept(neutral: torch.Tensor, positive: torch.Tensor, ratio: float) -> torch.Tensor:
    """The AdaSEKA triplet filter: keep where the answer's attention mass grows by ``>= ratio`` from H to H+.

    A zero mass in H keeps the triplet iff H+ has any (the reference's guard against dividing by zero).
    """
    grows = positive >= ratio * neutral
    return torch.where(neutral == 0, positive > 0, grows)


def collect_triplet_keys(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    layer_ids: Sequence[int],
    triplets: Sequence[Triplet],
    *,
    device: torch.device,
    positive_only: bool = False,
    attention_ratio: float | None = None,
    pack_tokens: int | None = None,
) -> TripletKeys | None:
    """Run the neutral, positive and (unless ``positive_only``) negative texts of ``triplets`` and return the keys of
    their answer tokens. All texts go through the model in one pass: by default one right-padded row per text
    (``kinds x B`` rows, padded to the longest text of any kind; size ``batch_size`` for that); with
    ``pack_tokens``, packed into rows of that many tokens, each text attending only to itself (causal models only;
    see :func:`_packed`), which removes most of the padding. The texts do not interact either way, right padding
    keeps positions identical to unpadded runs, and one pass instead of three cuts the per-pass Python and
    kernel-launch overhead that dominates on short texts. With ``attention_ratio``, triplets whose last-token
    attention to the answer (summed over the heads of ``layer_ids``) does not grow by that ratio from H to H+ are
    dropped (the pass then runs eager attention, which holds ``[rows, heads, W, W]`` weights per layer). ``None``
    when no triplet of the batch has its answer in every text it needs."""
    check_packable(model, layout, pack_tokens)
    texts = [triplet.texts() for triplet in triplets]
    kinds = 2 if positive_only else 3
    columns = list(zip(*texts, strict=True))[:kinds]  # kinds lists of B texts
    encoded = [tokenizer(list(column), add_special_tokens=False, return_offsets_mapping=True) for column in columns]
    kept: list[int] = []
    indices: list[list[list[int]]] = []
    no_answer = mismatch = 0
    for b, triplet in enumerate(triplets):
        found = [
            answer_token_indices(encoded[k]["offset_mapping"][b], texts[b][k], triplet.answer) for k in range(kinds)
        ]
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
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)  # masked
    ids = [encoded[k]["input_ids"][b] for k in range(kinds) for b in kept]  # kind-major: text k * B' + i
    if pack_tokens is None:
        run = _right_padded(ids, pad_id, device, with_mask=not is_causal(model))
    else:
        run = _packed(ids, pad_id, device, pack_tokens=pack_tokens)
    count = len(kept)
    # answer-token rows, kind-major; every kept triplet has as many answer tokens in each text, so the keys split
    # into ``kinds`` equal blocks aligned row for row
    answer_tokens = [found[k] for k in range(kinds) for found in indices]  # per text, in the order of ``ids``
    flat = [
        row * run.width + offset + token
        for (row, offset), tokens in zip(run.starts, answer_tokens, strict=True)
        for token in tokens
    ]
    rows = to_device(torch.tensor(flat), device)
    if attention_ratio is None:
        keys = capture_keys(model, layout, layer_ids, run.input_ids, run.attention_mask, rows, run.position_ids)
    else:
        text_rows = to_device(torch.tensor([row for row, _ in run.starts]), device)
        ends = [offset + len(text) - 1 for (_, offset), text in zip(run.starts, ids, strict=True)]
        last = to_device(torch.tensor(ends), device)
        answer = torch.zeros((len(ids), run.width), dtype=torch.bool)
        for i, ((_, offset), tokens) in enumerate(zip(run.starts, answer_tokens, strict=True)):
            answer[i, [offset + token for token in tokens]] = True
        keys, mass = capture_keys_and_attention(
            model,
            layout,
            layer_ids,
            run.input_ids,
            run.attention_mask,
            rows,
            text_rows,
            last,
            to_device(answer, device),
            run.position_ids,
        )
    keys = list(keys.chunk(kinds, dim=1))  # kinds x [L, M, H, d]
    filtered = 0
    if attention_ratio is not None:
        keep = attention_kept(mass[:count], mass[count : 2 * count], attention_ratio).cpu()  # [B']: needs the host
        filtered = int((~keep).sum())
        owner = torch.tensor([row for row, found in enumerate(indices) for _ in found[0]], dtype=torch.long)
        row_keep = keep[owner].nonzero().squeeze(1).to(device)
        keys = [key.index_select(1, row_keep) for key in keys]
    return TripletKeys(
        neutral=keys[0],
        positive=keys[1],
        negative=keys[2] if kinds == 3 else None,
        kept=len(kept) - filtered,
        skipped_no_answer=no_answer,
        skipped_count_mismatch=mismatch,
        skipped_attention=filtered,
        lengths=tuple(len(row) for row in ids),
        slots=run.slots,
    )
