"""Where decoder layers, attention modules and the key/query sites live in a causal LM.

SEKA edits the attention key *before* rotary embedding and *after* ``k_norm`` where the
attention has one (SPEC §1); AdaSEKA reads the query at the matching site (SPEC §5). This
module maps a Hugging Face transformers model to those sites: a small table keyed by
``config.model_type`` (families are data, not ``isinstance`` chains), with discovery by
structure as the fallback for model types the table does not know.

A *site* is a module whose forward output holds the keys (resp. queries), called once per
layer forward, so hooks can read and rewrite it. Its output comes in one of three layouts:

- ``"flat"``: ``[..., T, width]``; the heads are ``width`` (or ``output[..., site_slice]``)
  unflattened into ``[n, d]`` (``k_proj``, OLMo-2's whole-projection ``k_norm``, Phi-3's
  fused ``qkv_proj`` with a column slice);
- ``"token_major"``: ``[..., T, n, d]`` (Qwen3's per-head ``k_norm``);
- ``"head_major"``: ``[..., n, T, d]`` (Gemma-3 normalises after the head transpose).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal, get_args

import torch
from torch import nn

__all__ = [
    "FAMILIES",
    "FamilySpec",
    "LayerSites",
    "ModelLayout",
    "SiteLayout",
    "SiteSpec",
    "keys_view",
    "queries_view",
    "resolve_layout",
    "with_keys",
    "with_queries",
]

log = logging.getLogger(__name__)

SiteLayout = Literal["flat", "token_major", "head_major"]
FusedPart = Literal["query", "key"]

ATTENTION_ATTRS: tuple[str, ...] = ("self_attn", "attention", "attn")
"""Attribute names tried, in order, for a decoder layer's attention module during discovery."""


@dataclass(frozen=True)
class SiteSpec:
    """Which attention submodule holds the keys (or queries), and how its output is laid out."""

    module: str
    """Attribute of the attention module whose forward output is the site."""
    layout: SiteLayout
    """Layout of that output (see the module docstring)."""
    fused_part: FusedPart | None = None
    """For a fused ``[q | k | v]`` projection, the part this site reads; None if not fused."""

    def __post_init__(self) -> None:
        if self.layout not in get_args(SiteLayout):
            raise ValueError(f"SiteSpec.layout must be one of {get_args(SiteLayout)}, got {self.layout!r}")
        if self.fused_part is not None and self.layout != "flat":
            raise ValueError(f"SiteSpec.fused_part needs layout 'flat', got {self.layout!r}")


@dataclass(frozen=True)
class FamilySpec:
    """Where one model family keeps its decoder layers and attention sites."""

    layer_paths: tuple[str, ...]
    """Dotted attribute paths to the decoder-layer ``nn.ModuleList``, tried in order."""
    attention: str
    """Attribute of a decoder layer holding its attention module."""
    key: SiteSpec
    query: SiteSpec

    def __post_init__(self) -> None:
        for part in ("key", "query"):
            site: SiteSpec = getattr(self, part)
            if site.fused_part not in (None, part):
                raise ValueError(f"FamilySpec.{part} reads the fused {site.fused_part!r} part; use fused_part={part!r}")


_CAUSAL_LM_PATHS = ("model.layers", "layers")
_PROJ_KEY = SiteSpec("k_proj", "flat")
_PROJ_QUERY = SiteSpec("q_proj", "flat")
_LLAMA_LIKE = FamilySpec(_CAUSAL_LM_PATHS, "self_attn", key=_PROJ_KEY, query=_PROJ_QUERY)
_GEMMA3_KEY = SiteSpec("k_norm", "head_major")
_GEMMA3_QUERY = SiteSpec("q_norm", "head_major")

FAMILIES: Mapping[str, FamilySpec] = MappingProxyType(
    {
        "llama": _LLAMA_LIKE,
        "mistral": _LLAMA_LIKE,
        "qwen2": _LLAMA_LIKE,
        # Qwen3 normalises each head before the [B, T, H, D] -> [B, H, T, D] transpose.
        "qwen3": FamilySpec(
            _CAUSAL_LM_PATHS,
            "self_attn",
            key=SiteSpec("k_norm", "token_major"),
            query=SiteSpec("q_norm", "token_major"),
        ),
        # Gemma-3 normalises each head after the transpose, so k_norm outputs [B, H, T, D].
        "gemma3_text": FamilySpec(_CAUSAL_LM_PATHS, "self_attn", key=_GEMMA3_KEY, query=_GEMMA3_QUERY),
        "gemma3": FamilySpec(
            ("model.language_model.layers", "language_model.layers"),
            "self_attn",
            key=_GEMMA3_KEY,
            query=_GEMMA3_QUERY,
        ),
        # OLMo-2 normalises the whole projection (width n * d) before splitting heads.
        "olmo2": FamilySpec(
            _CAUSAL_LM_PATHS,
            "self_attn",
            key=SiteSpec("k_norm", "flat"),
            query=SiteSpec("q_norm", "flat"),
        ),
        # Phi-3 fuses the projections; qkv_proj columns are [queries | keys | values].
        "phi3": FamilySpec(
            _CAUSAL_LM_PATHS,
            "self_attn",
            key=SiteSpec("qkv_proj", "flat", fused_part="key"),
            query=SiteSpec("qkv_proj", "flat", fused_part="query"),
        ),
    }
)
"""The family table, keyed by ``config.model_type``."""


@dataclass(frozen=True)
class LayerSites:
    """The attention module and the key/query sites of one decoder layer."""

    layer_id: int
    """Index of the decoder layer in the model."""
    attention: nn.Module
    """The layer's attention module."""
    key_module: nn.Module
    """Module whose forward output holds the keys (pre-RoPE, post ``k_norm``)."""
    key_slice: slice | None
    """Slice of the output's last dim holding the keys (None: the whole output)."""
    query_module: nn.Module
    """Module whose forward output holds the queries (pre-RoPE, post ``q_norm``)."""
    query_slice: slice | None
    """Slice of the output's last dim holding the queries (None: the whole output)."""
    key_layout: SiteLayout = "flat"
    """Layout of ``key_module``'s output (see the module docstring)."""
    query_layout: SiteLayout = "flat"
    """Layout of ``query_module``'s output."""

    def __post_init__(self) -> None:
        for name in ("key", "query"):
            site_slice = getattr(self, f"{name}_slice")
            site_layout = getattr(self, f"{name}_layout")
            if site_layout not in get_args(SiteLayout):
                raise ValueError(f"LayerSites.{name}_layout must be one of {get_args(SiteLayout)}, got {site_layout!r}")
            if site_slice is None:
                continue
            if site_layout != "flat":
                raise ValueError(f"LayerSites.{name}_slice needs {name}_layout 'flat', got {site_layout!r}")
            if not (isinstance(site_slice.start, int) and isinstance(site_slice.stop, int) and site_slice.step is None):
                raise ValueError(
                    f"LayerSites.{name}_slice must be slice(start, stop) with int bounds and no step, "
                    f"got {site_slice!r}"
                )


@dataclass(frozen=True)
class ModelLayout:
    """Every decoder layer's sites plus the attention geometry of a model."""

    family: str
    """Table key that matched, or ``"discovered"``."""
    layers: tuple[LayerSites, ...]
    """One entry per decoder layer, in order."""
    num_query_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.layers)


def resolve_layout(model: nn.Module) -> ModelLayout:
    """Locate the decoder layers and key/query sites of ``model``.

    The family table is tried first (by ``config.model_type``), then discovery by structure.
    Head counts come from the text config and are checked against the module shapes.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    text_config = _text_config(config)
    spec = FAMILIES.get(model_type) if isinstance(model_type, str) else None

    layers = _layers_at_paths(model, spec.layer_paths) if spec is not None else None
    if layers is None:
        layers, attention_attr = _discover_layers(model, model_type=model_type, text_config=text_config)
    else:
        attention_attr = spec.attention

    if text_config is None:
        raise ValueError(
            f"{type(model).__name__} has no `config`; resolve_layout needs num_attention_heads, "
            "num_key_value_heads and head_dim from a transformers config on `model.config`"
        )
    num_q, num_kv, head_dim = head_geometry(text_config)

    if spec is not None:
        family = model_type
        spec = replace(spec, attention=attention_attr)
    else:
        family = "discovered"
        first_attention = getattr(layers[0], attention_attr)
        spec = FamilySpec(
            (),
            attention_attr,
            key=_discover_site(first_attention, "key", num_heads=num_kv, head_dim=head_dim),
            query=_discover_site(first_attention, "query", num_heads=num_q, head_dim=head_dim),
        )
        log.info("resolved %s (model_type=%r) by structure: %s", type(model).__name__, model_type, spec)

    sites = tuple(
        _layer_sites(layer_id, layer, spec, family=family, num_q=num_q, num_kv=num_kv, head_dim=head_dim)
        for layer_id, layer in enumerate(layers)
    )
    return ModelLayout(family=family, layers=sites, num_query_heads=num_q, num_kv_heads=num_kv, head_dim=head_dim)


def attention_configs(model: nn.Module) -> list[object]:
    """Every config whose attention implementation a model's modules read (sub-configs included): what must change,
    and be restored, to run the model with another implementation."""
    found: dict[int, object] = {}
    pending = [model.config] + [m.config for m in model.modules() if hasattr(m, "config") and m is not model]
    while pending:
        config = pending.pop()
        if id(config) in found or not hasattr(config, "_attn_implementation_internal"):
            continue
        found[id(config)] = config
        pending += [getattr(config, key) for key in getattr(config, "sub_configs", {}) if getattr(config, key, None)]
    return list(found.values())


def keys_view(output: torch.Tensor, sites: LayerSites, layout: ModelLayout) -> torch.Tensor:
    """The ``[B, T, n_kv, d]`` view of the keys inside a key-module output.

    It is a view (no copy): in-place writes to it edit ``output``.
    """
    return _heads_view(
        output, sites.key_slice, sites.key_layout, num_heads=layout.num_kv_heads, head_dim=layout.head_dim
    )


def queries_view(output: torch.Tensor, sites: LayerSites, layout: ModelLayout) -> torch.Tensor:
    """The ``[B, T, n_q, d]`` view of the queries inside a query-module output."""
    return _heads_view(
        output,
        sites.query_slice,
        sites.query_layout,
        num_heads=layout.num_query_heads,
        head_dim=layout.head_dim,
    )


def with_keys(output: torch.Tensor, keys: torch.Tensor, sites: LayerSites, layout: ModelLayout) -> torch.Tensor:
    """A copy of a key-module output with its keys replaced by ``keys`` (``[B, T, n_kv, d]``).

    The inverse of ``keys_view`` without in-place writes, so a forward hook can return it; other
    columns (Phi-3's queries and values) are kept and ``keys`` is cast to ``output.dtype``.
    """
    return _with_heads(
        output,
        keys,
        sites.key_slice,
        sites.key_layout,
        num_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
    )


def with_queries(output: torch.Tensor, queries: torch.Tensor, sites: LayerSites, layout: ModelLayout) -> torch.Tensor:
    """A copy of a query-module output with its queries replaced by ``queries`` (``[B, T, n_q, d]``)."""
    return _with_heads(
        output,
        queries,
        sites.query_slice,
        sites.query_layout,
        num_heads=layout.num_query_heads,
        head_dim=layout.head_dim,
    )


def _heads_view(
    output: torch.Tensor,
    site_slice: slice | None,
    site_layout: SiteLayout,
    *,
    num_heads: int,
    head_dim: int,
) -> torch.Tensor:
    if site_layout == "flat":
        part = output if site_slice is None else output[..., site_slice]
        if part.shape[-1] != num_heads * head_dim:
            raise ValueError(
                f"site output has {part.shape[-1]} features (slice {site_slice}) but {num_heads} heads x "
                f"head_dim {head_dim} = {num_heads * head_dim} were expected; was the layout resolved "
                "for this model?"
            )
        return part.unflatten(-1, (num_heads, head_dim))
    head_axis = -2 if site_layout == "token_major" else -3
    if output.dim() < 4 or output.shape[head_axis] != num_heads or output.shape[-1] != head_dim:
        raise ValueError(
            f"{site_layout} site output has shape {tuple(output.shape)}; expected {num_heads} heads on "
            f"dim {head_axis} and head_dim {head_dim} last; was the layout resolved for this model?"
        )
    return output if site_layout == "token_major" else output.transpose(-3, -2)


def _with_heads(
    output: torch.Tensor,
    heads: torch.Tensor,
    site_slice: slice | None,
    site_layout: SiteLayout,
    *,
    num_heads: int,
    head_dim: int,
) -> torch.Tensor:
    expected = _heads_view(output, site_slice, site_layout, num_heads=num_heads, head_dim=head_dim).shape
    if heads.shape != expected:
        raise ValueError(f"replacement heads have shape {tuple(heads.shape)}, expected {tuple(expected)}")
    heads = heads.to(output.dtype)
    if site_layout == "token_major":
        return heads
    if site_layout == "head_major":
        return heads.transpose(-3, -2)
    flat = heads.flatten(-2)  # [..., T, n * d]
    if site_slice is None:
        return flat
    return torch.cat((output[..., : site_slice.start], flat, output[..., site_slice.stop :]), dim=-1)


def _text_config(config: object | None) -> object | None:
    """The decoder's text config (``text_config`` of multimodal wrappers such as Gemma-3)."""
    if config is None:
        return None
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config(decoder=True) if callable(get_text_config) else config


def head_geometry(config: object) -> tuple[int, int, int]:
    """``(num_query_heads, num_kv_heads, head_dim)`` with the transformers defaults."""
    num_q = getattr(config, "num_attention_heads", None)
    if not isinstance(num_q, int) or num_q <= 0:
        raise ValueError(f"config {type(config).__name__} needs a positive int num_attention_heads, got {num_q!r}")
    num_kv = getattr(config, "num_key_value_heads", None) or num_q
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        hidden_size = getattr(config, "hidden_size", None)
        if not isinstance(hidden_size, int):
            raise ValueError(
                f"config {type(config).__name__} has neither head_dim nor an int hidden_size to derive it from"
            )
        head_dim = hidden_size // num_q
    if num_q % num_kv != 0:
        raise ValueError(
            f"num_attention_heads={num_q} is not a multiple of num_key_value_heads={num_kv} "
            f"in {type(config).__name__}; fix the config"
        )
    return num_q, num_kv, head_dim


def _get_path(root: nn.Module, path: str) -> object | None:
    node: object = root
    for name in path.split("."):
        node = getattr(node, name, None)
        if node is None:
            return None
    return node


def _layers_at_paths(model: nn.Module, paths: tuple[str, ...]) -> nn.ModuleList | None:
    for path in paths:
        node = _get_path(model, path)
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return node
    return None


def _attention_attr(layer: nn.Module) -> str | None:
    """The first attribute in ATTENTION_ATTRS naming an attention module with projections."""
    for name in ATTENTION_ATTRS:
        attention = getattr(layer, name, None)
        if not isinstance(attention, nn.Module):
            continue
        separate = hasattr(attention, "k_proj") and hasattr(attention, "q_proj")
        if separate or hasattr(attention, "qkv_proj"):
            return name
    return None


def _discover_layers(model: nn.Module, *, model_type: object, text_config: object | None) -> tuple[nn.ModuleList, str]:
    """Find the decoder-layer ModuleList by structure.

    Several candidates (e.g. a vision tower's encoder layers) are narrowed to those inside the
    text decoder (``get_decoder()``), then to those with ``num_hidden_layers`` entries.
    """
    candidates: list[tuple[str, nn.ModuleList, str]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        attrs = {_attention_attr(layer) for layer in module}
        if len(attrs) == 1 and None not in attrs:
            candidates.append((name, module, attrs.pop()))
    if not candidates:
        raise ValueError(
            f"cannot locate decoder layers in {type(model).__name__} (model_type={model_type!r}): "
            f"model_type is not in the family table {sorted(FAMILIES)}, and no nn.ModuleList was found "
            f"whose children have an attention submodule {list(ATTENTION_ATTRS)} with k_proj and q_proj "
            "or qkv_proj; add an entry to seka_lightning.families.FAMILIES"
        )
    if len(candidates) > 1:
        decoder = _decoder(model)
        if decoder is not None:
            inside = {id(m) for m in decoder.modules()}
            candidates = [c for c in candidates if id(c[1]) in inside] or candidates
    num_layers = getattr(text_config, "num_hidden_layers", None)
    if len(candidates) > 1 and isinstance(num_layers, int):
        candidates = [c for c in candidates if len(c[1]) == num_layers] or candidates
    if len(candidates) > 1:
        raise ValueError(
            f"ambiguous decoder layers in {type(model).__name__} (model_type={model_type!r}): "
            f"{[c[0] for c in candidates]} all look like attention layer stacks; add an entry to "
            "seka_lightning.families.FAMILIES naming the right layer_paths"
        )
    _, layers, attention_attr = candidates[0]
    return layers, attention_attr


def _decoder(model: nn.Module) -> nn.Module | None:
    get_decoder = getattr(model, "get_decoder", None)
    if not callable(get_decoder):
        return None
    decoder = get_decoder()
    return decoder if isinstance(decoder, nn.Module) else None


def _feature_width(module: nn.Module) -> int | None:
    """Output width of a linear layer, or the normalised width of a norm with a 1-D weight."""
    out_features = getattr(module, "out_features", None)
    if isinstance(out_features, int):
        return out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.numel()
    return None


def _discover_site(attention: nn.Module, part: FusedPart, *, num_heads: int, head_dim: int) -> SiteSpec:
    """Pick the key or query site of an attention module from the submodules it has."""
    letter = part[0]
    norm, proj = f"{letter}_norm", f"{letter}_proj"
    if hasattr(attention, norm) and hasattr(attention, proj):
        width = _feature_width(getattr(attention, norm))
        if width == num_heads * head_dim:
            return SiteSpec(norm, "flat")
        # A per-head norm may run before or after the head transpose (Qwen3 vs Gemma-3);
        # module structure cannot tell which, and guessing would silently read the wrong axis.
        raise ValueError(
            f"{type(attention).__name__}.{norm} normalises {width} features, not the whole projection "
            f"({num_heads} x {head_dim}); whether its output is [B, T, H, D] or [B, H, T, D] cannot be "
            "discovered by structure; add the model type to seka_lightning.families.FAMILIES"
        )
    if hasattr(attention, proj):
        return SiteSpec(proj, "flat")
    return SiteSpec("qkv_proj", "flat", fused_part=part)


def _layer_sites(
    layer_id: int,
    layer: nn.Module,
    spec: FamilySpec,
    *,
    family: str,
    num_q: int,
    num_kv: int,
    head_dim: int,
) -> LayerSites:
    attention = getattr(layer, spec.attention, None)
    if not isinstance(attention, nn.Module):
        raise ValueError(
            f"{family}: decoder layer {layer_id} ({type(layer).__name__}) has no attention module `{spec.attention}`"
        )
    where = f"{family}: layer {layer_id}"
    geometry = {"num_q": num_q, "num_kv": num_kv, "head_dim": head_dim}
    key_module, key_slice = _site_module(attention, spec.key, "key", where=where, **geometry)
    query_module, query_slice = _site_module(attention, spec.query, "query", where=where, **geometry)
    return LayerSites(
        layer_id=layer_id,
        attention=attention,
        key_module=key_module,
        key_slice=key_slice,
        query_module=query_module,
        query_slice=query_slice,
        key_layout=spec.key.layout,
        query_layout=spec.query.layout,
    )


def _site_module(
    attention: nn.Module,
    site: SiteSpec,
    part: FusedPart,
    *,
    where: str,
    num_q: int,
    num_kv: int,
    head_dim: int,
) -> tuple[nn.Module, slice | None]:
    """The site's module and output slice, after checking its width against the head counts."""
    module = getattr(attention, site.module, None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"{where}: {type(attention).__name__} has no submodule `{site.module}`")
    site_slice: slice | None = None
    if site.fused_part is not None:
        expected = (num_q + 2 * num_kv) * head_dim
        explain = f"(num_attention_heads={num_q} + 2 x num_key_value_heads={num_kv}) x head_dim={head_dim}"
        query_width = num_q * head_dim
        site_slice = (
            slice(0, query_width) if site.fused_part == "query" else slice(query_width, query_width + num_kv * head_dim)
        )
    elif site.layout != "flat":
        expected, explain = head_dim, f"head_dim={head_dim}"
    else:
        heads, heads_field = (num_kv, "num_key_value_heads") if part == "key" else (num_q, "num_attention_heads")
        expected, explain = heads * head_dim, f"{heads_field}={heads} x head_dim={head_dim}"
    width = _feature_width(module)
    if width is not None and width != expected:
        raise ValueError(
            f"{where}: {type(attention).__name__}.{site.module} has {width} features but the config implies "
            f"{expected} = {explain}; check num_attention_heads, num_key_value_heads and head_dim "
            "in the config"
        )
    return module, site_slice
