"""AdaSEKA in a model (SPEC §5): hooks that route each prompt to a mix of expert projections and edit its keys.

Default: in the prefill pass itself, a hook on each layer's query site keeps the last prompt token's query
(``queries_view``, i.e. after ``q_norm`` where the family has one), and the hook on the same layer's key site,
which runs next in every supported family (``q_proj``/``q_norm`` precede ``k_proj``/``k_norm``; Phi-3's fused
``qkv_proj`` yields both at once), turns it into per-row coefficients and the mixed projector ``P`` ``[B, H, d, d]``
and adds ``g · k P`` to the highlighted keys. No extra forward pass, no hidden states kept, no host sync.

The reference's behaviour is available per defect (:data:`COMPAT_OPTIONS`): ``row0`` routes every row with row
0's query; ``separate_pass`` takes queries from an extra forward pass over ``input_ids`` alone (no attention mask,
as the reference runs it), from each layer's input hidden state; ``output_hidden_state`` takes them from the
layer's *output* ``hidden_states[L + 1]`` instead (implies ``separate_pass``); ``reference_coefficients`` keeps
the reference's epsilons and its uniform fallback on heads where any expert is left out.

Optional, for a learned router (:mod:`seka_lightning.adaseka.gate`): ``gate(layer_id, coefficients)`` maps each
layer's coefficients ``[B, H, M]`` before the projector is mixed (None = the training-free router, unchanged), and
``query_index`` picks the routing query's position (default ``-1``; teacher forcing with right-padded answers
routes with the last prompt token at ``prompt_length - 1``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from seka_lightning.adaseka.experts import ExpertSet, LayerExperts, kv_head_queries
from seka_lightning.families import (
    ATTENTION_ATTRS,
    LayerSites,
    ModelLayout,
    keys_view,
    queries_view,
    resolve_layout,
    with_keys,
)
from seka_lightning.layers import select_stored_layers
from seka_lightning.steering import AttachedHooks, ModelClaim, check_length_scaling, claim_model, length_row_scales

CoefficientGate = Callable[[int, torch.Tensor], torch.Tensor]
"""``gate(model layer id, coefficients [B, H, M]) -> coefficients [B, H, M]``, applied before mixing ``P``."""

COMPAT_OPTIONS = ("row0", "separate_pass", "output_hidden_state", "reference_coefficients")


def validate_compat(compat: Collection[str] | None) -> frozenset[str]:
    """The compat options as a set; unknown names raise, and ``output_hidden_state`` implies ``separate_pass``."""
    options = frozenset(compat or ())
    unknown = sorted(options - set(COMPAT_OPTIONS))
    if unknown:
        raise ValueError(f"compat options {unknown} are unknown; choose from {list(COMPAT_OPTIONS)}")
    if "output_hidden_state" in options:
        options |= {"separate_pass"}
    return options


def select_expert_layers(
    experts: ExpertSet, spec: str | Sequence[int], num_layers: int, mapping: str
) -> dict[int, int]:
    """Model layer id -> the expert layer id whose factors it uses (:func:`~seka_lightning.layers.select_stored_layers`
    on the experts' layers: ``by_id`` uses each layer's own factors, ``positional`` the reference's pairing)."""
    stored = experts.layers
    selected = select_stored_layers(stored, spec, num_layers, mapping, holder="expert set")
    return {layer: stored[index] for layer, index in selected.items()}


@dataclass
class RoutingRecord:
    """Coefficients ``[B, H, M]`` per model layer id from the last routed prefill (for statistics)."""

    coefficients: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Slot:
    """Hands one layer's last-token queries ``[B, n_q, d]`` from its query hook to its key hook."""

    queries: torch.Tensor | None = None


def _check_shape(layer_id: int, got: tuple[int, int], expected: tuple[int, int]) -> None:
    if got[1] != expected[1]:
        raise ValueError(
            f"layer {layer_id}: the highlight mask covers {expected[1]} tokens but the model received {got[1]}; "
            "encode the highlight for exactly the input you run"
        )
    if got[0] != expected[0]:
        raise ValueError(
            f"layer {layer_id}: the highlight mask has {expected[0]} rows but the batch has {got[0]}; "
            "expand the mask the same way as the inputs (e.g. for num_return_sequences)"
        )


def row_gains(
    highlight: torch.Tensor, gain: float, *, length_reference: int | None, length_power: float
) -> float | torch.Tensor:
    """``gain``, or with ``length_reference`` the per-row ``gain * min(1, (length_reference / n) ** length_power)``
    ``[B]`` for rows of ``n`` highlighted tokens: SEKA's length-adaptive strength
    (:func:`seka_lightning.steering.length_row_scales`) applied to the routed edit."""
    if length_reference is None:
        return gain
    batch, length = highlight.shape
    first_tokens = torch.arange(batch, device=highlight.device) * length  # one flat index per batch row
    scales = length_row_scales(highlight, first_tokens, length_reference=length_reference, length_power=length_power)
    # float64 here, so that a row at full strength gets exactly ``gain`` in the keys' precision (routed_keys casts)
    return gain * scales.scale.double()  # a row without highlight gets 1 (it is not edited)


def routed_keys(
    keys: torch.Tensor,
    queries: torch.Tensor,
    experts: LayerExperts,
    highlight: torch.Tensor,
    *,
    gain: float | torch.Tensor,
    num_kv_heads: int,
    row0: bool = False,
    reference: bool = False,
    gate: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edited keys ``[B, T, H, d]`` (in the keys' dtype) and the coefficients ``[B, H, M]``.

    ``queries`` ``[B, n_q, d]`` are the last prompt token's; ``highlight`` ``[B, T]`` bool. The highlighted keys get
    ``k + g k P`` computed in float32 (or the keys' dtype if wider) and rounded once; the others are returned
    unchanged (bitwise). ``gate`` maps the coefficients before ``P`` is mixed. ``gain`` is one number or one per batch
    row ``[B]`` (the length-adaptive strength, :func:`row_gains`). ``rows``: the flat indices of the highlighted
    tokens (``highlight.flatten().nonzero()``), computed once per batch so a layer needs no host sync.
    """
    dtype = torch.promote_types(keys.dtype, torch.float32)
    q = kv_head_queries(queries.to(dtype), num_kv_heads)  # [B, H, d]
    if row0:
        q = q[:1].expand_as(q)
    coefficients = experts.coefficients(q, reference=reference)  # [B, H, M]
    if gate is not None:
        coefficients = gate(coefficients)
    batch, length, heads, dim = keys.shape
    if rows is None:
        rows = highlight.flatten().nonzero().squeeze(1)
    owners = rows // length  # [R]: each highlighted token's batch row
    weights = coefficients.index_select(0, owners)  # [R, H, M]
    weights = weights * (
        gain.to(dtype).index_select(0, owners)[:, None, None] if isinstance(gain, torch.Tensor) else gain
    )
    flat = keys.reshape(batch * length, heads, dim)
    picked = flat.index_select(0, rows).to(dtype)  # [R, H, d], exact: never narrower than the keys
    edited = picked + experts.edit(picked, weights)
    return flat.index_copy(0, rows, edited.to(keys.dtype)).view(keys.shape), coefficients


def _make_query_hook(
    sites: LayerSites, layout: ModelLayout, slot: _Slot, seq_len: int, query_index: int, claim: ModelClaim
) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not claim.here():  # another thread's forward: not routed
            return
        queries = queries_view(output, sites, layout)  # [B, T, n_q, d]
        if queries.shape[1] == seq_len:  # prefill; decode steps route nothing
            slot.queries = queries[:, query_index]  # left padding: the last position is every row's last token

    return hook


def _make_key_hook(
    sites: LayerSites,
    layout: ModelLayout,
    experts: LayerExperts,
    highlight: torch.Tensor,
    slot: _Slot,
    *,
    gain: float | torch.Tensor,
    row0: bool,
    reference: bool,
    keep_queries: bool,
    record: RoutingRecord | None,
    capture_queries: bool,
    query_index: int,
    gate: CoefficientGate | None,
    claim: ModelClaim,
    rows: torch.Tensor,
) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]:
    """The key-site hook; with ``capture_queries`` it also reads the queries (fused ``qkv_proj`` sites). Forwards of
    threads other than ``claim``'s pass through unedited. ``rows``: the highlighted tokens' flat indices."""
    shape = tuple(highlight.shape)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not claim.here():
            return None
        keys = keys_view(output, sites, layout)  # [B, T, H, d]
        if keys.shape[1] == 1 and shape[1] != 1:  # a decode step: the cache keeps the prefill edit
            return None
        _check_shape(sites.layer_id, tuple(keys.shape[:2]), shape)
        if capture_queries:
            slot.queries = queries_view(output, sites, layout)[:, query_index]
        if slot.queries is None:
            raise RuntimeError(
                f"layer {sites.layer_id}: the key site ran before the query site, so there is no query to route "
                "with; this model family computes keys first and needs routing from a separate pass "
                "(compat=['separate_pass'])"
            )
        edited, coefficients = routed_keys(
            keys,
            slot.queries,
            experts,
            highlight,
            gain=gain,
            num_kv_heads=layout.num_kv_heads,
            row0=row0,
            reference=reference,
            gate=None if gate is None else partial(gate, sites.layer_id),
            rows=rows,
        )
        if not keep_queries:
            slot.queries = None
        if record is not None:
            record.coefficients[sites.layer_id] = coefficients.detach()
        return with_keys(output, edited, sites, layout)

    return hook


class AdaptiveSteerer(AttachedHooks):
    """AdaSEKA routing hooks (SPEC §5)."""

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        experts: ExpertSet,
        enc: dict[str, torch.Tensor],
        *,
        gain: float = 1.0,
        top_k: int = 5,
        layers: str | Sequence[int] = "all",
        layer_mapping: str = "by_id",
        compat: Collection[str] | None = None,
        record: RoutingRecord | None = None,
        layout: ModelLayout | None = None,
        layer_experts: dict[int, LayerExperts] | None = None,
        gate: CoefficientGate | None = None,
        query_index: int = -1,
        length_reference: int | None = None,
        length_power: float = 1.0,
    ) -> AdaptiveSteerer:
        """Hooks for one encoded batch (``input_ids``, ``attention_mask``, bool ``highlight_mask``, left-padded).

        ``layer_experts`` (expert layer id -> :class:`LayerExperts` for ``top_k``) may be passed to reuse the
        truncated factors across batches. ``gate`` maps each layer's coefficients (None = training-free routing);
        ``query_index`` is the position of the routing query (every row's last prompt token). The model is claimed
        until :meth:`remove` (:func:`~seka_lightning.steering.claim_model`): nested steering raises, and forwards of
        other threads are not routed. ``length_reference`` / ``length_power``: a row with ``n`` highlighted tokens is
        edited with ``min(1, (length_reference / n) ** length_power)`` of the gain (None: full strength).
        """
        check_length_scaling(length_reference, length_power)
        options = validate_compat(compat)
        layout = layout or resolve_layout(model)
        if experts.num_kv_heads != layout.num_kv_heads or experts.head_dim != layout.head_dim:
            raise ValueError(
                f"the experts have {experts.num_kv_heads} KV heads of dim {experts.head_dim} but the model has "
                f"{layout.num_kv_heads} of dim {layout.head_dim}; build experts for this model with `seka fit`"
            )
        highlight = enc["highlight_mask"]
        if highlight.ndim != 2 or highlight.dtype != torch.bool:
            raise ValueError(
                f"highlight_mask must be a bool tensor [B, T], got {highlight.dtype} {tuple(highlight.shape)}"
            )
        mapping = select_expert_layers(experts, layers, layout.num_layers, layer_mapping)
        steerer = cls(handles=[], layer_ids=[], claim=claim_model(layout, "AdaSEKA"))
        try:
            if not bool(highlight.any()):
                return steerer
            queries = (
                separate_pass_queries(
                    model,
                    layout,
                    list(mapping),
                    enc["input_ids"],
                    output_hidden_state="output_hidden_state" in options,
                    query_index=query_index,
                )
                if "separate_pass" in options
                else {}
            )
            gains = row_gains(highlight, gain, length_reference=length_reference, length_power=length_power)
            rows = highlight.flatten().nonzero().squeeze(1)  # one host sync per batch, none per layer
            for layer_id, expert_layer in mapping.items():
                sites = layout.layers[layer_id]
                device = _module_device(sites.key_module)
                per_layer = (layer_experts or {}).get(expert_layer) or experts.layer(expert_layer, top_k=top_k)
                slot = _Slot(queries.get(layer_id))
                fused = sites.query_module is sites.key_module
                if layer_id not in queries and not fused:
                    hook = _make_query_hook(sites, layout, slot, highlight.shape[1], query_index, steerer.claim)
                    steerer.handles.append(sites.query_module.register_forward_hook(hook))
                key_hook = _make_key_hook(
                    sites,
                    layout,
                    per_layer.to(device),
                    highlight.to(device),
                    slot,
                    gain=gains.to(device) if isinstance(gains, torch.Tensor) else gains,
                    row0="row0" in options,
                    reference="reference_coefficients" in options,
                    keep_queries=layer_id in queries,
                    record=record,
                    capture_queries=fused and layer_id not in queries,
                    query_index=query_index,
                    gate=gate,
                    claim=steerer.claim,
                    rows=rows.to(device),
                )
                steerer.handles.append(sites.key_module.register_forward_hook(key_hook))
                steerer.layer_ids.append(layer_id)
        except BaseException:
            steerer.remove()
            raise
        return steerer


@contextmanager
def adaptive_steer(
    model: nn.Module,
    experts: ExpertSet,
    enc: dict[str, torch.Tensor],
    *,
    gain: float = 1.0,
    top_k: int = 5,
    layers: str | Sequence[int] = "all",
    layer_mapping: str = "by_id",
    compat: Collection[str] | None = None,
    record: RoutingRecord | None = None,
    length_reference: int | None = None,
    length_power: float = 1.0,
) -> Iterator[AdaptiveSteerer]:
    """Steer ``model`` with AdaSEKA routing for the encoded batch ``enc``; hooks are always removed. Only this
    thread's forwards are steered; steering an already steered model raises ``RuntimeError``."""
    steerer = AdaptiveSteerer.attach(
        model,
        experts,
        enc,
        gain=gain,
        top_k=top_k,
        layers=layers,
        layer_mapping=layer_mapping,
        compat=compat,
        record=record,
        length_reference=length_reference,
        length_power=length_power,
    )
    try:
        yield steerer
    finally:
        steerer.remove()


def decoder_layer_of(model: nn.Module, attention: nn.Module) -> nn.Module:
    """The decoder layer that holds ``attention`` (its parent module)."""
    for module in model.modules():
        if any(getattr(module, name, None) is attention for name in ATTENTION_ATTRS):
            return module
    raise ValueError(f"no module of {type(model).__name__} holds the attention module {type(attention).__name__}")


def queries_from_hidden(model: nn.Module, sites: LayerSites, layout: ModelLayout, hidden: torch.Tensor) -> torch.Tensor:
    """Layer ``sites.layer_id``'s queries ``[B, T, n_q, d]`` for an arbitrary hidden state ``[B, T, D]``.

    Applies the layer's ``input_layernorm`` (none for post-norm layers such as OLMo-2), the query projection and,
    where the family has one, ``q_norm`` in the family's layout, as the reference computes its routing query.
    """
    layer = decoder_layer_of(model, sites.attention)
    norm = getattr(layer, "input_layernorm", None)
    x = norm(hidden) if norm is not None else hidden
    attention, module = sites.attention, sites.query_module
    if sites.query_slice is not None or module is getattr(attention, "q_proj", None):
        return queries_view(module(x), sites, layout)
    projected = attention.q_proj(x)
    heads = (layout.num_query_heads, layout.head_dim)
    if sites.query_layout == "flat":
        out = module(projected)
    elif sites.query_layout == "token_major":
        out = module(projected.unflatten(-1, heads))
    else:
        out = module(projected.unflatten(-1, heads).transpose(1, 2))
    return queries_view(out, sites, layout)


@torch.no_grad()
def separate_pass_queries(
    model: nn.Module,
    layout: ModelLayout,
    layer_ids: Sequence[int],
    input_ids: torch.Tensor,
    *,
    output_hidden_state: bool,
    query_index: int = -1,
) -> dict[int, torch.Tensor]:
    """The reference's routing queries: one extra forward over ``input_ids`` alone (no attention mask, default
    positions, as the reference runs it), then the query at ``query_index`` (the last token by default) of layer L
    from ``hidden_states[L + 1]`` (``output_hidden_state``) or ``hidden_states[L]``. Returns
    ``{layer: [B, n_q, d]}``."""
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    shift = 1 if output_hidden_state else 0
    return {
        layer: queries_from_hidden(
            model, layout.layers[layer], layout, out.hidden_states[layer + shift][:, [query_index]]
        )[:, 0]
        for layer in layer_ids
    }


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")
