"""Key steering with a SEKA bank (SPEC §4): forward hooks on the key sites and the ``steer()`` context manager.

On highlighted prompt tokens only, at prefill, ``k' = k + k G`` with the fused gain matrix
``G = (g+ P+ + g- P-) / 2`` when a negative bank is in use, else ``G = g+ P+`` (P is symmetric). Decode steps see
one new token per row and add no edit; the edited keys live on in the KV cache.

Steering belongs to one thread and one block at a time (:func:`claim_model`): the hooks sit on the model, which
every thread shares, so each hook edits only forwards run by the thread that attached it, and a second steering
block on a model that is already steered is refused rather than stacked.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from seka_lightning.bank import ProjectionBank
from seka_lightning.families import LayerSites, ModelLayout, keys_view, resolve_layout, with_keys
from seka_lightning.layers import LayerSpec, select_bank_layers


class NoEditWarning(UserWarning):
    """Steering was asked for but edits nothing (zero gains, only skipped heads, or prompts without a highlight)."""


@dataclass(eq=False)
class ModelClaim:
    """One steering block's hold on a model: which method holds it and which thread may be edited.

    Hooks call :meth:`here` on every forward; it reads the thread id on the host only (no device work, no sync).
    Inside ``torch.compile`` tracing it answers True without the check: Dynamo cannot trace the thread id and would
    break the graph at every hooked layer, so a compiled forward carries the hooks' edit for any thread that runs
    it (the static decoder's compiled steps run without hooks; steer a compiled model from one thread only).
    """

    method: str
    thread: int
    thread_name: str
    modules: list[nn.Module]

    def here(self) -> bool:
        """True in the thread that took the claim (and while compiling): only its forwards are steered."""
        if torch.compiler.is_compiling():
            return True
        return threading.get_ident() == self.thread

    def release(self) -> None:
        """Give the model back (idempotent)."""
        with _CLAIMS_LOCK:
            for module in self.modules:
                if _CLAIMS.get(module) is self:
                    del _CLAIMS[module]
        self.modules = []


_CLAIMS: weakref.WeakKeyDictionary[nn.Module, ModelClaim] = weakref.WeakKeyDictionary()
_CLAIMS_LOCK = threading.Lock()


def claim_model(layout: ModelLayout, method: str) -> ModelClaim:
    """Reserve the model of ``layout`` (all its attention modules) for one steering block of ``method``.

    The guard every hook-based method shares (SEKA, the random ablation, AdaSEKA, PASTA). Nested steering of one
    model is refused, not composed: stacked SEKA hooks would apply ``k (I + G)^2`` instead of ``k (I + G)``, and a
    second PASTA block would switch the attention implementation back under the first one; to combine edits, fold
    them into one bank. A model steered by another thread is refused too, since hooks and the attention switch are
    the model's, not the thread's: give each thread its own model copy. Forwards of other threads are never edited.
    """
    modules = [sites.attention for sites in layout.layers]
    current = threading.current_thread()
    with _CLAIMS_LOCK:
        held = next((_CLAIMS[m] for m in modules if m in _CLAIMS), None)
        if held is not None:
            if held.thread == current.ident:
                raise RuntimeError(
                    f"cannot start {method}: {held.method} is already active on this model in this thread; nested "
                    "steering would apply both edits (SEKA twice is k(I+G)^2, not k(I+G)), so exit the outer "
                    "block before steering again"
                )
            raise RuntimeError(
                f"cannot start {method}: {held.method} is active on this model in thread {held.thread_name!r}; "
                "a model is steered by one thread at a time (its hooks belong to the model), so wait for that "
                "block to end or give each thread its own copy of the model"
            )
        claim = ModelClaim(method=method, thread=current.ident, thread_name=current.name, modules=modules)
        for module in modules:
            _CLAIMS[module] = claim
    return claim


def fused_gains(bank: ProjectionBank, *, gain_pos: float, gain_neg: float | None) -> torch.Tensor:
    """``G`` per bank layer ``[n, H, d, d]`` in float32: ``(g+ P+ + g- P-) / 2`` with a negative bank, else ``g+ P+``.

    The reference halves whenever a negative file is given, even with ``g- = 0``; that is kept for fidelity.
    """
    if gain_neg is not None and bank.neg is None:
        if gain_neg != 0.0:
            raise ValueError(f"gain_neg={gain_neg} needs a bank with negative projectors; this bank has none")
        gain_neg = None
    pos = bank.pos.to(torch.float32)
    if gain_neg is None:
        return gain_pos * pos
    return (gain_pos * pos + gain_neg * bank.neg.to(torch.float32)) / 2


HALF_DTYPES = (torch.bfloat16, torch.float16)


def split_gains(gains: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[..., d, d]`` float32 gains as ``[..., 2d, d]`` in a half dtype: ``G_hi = G`` rounded to ``dtype`` stacked
    over ``G_lo = G - G_hi`` rounded. ``G_hi + G_lo`` is ``G`` to about 2^-16 relative in bfloat16 (a float32 holds
    2^-24), so ``[k, k] @ [G_hi; G_lo]`` is ``k G`` from half-precision tensor-core products."""
    high = gains.to(dtype)
    return torch.cat([high, (gains - high.to(gains.dtype)).to(dtype)], dim=-2)


@dataclass
class FusedGains:
    """``G`` per bank layer ``[n, H, d, d]`` (float32, on one device) and which layers edit anything at all."""

    gains: torch.Tensor
    nonzero: list[bool]
    _split: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)

    def split(self, dtype: torch.dtype) -> torch.Tensor:
        """:func:`split_gains` of every layer ``[n, H, 2d, d]`` in ``dtype``, computed once per dtype."""
        if dtype not in self._split:
            self._split[dtype] = split_gains(self.gains, dtype)
        return self._split[dtype]

    @classmethod
    def build(
        cls, bank: ProjectionBank, *, gain_pos: float, gain_neg: float | None, device: torch.device | str = "cpu"
    ) -> FusedGains:
        gains = fused_gains(bank, gain_pos=gain_pos, gain_neg=gain_neg)
        nonzero = gains.flatten(1).any(dim=1).tolist()
        return cls(gains=gains.to(device), nonzero=nonzero)


def check_length_scaling(length_reference: int | None, length_power: float) -> None:
    """Refuse a ``length_reference`` that is not an integer >= 1 or a ``length_power`` that is not finite and > 0."""
    if length_reference is not None and (
        isinstance(length_reference, bool) or not isinstance(length_reference, int) or length_reference < 1
    ):
        raise ValueError(
            f"length_reference must be an integer >= 1 (the highlight length, in tokens, up to which the edit keeps "
            f"its full strength), got {length_reference!r}; pass e.g. 8, or None to edit every row at full strength"
        )
    if (
        isinstance(length_power, bool)
        or not isinstance(length_power, (int, float))
        or not math.isfinite(length_power)
        or length_power <= 0
    ):
        raise ValueError(
            f"length_power must be a finite number > 0, got {length_power!r}; pass e.g. 1 (the edit of a row with "
            "n > length_reference highlighted tokens is scaled by length_reference / n) or 0.5 (its square root)"
        )


@dataclass
class RowScales:
    """Per selected row ``[M]``: the edit's strength ``s`` (float32) and whether the row is at full strength (bool)."""

    scale: torch.Tensor
    full: torch.Tensor

    def to(self, device: torch.device) -> RowScales:
        return RowScales(scale=self.scale.to(device), full=self.full.to(device))


def length_row_scales(
    highlight_mask: torch.Tensor, flat_rows: torch.Tensor, *, length_reference: int, length_power: float
) -> RowScales:
    """``s = min(1, (length_reference / n) ** length_power)`` for each flat row of ``flat_rows`` (indices into
    ``[B * T]``), where ``n`` is the number of highlighted tokens of its batch row.

    Long highlights degrade generation at a gain tuned on short ones; at power 1 the summed edit of a long
    highlight stays that of a ``length_reference``-token one (issue 15, item 8). Computed on the mask's device
    without a host sync; a selected row's batch row has ``n >= 1``, so there is no division by zero.
    """
    counts = highlight_mask.sum(dim=1)[flat_rows // highlight_mask.shape[1]]  # [M], each >= 1
    ratio = length_reference / counts.to(torch.float32)
    scale = ratio.pow(length_power).clamp(max=1.0)
    return RowScales(scale=scale, full=counts <= length_reference)


def scaled_edit(
    picked: torch.Tensor, gains: torch.Tensor, row_scales: RowScales, *, split: torch.Tensor | None = None
) -> torch.Tensor:
    """``k + s k G`` for keys ``picked`` ``[H, M, d]`` and per-row strengths ``s`` ``[M]``, rounded once to the keys'
    dtype from float32 products.

    The strength multiplies the keys, ``k + (s k) G``, inside today's ``baddbmm``: a row at ``s = 1`` is then
    computed by exactly the unscaled expression and comes out bit-identical. Half-precision keys with ``split``
    gains take the unscaled split product on full-strength rows (bit-identical too) and the float32 one elsewhere.
    """
    wide = picked.to(torch.float32)
    edited = torch.baddbmm(wide, wide * row_scales.scale[None, :, None], gains).to(picked.dtype)
    if split is not None and picked.dtype == split.dtype:
        full = torch.baddbmm(picked, torch.cat([picked, picked], dim=-1), split)
        edited = torch.where(row_scales.full[None, :, None], full, edited)
    return edited


def make_key_edit_hook(
    sites: LayerSites,
    layout: ModelLayout,
    gains: torch.Tensor,
    rows: torch.Tensor,
    shape: tuple[int, int],
    split: torch.Tensor | None = None,
    claim: ModelClaim | None = None,
    *,
    row_scales: RowScales | None = None,
) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]:
    """A forward hook for ``sites.key_module`` that adds ``k G`` to the keys of the highlighted ``rows``.

    With ``claim``, forwards run by any thread other than the claim's pass through unedited. With ``row_scales``
    (:func:`length_row_scales`, on the layer's device) each selected row gets ``k + s k G`` instead
    (:func:`scaled_edit`).

    ``rows`` are flat indices into ``[B * T]`` of the prompt (computed once per steer block, so the hook does no
    host-device sync); ``gains`` is ``[H, d, d]`` float32 on the layer's device. Keys in float32 are edited with
    float32 products. Keys in ``split``'s half dtype (``[H, 2d, d]``, :func:`split_gains`) are exact in it, so
    ``k + [k, k] @ [G_hi; G_lo]`` is one tensor-core matmul per head that accumulates in float32 and rounds once
    (on the H200 it took SEKA's prompt-pass cost at batch 10 from 27 to 16 ms per call, on two machines). Its error
    is within half an ulp of ``|k| + |k| |G|``, as the float32 path's is; on random keys 99.8% of the elements come
    out correctly rounded in bf16, against 99.99% for the float32 path (``tests/test_steering.py``). On a GPU this
    assumes cuBLAS reduces in float32; torch allows reduced-precision split-K reductions for half types by default
    (``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction``), which was not checked on the GPU.
    """
    batch, seq_len = shape
    calls = [0]  # a 1-token prompt's decode steps have its length too: only its first call is the prefill

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if claim is not None and not claim.here():
            return None
        keys = keys_view(output, sites, layout)  # [B, T, H, d]
        b, t, heads, head_dim = keys.shape
        calls[0] += 1
        if seq_len == 1 and calls[0] > 1:
            return None
        if t != seq_len:
            if t == 1:  # a decode step: its token is not highlighted and the cache keeps the prefill edit
                return None
            raise ValueError(
                f"layer {sites.layer_id}: the highlight mask covers {seq_len} tokens but the model received {t}; "
                "encode the highlight for exactly the input you run"
            )
        if b != batch:
            raise ValueError(
                f"layer {sites.layer_id}: the highlight mask has {batch} rows but the batch has {b}; "
                "expand the mask the same way as the inputs (e.g. for num_return_sequences)"
            )
        flat = keys.reshape(b * t, heads, head_dim)
        picked = flat.index_select(0, rows).transpose(0, 1)  # [H, M, d]
        if row_scales is not None:
            edited = scaled_edit(picked, gains, row_scales, split=split)
        elif split is not None and picked.dtype == split.dtype:
            edited = torch.baddbmm(picked, torch.cat([picked, picked], dim=-1), split)
        else:
            wide = picked.to(torch.float32)
            edited = torch.baddbmm(wide, wide, gains).to(flat.dtype)  # k + k G
        return with_keys(output, flat.index_copy(0, rows, edited.transpose(0, 1)).view(keys.shape), sites, layout)

    return hook


@dataclass
class AttachedHooks:
    """Forward hooks attached to a model's layers and the model's :class:`ModelClaim`; ``remove()`` detaches them
    and releases the model (idempotent)."""

    handles: list[RemovableHandle]
    layer_ids: list[int]
    claim: ModelClaim | None = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.claim is not None:
            self.claim.release()


class KeySteerer(AttachedHooks):
    """SEKA steering hooks (SPEC §4)."""

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        bank: ProjectionBank,
        highlight_mask: torch.Tensor,
        *,
        gain_pos: float = 1.0,
        gain_neg: float | None = None,
        layers: LayerSpec = "all",
        layer_mapping: str = "by_id",
        layout: ModelLayout | None = None,
        fused: FusedGains | None = None,
        length_reference: int | None = None,
        length_power: float = 1.0,
    ) -> KeySteerer:
        """Attach the hooks. ``fused`` (from :meth:`FusedGains.build`, for the same bank and gains) skips
        re-fusing and re-copying the gain matrices on every call: pass it when steering many batches.
        ``length_reference`` (with ``length_power``) weakens the edit of rows with long highlights
        (:func:`length_row_scales`); None edits every row at full strength.

        The model is claimed (:func:`claim_model`) until :meth:`remove`: nested steering raises ``RuntimeError``,
        and forwards of other threads stay unedited. Gains that edit none of the selected layers warn
        (:class:`NoEditWarning`)."""
        layout = layout or resolve_layout(model)
        model_id = getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
        bank.check_compatible(
            num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads,
            head_dim=layout.head_dim,
            model_id=model_id,
        )
        if highlight_mask.ndim != 2 or highlight_mask.dtype != torch.bool:
            raise ValueError(
                f"highlight_mask must be a bool tensor [B, T], got {highlight_mask.dtype} {tuple(highlight_mask.shape)}"
            )
        check_length_scaling(length_reference, length_power)
        mapping = select_bank_layers(bank, layers, layout.num_layers, layer_mapping)
        fused = fused or FusedGains.build(bank, gain_pos=gain_pos, gain_neg=gain_neg)
        if not any(fused.nonzero[index] for index in mapping.values()):
            warn_no_edit(
                f"SEKA steering edits nothing: the fused gains (gain_pos={gain_pos}, gain_neg={gain_neg}) are zero "
                f"on every selected layer {sorted(mapping)} (zero gains, or only skipped heads there); raise the "
                "gains or select layers whose bank heads are kept"
            )
        steerer = cls(handles=[], layer_ids=[], claim=claim_model(layout, "SEKA"))
        try:
            flat_rows = highlight_mask.reshape(-1).nonzero().squeeze(1)  # the block's one host sync
            if flat_rows.numel() == 0:
                return steerer
            scales = None
            if length_reference is not None:
                scales = length_row_scales(
                    highlight_mask, flat_rows, length_reference=length_reference, length_power=length_power
                )
            rows_on: dict[torch.device, torch.Tensor] = {}
            scales_on: dict[torch.device, RowScales | None] = {}
            for layer_id, bank_index in mapping.items():
                if not fused.nonzero[bank_index]:  # skipped heads only, or zero gains: the edit is the identity
                    continue
                layer_gains = fused.gains[bank_index]
                sites = layout.layers[layer_id]
                device = _module_device(sites.key_module)
                rows = rows_on.setdefault(device, flat_rows.to(device))
                if device not in scales_on:
                    scales_on[device] = None if scales is None else scales.to(device)
                dtype = _module_dtype(sites.key_module)
                split = fused.split(dtype)[bank_index].to(device) if dtype in HALF_DTYPES else None
                hook = make_key_edit_hook(
                    sites,
                    layout,
                    layer_gains.to(device),
                    rows,
                    tuple(highlight_mask.shape),
                    split=split,
                    claim=steerer.claim,
                    row_scales=scales_on[device],
                )
                steerer.handles.append(sites.key_module.register_forward_hook(hook))
                steerer.layer_ids.append(layer_id)
        except BaseException:
            steerer.remove()
            raise
        return steerer


def warn_no_edit(message: str) -> None:
    """Warn (:class:`NoEditWarning`, via ``warnings`` so a repeated call site warns once) that steering edits nothing."""
    warnings.warn(message, NoEditWarning, stacklevel=3)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _module_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating parameter (what its output usually has), or None."""
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return None


@contextmanager
def steer(
    model: nn.Module,
    bank: ProjectionBank,
    highlight_mask: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    gain_pos: float = 1.0,
    gain_neg: float | None = None,
    layers: LayerSpec = "all",
    layer_mapping: str = "by_id",
) -> Iterator[KeySteerer]:
    """Steer ``model`` towards the highlighted tokens for the duration of the block; hooks are always removed.

    ``highlight_mask`` is the bool ``[B, T]`` mask, or the whole dict :func:`encode_highlighted` returns.
    ``gain_neg`` (with a bank that has negative projectors) follows the reference formula ``(g+P+ + g-P-) / 2``.
    ``layer_mapping="positional"`` reproduces the reference's pairing of stored matrices with selected layers.
    Only forwards run by this thread are steered; steering a model that is already steered (nested, or from
    another thread) raises ``RuntimeError`` (see :func:`claim_model` for why nesting is refused, not composed).
    Gains that edit nothing warn with :class:`NoEditWarning`.
    """
    steerer = KeySteerer.attach(
        model,
        bank,
        highlight_mask_of(highlight_mask),
        gain_pos=gain_pos,
        gain_neg=gain_neg,
        layers=layers,
        layer_mapping=layer_mapping,
    )
    try:
        yield steerer
    finally:
        steerer.remove()


def highlight_mask_of(highlight: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The ``[B, T]`` highlight mask: ``highlight`` itself, or the ``highlight_mask`` of an encoding dict."""
    if not isinstance(highlight, Mapping):
        return highlight
    if "highlight_mask" not in highlight:
        raise ValueError(
            f"the encoding has no 'highlight_mask' (it has {sorted(highlight)}); pass the dict encode_highlighted "
            "returns, or the bool highlight mask [B, T] itself"
        )
    return highlight["highlight_mask"]
