"""Do SEKA's learned key projections beat plain key scaling (P = I) on CounterFact, and which statistic would?

Captures the answer-token keys of synthetic-QA triplets once (the product's capture code), derives several P+ per
layer and KV head from them (SEKA as specified, a centred cross-covariance, SEKA with the mean key direction
projected out, the top directions of the positive-minus-negative differences, key scaling P = I, key scaling that
leaves the mean key direction alone P = I - m mᵀ, and random projectors of SEKA's ranks), and scores each on
CounterFact *dev* efficacy (records 4500:5000 only) over a gain grid and a few layer sets, with the product's
steering hooks. Per configuration it reports efficacy with a 95% Wilson interval, the mean relative edit norm
||kG|| / ||k|| over the highlighted keys, and exact McNemar p-values against
key scaling at the same gain and at the key-scaling gain whose edit norm is closest.

The layers below the lowest steered layer are the same in every configuration, so their output is computed once per
batch and the steered passes start from it (checked against a full steered pass; the difference is recorded).

Avenues (issue 15 item 8), each opt-in by its flag (gains from AVENUE_GRID unless --grid gives them):
``--phi`` SEKA on the reference's feature maps φ(keys), edited as φ⁻¹(φ(k) + g φ(k) P+) (``seka_phi_*``);
``--neg-ratios`` SEKA with P- at g- = ratio x g+ (``seka_neg_r*``); ``--head-gains`` per-head gains from the spectra
(``seka_headgain``, :func:`spectral_head_weights`); ``--chat`` P+ from chat-template building texts
(``seka_chat``, ``seka_minus_mean_chat``); ``--more-pairs N`` P+ from N QA pairs (``seka_more``,
``seka_minus_mean_more``). ``--device cuda`` runs everything on a GPU in float32.

    PYTHONPATH=src python scripts/research/key_directions.py --model embedded:smollm2-135m \
        --counterfact ../shared/data/counterfact --out docs/research/key_directions_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from seka_lightning.bank import ProjectionBank
from seka_lightning.baselines.random_projection import projector_ranks, random_projectors
from seka_lightning.benchmarks.counterfact import load_counterfact
from seka_lightning.capture import collect_triplet_keys
from seka_lightning.data.triplets import ChatTriplet, iter_triplets, read_pairs
from seka_lightning.families import LayerSites, ModelLayout, keys_view, resolve_layout, with_keys
from seka_lightning.files import write_json
from seka_lightning.highlight import encode_spans
from seka_lightning.layers import parse_layers
from seka_lightning.methods import position_ids_for
from seka_lightning.metrics import first_token_logprob, target_first_token_ids
from seka_lightning.models import load_model
from seka_lightning.projections import Projections, projections_from_sums
from seka_lightning.provenance import git_state
from seka_lightning.significance import mcnemar_exact as significance_mcnemar
from seka_lightning.significance import wilson_interval
from seka_lightning.stats import KeyStatistics
from seka_lightning.steering import FusedGains, KeySteerer

log = logging.getLogger("key_directions")
CPU = torch.device("cpu")

DEV_SLICE = "4500:5000"
# gains per variant: key scaling densely (to match edit norms); SEKA minus its mean direction edits about a third of
# the key's norm per unit gain, so it gets larger gains
DEFAULT_GRID = (
    "key_scaling=4,6,8,12,16,24",
    "seka=8,16,32",
    "seka_minus_mean=16,32,64",
    "random=16",
    "centred=16,32",
    "difference=16",
)  # BENCHMARKS.md: CounterFact dev/tuning records; never tune on 5000:10000
# gains of the avenue variants (issue 15 item 8), added to the default grid when their flag is given (SmolLM2 scale)
AVENUE_GRID = {
    # gain 0: what the reference's clamps alone do to the highlighted keys
    "phi": ("seka_phi_tanh=0,4,16", "seka_phi_elu=8,16", "seka_phi_sqexp=0,4,16"),
    "neg_ratios": ("seka_neg=16",),
    "head_gains": ("seka_headgain=8,16",),
    "chat": ("seka_chat=8,16", "seka_minus_mean_chat=16,32"),
    "more_pairs": ("seka_more=8,16", "seka_minus_mean_more=16,32"),
}


# ----------------------------------------------------------------------------------------------------- statistics


def capture_triplet_keys(
    model: nn.Module,
    tokenizer,
    layout: ModelLayout,
    pairs: Sequence[dict],
    *,
    batch_size: int,
    device: torch.device,
    chat: bool = False,
) -> dict[str, torch.Tensor]:
    """Answer-token keys of every layer for the triplets of ``pairs``: ``neutral``/``positive``/``negative``, each
    ``[L, M, H, d]`` float64 on the CPU (rows aligned across the three texts); ``chat`` wraps the texts in the chat
    template (:class:`ChatTriplet`)."""
    layer_ids = list(range(layout.num_layers))
    triplets = list(iter_triplets(pairs))
    if chat:
        triplets = [ChatTriplet(triplet, tokenizer) for triplet in triplets]
    parts: dict[str, list[torch.Tensor]] = {"neutral": [], "positive": [], "negative": []}
    for start in range(0, len(triplets), batch_size):
        got = collect_triplet_keys(
            model, tokenizer, layout, layer_ids, triplets[start : start + batch_size], device=device
        )
        if got is None:
            continue
        for name in parts:
            parts[name].append(getattr(got, name).to(device="cpu", dtype=torch.float64))
    return {name: torch.cat(chunks, dim=1) for name, chunks in parts.items()}


def spectral_projections(h: torch.Tensor, hp: torch.Tensor, hn: torch.Tensor, *, top_pct: float) -> Projections:
    """SPEC §3's projections from rows ``h, h+, h-`` ``[L, M, H, d]``: P+ (top singular directions of
    ``Σ hᵀh+ / N``), P- (complement of the top of ``Σ hᵀh- / N``) and both spectra (the product's
    :class:`KeyStatistics` and :func:`projections_from_sums`, min_diff 0: every head kept)."""
    stats = KeyStatistics(h.shape[0], h.shape[2], h.shape[3])
    stats.update(h, hp, hn)
    return projections_from_sums(stats.compute(), top_pct=top_pct, min_diff=0.0)


def cross_projector(h: torch.Tensor, hp: torch.Tensor, hn: torch.Tensor, *, top_pct: float) -> torch.Tensor:
    """SPEC §3's P+ from rows ``h, h+, h-`` ``[L, M, H, d]`` (:func:`spectral_projections`)."""
    return spectral_projections(h, hp, hn, top_pct=top_pct).pos


def unit_mean_key(keys: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unit mean of the neutral and positive answer-token keys per layer and head, ``[L, H, d]``."""
    mean = torch.cat([keys["neutral"], keys["positive"]], dim=1).mean(1)
    return mean / mean.norm(dim=-1, keepdim=True)


def mean_complement(keys: dict[str, torch.Tensor]) -> torch.Tensor:
    """``I - m mᵀ`` per layer and head ``[L, H, d, d]`` (float32), m the :func:`unit_mean_key`."""
    m = unit_mean_key(keys).to(torch.float32)
    return torch.eye(m.shape[-1]) - m[..., :, None] * m[..., None, :]


def variant_projectors(
    keys: dict[str, torch.Tensor], *, top_pct: float, seeds: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Every P+ variant ``[L, H, d, d]`` (float32) compared here; see the module docstring."""
    h, hp, hn = keys["neutral"], keys["positive"], keys["negative"]
    seka = cross_projector(h, hp, hn, top_pct=top_pct)
    centred = cross_projector(h - h.mean(1, keepdim=True), hp - hp.mean(1, keepdim=True), hn, top_pct=top_pct)
    without_mean = mean_complement(keys)  # [L, H, d, d]
    d = seka.shape[-1]
    diff = hp - hn
    eye = torch.eye(d).expand_as(seka).clone()
    variants = {
        "seka": seka,
        "centred": centred,
        "seka_minus_mean": without_mean @ seka @ without_mean,
        "difference": cross_projector(diff, diff, diff, top_pct=top_pct),  # top directions of Σ (h+ - h-)ᵀ(h+ - h-)
        "key_scaling": eye,
        "scaling_minus_mean": without_mean,  # P = I - m mᵀ: key scaling that leaves the mean key direction alone
    }
    ranks = projector_ranks(seka)
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        variants[f"random_s{seed}"] = random_projectors(ranks, d, generator=generator).to(torch.float32)
    return variants


# ------------------------------------------------------------------------------------------------------- avenues
# Issue 15 item 8: the reference's feature maps φ, the negative projector, per-head gains from the spectrum, chat
# building texts, more QA pairs. Each is a variant name with its own gains in --grid (see AVENUE_GRID).

PHI_NAMES = {"tanh": "seka_phi_tanh", "elu": "seka_phi_elu", "squared-exponential": "seka_phi_sqexp"}
PHI_EPS = 1e-4  # the reference's clamp margin in phi_inv


def phi(x: torch.Tensor, name: str) -> torch.Tensor:
    """The reference's key feature maps (SEKA ``src/utils.py``): ``tanh``, ``elu`` (x for x >= 0, eˣ - 1 below)
    and ``squared-exponential`` exp(-x² / 2) (length scale 1)."""
    if name == "tanh":
        return torch.tanh(x)
    if name == "elu":
        return torch.where(x >= 0, x, torch.expm1(x))
    if name == "squared-exponential":
        return torch.exp(-(x**2) / 2)
    raise ValueError(f"unknown feature map {name!r}; choose from {sorted(PHI_NAMES)}")


def phi_inv(y: torch.Tensor, name: str, *, sign: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`phi` after an edit, with the reference's clamps: atanh of y clamped to
    ±(1 - 1e-4); y above 0, log(1 + y) below with 1 + y clamped to >= 1e-4 (the reference has no clamp there and
    gives NaN); and for the squared exponential ``sign * sqrt(-2 log y)`` with y clamped to [1e-4, 1]. The
    reference returns ``-2 log y`` there, i.e. x², which is no inverse; φ drops the sign, so it is restored from
    the unedited key (``sign``, used by that map only)."""
    if name == "tanh":
        return torch.atanh(y.clamp(-1 + PHI_EPS, 1 - PHI_EPS))
    if name == "elu":
        return torch.where(y >= 0, y, torch.log((1 + y).clamp_min(PHI_EPS)))
    if name == "squared-exponential":
        return sign * torch.sqrt(-2 * torch.log(y.clamp(PHI_EPS, 1.0)))
    raise ValueError(f"unknown feature map {name!r}; choose from {sorted(PHI_NAMES)}")


def phi_edit(keys: torch.Tensor, projector: torch.Tensor, gain: float, name: str) -> torch.Tensor:
    """``φ⁻¹(φ(k) + g φ(k) P)`` for keys ``[M, H, d]`` and ``P`` ``[H, d, d]`` (the reference's edit with a
    feature map), in the keys' dtype."""
    features = phi(keys, name)
    edited = features + gain * torch.einsum("mhd,hde->mhe", features, projector)
    return phi_inv(edited, name, sign=torch.sign(keys))


def spectral_head_weights(s_pos: torch.Tensor, s_neg: torch.Tensor, layer_ids: Sequence[int]) -> torch.Tensor:
    """Per-head gain weights ``[L, H]`` from the spectra ``[L, H, d]`` of Ω+ and Ω-: each head's relative spectral
    difference ``δ = Σᵢ |S+ᵢ - S-ᵢ| / Σᵢ S+ᵢ`` divided by the mean δ over the heads of ``layer_ids``, so the
    steered heads' mean gain is g and heads whose relevant and irrelevant statistics differ more get more."""
    delta = (s_pos - s_neg).abs().sum(-1) / s_pos.sum(-1)
    return delta / delta[list(layer_ids)].mean()


@dataclass
class VariantEdit:
    """How a variant edits beyond ``k + g k P+``: with ``negative`` P-, SPEC §4's ``k + (g k P+ + r g k P-) / 2``
    (g- = ``neg_ratio`` x g); with ``phi``, :func:`phi_edit`."""

    negative: torch.Tensor | None = None
    neg_ratio: float = 0.0
    phi: str | None = None


@dataclass
class Avenues:
    """The avenue variants: projectors (float32 ``[L, H, d, d]``), how each edits, and diagnostics."""

    projectors: dict[str, torch.Tensor] = field(default_factory=dict)
    edits: dict[str, VariantEdit] = field(default_factory=dict)
    notes: dict[str, dict] = field(default_factory=dict)


def neg_name(ratio: float) -> str:
    return f"seka_neg_r{ratio:+g}"


def phi_roundtrip_error(keys: torch.Tensor, name: str) -> float:
    """Mean ``||φ⁻¹(φ(k)) - k|| / ||k||`` over keys ``[..., d]``: what the clamps change with no edit at all."""
    back = phi_inv(phi(keys, name), name, sign=torch.sign(keys))
    return float(((back - keys).norm(dim=-1) / keys.norm(dim=-1).clamp_min(1e-12)).mean())


def avenue_variants(
    keys: dict[str, torch.Tensor],
    *,
    top_pct: float,
    phis: Sequence[str],
    neg_ratios: Sequence[float],
    head_gain_layers: Sequence[int] | None,
) -> Avenues:
    """The φ, negative-projector and per-head-gain variants from the plain building keys."""
    h, hp, hn = keys["neutral"], keys["positive"], keys["negative"]
    out = Avenues()
    if neg_ratios or head_gain_layers is not None:
        spectral = spectral_projections(h, hp, hn, top_pct=top_pct)
        for ratio in neg_ratios:
            out.projectors[neg_name(ratio)] = spectral.pos
            out.edits[neg_name(ratio)] = VariantEdit(negative=spectral.neg, neg_ratio=ratio)
        if neg_ratios:
            out.notes["seka_neg"] = {"mean_trace_neg": float(spectral.neg.diagonal(dim1=-2, dim2=-1).sum(-1).mean())}
        if head_gain_layers is not None:
            weights = spectral_head_weights(spectral.s_pos.double(), spectral.s_neg.double(), head_gain_layers)
            out.projectors["seka_headgain"] = spectral.pos * weights[..., None, None].to(torch.float32)
            chosen = weights[list(head_gain_layers)]
            out.notes["seka_headgain"] = {
                "rule": "g_lh = g * delta_lh / mean(delta over steered heads), delta = sum|S+ - S-| / sum S+",
                "normalised_over_layers": list(head_gain_layers),
                "weight_min": float(chosen.min()),
                "weight_max": float(chosen.max()),
                "weights": weights.tolist(),
            }
    for name in phis:
        mapped = {kind: phi(value, name) for kind, value in keys.items()}
        variant = PHI_NAMES[name]
        out.projectors[variant] = cross_projector(
            mapped["neutral"], mapped["positive"], mapped["negative"], top_pct=top_pct
        )
        out.edits[variant] = VariantEdit(phi=name)
        out.notes[variant] = {"roundtrip_rel_error_positive_keys": phi_roundtrip_error(hp, name)}
    return out


def learned_variants(keys: dict[str, torch.Tensor], *, top_pct: float, suffix: str) -> dict[str, torch.Tensor]:
    """``seka`` and ``seka_minus_mean`` from another set of building keys (chat texts, more pairs), as
    ``seka_<suffix>`` and ``seka_minus_mean_<suffix>``."""
    seka = cross_projector(keys["neutral"], keys["positive"], keys["negative"], top_pct=top_pct)
    without_mean = mean_complement(keys)
    return {f"seka_{suffix}": seka, f"seka_minus_mean_{suffix}": without_mean @ seka @ without_mean}


def projector_summary(variants: dict[str, torch.Tensor], keys: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per variant: mean trace (rank for projectors) and the mean share of a positive key's norm that P+ keeps."""
    hp = keys["positive"].to(torch.float32)  # [L, M, H, d]
    out = {}
    for name, p in variants.items():
        kept = torch.einsum("lmhd,lhde->lmhe", hp, p).norm(dim=-1) / hp.norm(dim=-1)
        out[name] = {
            "mean_trace": float(p.diagonal(dim1=-2, dim2=-1).sum(-1).mean()),
            "kept_norm_share_positive_keys": float(kept.mean()),
        }
    return out


# ---------------------------------------------------------------------------------------------------- evaluation


@dataclass
class DevBatch:
    """One left-padded batch of dev efficacy prompts and their targets' first-token ids."""

    enc: dict[str, torch.Tensor]
    rows: list[int]  # positions of these prompts in the case_id order of the dev slice
    new_ids: list[list[int]]
    old_ids: list[list[int]]


def dev_batches(
    path: str,
    tokenizer,
    *,
    example_subset: str,
    add_special_tokens: bool,
    batch_size: int,
    device: torch.device = CPU,
) -> tuple[list[DevBatch], list[int]]:
    """The efficacy prompts of ``example_subset`` sorted by length into batches (less padding), and the case ids."""
    examples = [e for e in load_counterfact(path, example_subset=example_subset) if e.fields["kind"] == "efficacy"]
    if any(not e.spans for e in examples):
        raise ValueError("some dev prompts have no highlight; this study needs every prompt highlighted")
    lengths = [len(tokenizer(e.text, add_special_tokens=add_special_tokens)["input_ids"]) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        chosen = [examples[i] for i in rows]
        enc = encode_spans(
            tokenizer, [e.text for e in chosen], [list(e.spans) for e in chosen], add_special_tokens=add_special_tokens
        )
        enc = {name: tensor.to(device) for name, tensor in enc.items()}
        batches.append(
            DevBatch(
                enc=enc,
                rows=rows,
                new_ids=[target_first_token_ids(tokenizer, e.fields["target_new"]) for e in chosen],
                old_ids=[target_first_token_ids(tokenizer, e.fields["target_true"]) for e in chosen],
            )
        )
    return batches, [e.fields["case_id"] for e in examples]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Llama/Gemma-style causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("this study needs a model whose decoder layers are model.model.layers")
    return layers


class _PassThrough(nn.Module):
    """Stands in for a decoder layer whose output is already known: returns its input hidden states."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextmanager
def layers_skipped(layers: nn.ModuleList, count: int) -> Iterator[None]:
    """Replace the first ``count`` decoder layers by pass-throughs for the block (always restored)."""
    saved = [layers[i] for i in range(count)]
    try:
        for i in range(count):
            layers[i] = _PassThrough()
        yield
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


@torch.no_grad()
def baseline_pass(
    model: nn.Module, batch: DevBatch, starts: Sequence[int]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Unsteered last-position logits ``[B, V]`` and the hidden states entering each layer of ``starts``."""
    layers = decoder_layers(model)
    cached: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(layer_id: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            cached[layer_id] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return hook

    try:
        for start in starts:
            handles.append(layers[start].register_forward_pre_hook(make_hook(start), with_kwargs=True))
        logits = forward_logits(model, batch.enc, input_ids=batch.enc["input_ids"])
    finally:
        for handle in handles:
            handle.remove()
    return logits, cached


def forward_logits(
    model: nn.Module, enc: dict[str, torch.Tensor], *, input_ids: torch.Tensor | None = None, embeds=None
) -> torch.Tensor:
    out = model(
        input_ids=input_ids,
        inputs_embeds=embeds,
        attention_mask=enc["attention_mask"],
        position_ids=position_ids_for(enc["attention_mask"]),
        use_cache=False,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float()


def make_edit_norm_hook(sites, layout: ModelLayout, gains: torch.Tensor, rows: torch.Tensor, acc: list[float]):
    """A key-module hook (registered before the steering hook, so it sees unedited keys) that adds the sum and the
    count of ``||k G|| / ||k||`` over the highlighted rows and every head to ``acc``."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        keys = keys_view(output, sites, layout)  # [B, T, H, d]
        picked = keys.reshape(-1, *keys.shape[2:]).index_select(0, rows).float()  # [M, H, d]
        ratio = torch.einsum("mhd,hde->mhe", picked, gains).norm(dim=-1) / picked.norm(dim=-1).clamp_min(1e-12)
        acc[0] += float(ratio.sum())
        acc[1] += ratio.numel()

    return hook


def make_phi_edit_hook(
    sites: LayerSites, layout: ModelLayout, projector: torch.Tensor, gain: float, name: str, rows, acc: list[float]
):
    """A key-module hook that replaces the highlighted rows' keys by :func:`phi_edit` (in float64) and adds the sum
    and count of ``||k' - k|| / ||k||`` over those rows and every head to ``acc``."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        keys = keys_view(output, sites, layout)  # [B, T, H, d]
        flat = keys.reshape(-1, *keys.shape[2:])
        picked = flat.index_select(0, rows).to(torch.float64)  # [M, H, d]
        edited = phi_edit(picked, projector, gain, name)
        ratio = (edited - picked).norm(dim=-1) / picked.norm(dim=-1).clamp_min(1e-12)
        acc[0] += float(ratio.sum())
        acc[1] += ratio.numel()
        return with_keys(output, flat.index_copy(0, rows, edited.to(flat.dtype)).view(keys.shape), sites, layout)

    return hook


@dataclass
class SteeringSetup:
    """One configuration's edit: the bank and fused gains for the product's hooks, or a φ map for
    :func:`make_phi_edit_hook` (then ``phi_projector`` is P+ ``[L, H, d, d]`` float64 on the device)."""

    bank: ProjectionBank
    fused: FusedGains
    gain: float
    gain_neg: float | None = None
    phi: str | None = None
    phi_projector: torch.Tensor | None = None


def attach_edit(
    model: nn.Module, layout: ModelLayout, highlight: torch.Tensor, setup: SteeringSetup, layer_ids, acc: list[float]
) -> list:
    """Attach the configuration's key edit on ``layer_ids`` with its edit-norm accounting; returns what to remove."""
    rows = highlight.reshape(-1).nonzero().squeeze(1)
    if setup.phi is not None:
        return [
            layout.layers[layer].key_module.register_forward_hook(
                make_phi_edit_hook(
                    layout.layers[layer], layout, setup.phi_projector[layer], setup.gain, setup.phi, rows, acc
                )
            )
            for layer in layer_ids
        ]
    handles = [
        layout.layers[layer].key_module.register_forward_hook(
            make_edit_norm_hook(layout.layers[layer], layout, setup.fused.gains[layer], rows, acc)
        )
        for layer in layer_ids
    ]
    steerer = KeySteerer.attach(
        model,
        setup.bank,
        highlight,
        gain_pos=setup.gain,
        gain_neg=setup.gain_neg,
        layers=",".join(map(str, layer_ids)),
        fused=setup.fused,
        layout=layout,
    )
    return [steerer, *handles]


@torch.no_grad()
def steered_logits(
    model: nn.Module,
    layout: ModelLayout,
    batch: DevBatch,
    setup: SteeringSetup,
    *,
    layer_ids: list[int],
    start: int | None,
    cached: torch.Tensor | None,
    acc: list[float],
) -> torch.Tensor:
    """Logits with the configuration's key edit on ``layer_ids``; from ``cached`` hidden states entering layer
    ``start`` when given (layers below ``start`` are not steered, so their output is the baseline's)."""
    attached = attach_edit(model, layout, batch.enc["highlight_mask"], setup, layer_ids, acc)
    try:
        if cached is None:
            return forward_logits(model, batch.enc, input_ids=batch.enc["input_ids"])
        with layers_skipped(decoder_layers(model), start):
            return forward_logits(model, batch.enc, embeds=cached)
    finally:
        for item in attached:
            item.remove()


def wins(logits: torch.Tensor, batch: DevBatch) -> tuple[list[bool], list[float]]:
    """Per prompt: first-token P(new) > P(old) (BENCHMARKS.md efficacy), and P(new) - P(old)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    won, margin = [], []
    for row, (new_ids, old_ids) in enumerate(zip(batch.new_ids, batch.old_ids, strict=True)):
        new, old = first_token_logprob(logprobs[row], new_ids), first_token_logprob(logprobs[row], old_ids)
        won.append(bool(new > old))
        margin.append(float(new.exp() - old.exp()))
    return won, margin


# ---------------------------------------------------------------------------------------------------- statistics


def wilson(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (the package's :func:`significance.wilson_interval`)."""
    interval = wilson_interval(successes, n)
    return interval.low, interval.high


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact two-sided McNemar test (the package's :func:`significance.mcnemar_exact`) with the discordant counts."""
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    test = significance_mcnemar([float(x) for x in a], [float(y) for y in b])
    return {"only_a": only_a, "only_b": only_b, "p": test.p_value}


def compare_with_key_scaling(results: list[dict]) -> None:
    """Add, to every non-key-scaling result, McNemar tests against key scaling on the same layers at the same gain
    and at the key-scaling gain whose mean edit norm is closest to its own."""
    scaling = [r for r in results if r["variant"] == "key_scaling"]
    for r in results:
        if r["variant"] == "key_scaling":
            continue
        mine = [c == "1" for c in r["won"]]
        same_layers = [s for s in scaling if s["layers"] == r["layers"]]
        same_gain = next((s for s in same_layers if s["gain"] == r["gain"]), None)
        if same_gain is not None:
            r["vs_key_scaling_same_gain"] = {
                "gain": same_gain["gain"],
                "efficacy": same_gain["efficacy"],
                **mcnemar_exact(mine, [c == "1" for c in same_gain["won"]]),
            }
        if same_layers:
            matched = min(same_layers, key=lambda s: abs(math.log(s["edit_norm"] / r["edit_norm"])))
            r["vs_key_scaling_matched_norm"] = {
                "gain": matched["gain"],
                "edit_norm": matched["edit_norm"],
                "efficacy": matched["efficacy"],
                **mcnemar_exact(mine, [c == "1" for c in matched["won"]]),
            }


def split_half_selection(results: list[dict], case_ids: list[int]) -> dict[str, dict]:
    """Per variant (random seeds pooled as one variant per seed): the setting chosen on even case ids and its
    efficacy on odd case ids, an estimate free of the selection's optimism."""
    even = [i for i, c in enumerate(case_ids) if c % 2 == 0]
    odd = [i for i, c in enumerate(case_ids) if c % 2 == 1]
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        mine = [r for r in results if r["variant"] == variant]
        best = max(mine, key=lambda r: sum(r["won"][i] == "1" for i in even))
        out[variant] = {
            "layers": best["layers"],
            "gain": best["gain"],
            "select_even": sum(best["won"][i] == "1" for i in even) / len(even),
            "report_odd": sum(best["won"][i] == "1" for i in odd) / len(odd),
            "n_odd": len(odd),
        }
    return out


# ---------------------------------------------------------------------------------------------------------- main


def git_commit() -> str:
    """The commit of the code that ran, from the package's provenance helper (``$SEKA_SOURCE_COMMIT``, set by
    whoever copied the sources to another machine, wins over git); "unknown" where neither says."""
    return git_state()["commit"] or "unknown"


def evaluate_grid(
    model: nn.Module,
    layout: ModelLayout,
    batches: list[DevBatch],
    variants: dict[str, torch.Tensor],
    *,
    layer_specs: Sequence[str],
    grid: dict[str, list[float]],
    n: int,
    edits: dict[str, VariantEdit] | None = None,
    device: torch.device = CPU,
    on_result=None,
) -> tuple[dict, list[dict], float]:
    """Baseline and every (variant, layer set, gain) configuration; returns the baseline record, the results and
    the largest |logit| difference between the cached-prefix path and a full steered pass (first configuration).
    ``grid`` maps a variant's :func:`grid_key` to its gains; ``edits`` says how the avenue variants edit
    (:class:`VariantEdit`; plain ``k + g k P`` otherwise); ``on_result(base, results, check)`` is called after each
    configuration, so partial results are saved."""
    num_layers = layout.num_layers
    selections = {spec: parse_layers(spec, num_layers) for spec in layer_specs}
    starts = sorted({min(ids) for ids in selections.values()})
    baseline_won = [False] * n
    cache: list[dict[int, torch.Tensor]] = []
    for batch in batches:
        logits, cached = baseline_pass(model, batch, starts)
        cache.append(cached)
        for row, w in zip(batch.rows, wins(logits, batch)[0], strict=True):
            baseline_won[row] = w
    base = {"efficacy": sum(baseline_won) / n, "won": "".join("1" if w else "0" for w in baseline_won)}
    log.info("baseline dev efficacy %.3f", base["efficacy"])
    results: list[dict] = []
    check_diff = float("nan")
    layer_ids_all = list(range(num_layers))
    for name, projector in variants.items():
        edit = (edits or {}).get(name, VariantEdit())
        bank = ProjectionBank(
            layers=layer_ids_all, pos=projector, neg=edit.negative, metadata={"num_layers": num_layers}
        )
        phi_projector = projector.to(device=device, dtype=torch.float64) if edit.phi is not None else None
        for spec, layer_ids in selections.items():
            for gain in grid[grid_key(name)]:
                began = time.perf_counter()
                gain_neg = edit.neg_ratio * gain if edit.negative is not None else None
                fused = FusedGains.build(bank, gain_pos=gain, gain_neg=gain_neg, device=device)
                setup = SteeringSetup(bank, fused, gain, gain_neg, edit.phi, phi_projector)
                start = min(layer_ids)
                won, margins, acc = [False] * n, [0.0] * n, [0.0, 0]
                for b, batch in enumerate(batches):
                    cached = cache[b][start] if start > 0 else None
                    logits = steered_logits(
                        model, layout, batch, setup, layer_ids=layer_ids, start=start, cached=cached, acc=acc
                    )
                    if math.isnan(check_diff) and cached is not None:
                        full = steered_logits(
                            model, layout, batch, setup, layer_ids=layer_ids, start=None, cached=None, acc=[0.0, 0]
                        )
                        check_diff = float((full - logits).abs().max())
                        log.info("cached-prefix check: max |logit difference| %.2e", check_diff)
                    for row, w, m in zip(batch.rows, *wins(logits, batch), strict=True):
                        won[row], margins[row] = w, m
                wins_count = sum(won)
                low, high = wilson(wins_count, n)
                results.append(
                    {
                        "variant": name,
                        "layers": spec,
                        "gain": gain,
                        **({"gain_neg": gain_neg} if gain_neg is not None else {}),
                        "efficacy": wins_count / n,
                        "wilson95": [low, high],
                        "magnitude": sum(margins) / n,
                        "edit_norm": acc[0] / acc[1],
                        "won": "".join("1" if w else "0" for w in won),
                    }
                )
                if on_result is not None:
                    on_result(base, results, check_diff)
                log.info(
                    "%-16s %-7s g=%-5g efficacy %.3f edit norm %.3f (%.0f s)",
                    name,
                    spec,
                    gain,
                    wins_count / n,
                    acc[0] / acc[1],
                    time.perf_counter() - began,
                )
    return base, results, check_diff


def summarise(results: list[dict], seeds: Sequence[int]) -> dict:
    """Best dev setting per variant (random: per seed, and the seeds' mean at each setting)."""
    best = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        top = max((r for r in results if r["variant"] == variant), key=lambda r: r["efficacy"])
        best[variant] = {k: v for k, v in top.items() if k != "won"}
    random_names = [f"random_s{s}" for s in seeds]
    settings = {(r["layers"], r["gain"]) for r in results if r["variant"] in random_names}
    mean_random = []
    for layers, gain in sorted(settings):
        runs = [r for r in results if r["variant"] in random_names and (r["layers"], r["gain"]) == (layers, gain)]
        effs = [r["efficacy"] for r in runs]
        mean_random.append(
            {
                "layers": layers,
                "gain": gain,
                "efficacy_mean": sum(effs) / len(effs),
                "efficacy_min": min(effs),
                "efficacy_max": max(effs),
                "edit_norm_mean": sum(r["edit_norm"] for r in runs) / len(runs),
            }
        )
    return {"best_per_variant": best, "random_mean_per_setting": mean_random}


def grid_key(name: str) -> str:
    """The --grid entry that gives a variant its gains: ``random`` for every seed, ``seka_neg`` for every g-/g+
    ratio, the variant's own name otherwise."""
    if name.startswith("random_s"):
        return "random"
    if name.startswith("seka_neg_r"):
        return "seka_neg"
    return name


def parse_grid(items: Sequence[str]) -> dict[str, list[float]]:
    """``["seka=8,16", ...]`` -> ``{"seka": [8.0, 16.0], ...}``."""
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        try:
            grid[name] = [float(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--grid item {item!r} is not VARIANT=G1,G2,...") from None
        if not sep or not name:
            raise ValueError(f"--grid item {item!r} is not VARIANT=G1,G2,...")
    return grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m", help="model id (embedded:* or hub id)")
    parser.add_argument("--counterfact", required=True, help="CounterFact folder (EasyEdit or ROME layout)")
    parser.add_argument("--pairs", default="data/synthetic_qa.jsonl", help="synthetic QA pairs for the statistics")
    parser.add_argument("--num-pairs", type=int, default=300, help="QA pairs used (two triplets each)")
    parser.add_argument("--top-pct", type=float, default=0.95, help="spectrum share kept by the learned P+")
    parser.add_argument("--layers", nargs="+", default=["last15"], help="layer sets to steer")
    parser.add_argument(
        "--grid",
        nargs="+",
        default=None,
        help="VARIANT=G1,G2,... gains per variant (random = every seed, seka_neg = every --neg-ratios); variants "
        "not listed are not evaluated (default: the study's grid plus AVENUE_GRID for the avenues asked for)",
    )
    parser.add_argument(
        "--phi", nargs="+", default=[], choices=sorted(PHI_NAMES), help="avenue (a): SEKA on φ(keys), edit in φ-space"
    )
    parser.add_argument(
        "--neg-ratios",
        type=float,
        nargs="+",
        default=[],
        help="avenue (b): SEKA with P- at g- = RATIO x g+ (SPEC §4: k + (g+ k P+ + g- k P-) / 2), one variant each",
    )
    parser.add_argument(
        "--head-gains", action="store_true", help="avenue (c): per-head gains from the spectra (spectral_head_weights)"
    )
    parser.add_argument("--chat", action="store_true", help="avenue (d): P+ from chat-template building texts")
    parser.add_argument(
        "--more-pairs",
        type=int,
        default=None,
        help="avenue (e): seka/seka_minus_mean from the first N QA pairs (0 = every pair of --pairs)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs (float32)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random-projector seeds")
    parser.add_argument("--add-special-tokens", action="store_true", help="add BOS to prompts (Gemma-3)")
    parser.add_argument("--batch-size", type=int, default=50, help="prompts per forward pass")
    parser.add_argument("--capture-batch-size", type=int, default=32, help="triplets per capture pass")
    parser.add_argument("--example-subset", default=DEV_SLICE, help="CounterFact records (dev only)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; run on a GPU machine or pass --device cpu")
    if args.more_pairs is not None and 0 < args.more_pairs <= args.num_pairs:
        raise ValueError(
            f"--more-pairs {args.more_pairs} is not above --num-pairs {args.num_pairs}; pass more, or 0 for all"
        )
    if args.grid is None:
        asked = {"phi": args.phi, "neg_ratios": args.neg_ratios, "head_gains": args.head_gains, "chat": args.chat}
        asked["more_pairs"] = args.more_pairs is not None
        args.grid = [*DEFAULT_GRID, *(item for flag, items in AVENUE_GRID.items() if asked[flag] for item in items)]
    lo, _, hi = args.example_subset.partition(":")
    if int(hi) > 4500 and int(lo) < 10000 and not (int(lo) >= 4500 and int(hi) <= 5000):
        raise ValueError(
            f"--example-subset {args.example_subset} overlaps the test split 5000:10000; use dev 4500:5000"
        )
    return args


def extra_variants(
    model: nn.Module, tokenizer, layout: ModelLayout, args: argparse.Namespace, keys: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Avenues (d) and (e), which need their own building keys: P+ from chat-template texts of the same pairs, and
    from more pairs (the study's keys plus those of the pairs after the first --num-pairs)."""
    out: dict[str, torch.Tensor] = {}
    device = torch.device(args.device)
    if args.chat:
        pairs = read_pairs(args.pairs, max_samples=args.num_pairs)
        chat = capture_triplet_keys(
            model, tokenizer, layout, pairs, batch_size=args.capture_batch_size, device=device, chat=True
        )
        log.info("chat texts: %d answer-token rows per text", chat["neutral"].shape[1])
        out.update(learned_variants(chat, top_pct=args.top_pct, suffix="chat"))
    if args.more_pairs is not None:
        pairs = read_pairs(args.pairs, max_samples=args.more_pairs or None)[args.num_pairs :]
        extra = capture_triplet_keys(model, tokenizer, layout, pairs, batch_size=args.capture_batch_size, device=device)
        more = {kind: torch.cat([keys[kind], extra[kind]], dim=1) for kind in keys}
        del extra
        log.info("%d pairs: %d answer-token rows per text", args.num_pairs + len(pairs), more["neutral"].shape[1])
        out.update(learned_variants(more, top_pct=args.top_pct, suffix="more"))
    return out


def select_variants(variants: dict[str, torch.Tensor], grid: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    """The variants the grid gives gains, in the grid's order (a cut-short run has the comparisons that matter
    first); an unknown grid entry or a grid without key scaling is an error."""
    known = {grid_key(k) for k in variants}
    unknown = sorted(set(grid) - known)
    if unknown or "key_scaling" not in grid:
        raise ValueError(
            f"--grid: unknown variants {unknown} or no key_scaling; choose from {sorted(known)} (avenue variants "
            "need their flag: --phi, --neg-ratios, --head-gains, --chat, --more-pairs)"
        )
    order = list(grid)
    kept = sorted((k for k in variants if grid_key(k) in grid), key=lambda k: order.index(grid_key(k)))
    return {k: variants[k] for k in kept}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    for key, value in vars(args).items():
        log.info("setting %-20s %s", key, value)
    began = time.perf_counter()
    device = torch.device(args.device)
    model, tokenizer = load_model(args.model, dtype="float32")
    model.to(device)
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--chat needs a tokenizer with a chat template and {args.model}'s has none; drop --chat")
    layout = resolve_layout(model)
    pairs = read_pairs(args.pairs, max_samples=args.num_pairs)
    keys = capture_triplet_keys(model, tokenizer, layout, pairs, batch_size=args.capture_batch_size, device=device)
    log.info("captured %d answer-token rows per text (%.0f s)", keys["neutral"].shape[1], time.perf_counter() - began)
    grid = parse_grid(args.grid)
    variants = variant_projectors(keys, top_pct=args.top_pct, seeds=args.seeds)
    head_gain_layers = parse_layers(args.layers[0], layout.num_layers) if args.head_gains else None
    avenues = avenue_variants(
        keys, top_pct=args.top_pct, phis=args.phi, neg_ratios=args.neg_ratios, head_gain_layers=head_gain_layers
    )
    variants.update(avenues.projectors)
    variants.update(extra_variants(model, tokenizer, layout, args, keys))
    summary = projector_summary(variants, keys)
    del keys
    variants = select_variants(variants, grid)
    batches, case_ids = dev_batches(
        args.counterfact,
        tokenizer,
        example_subset=args.example_subset,
        add_special_tokens=args.add_special_tokens,
        batch_size=args.batch_size,
        device=device,
    )

    def save(base: dict, results: list[dict], check_diff: float, *, final: bool = False) -> None:
        results = [dict(r) for r in results]
        compare_with_key_scaling(results)
        baseline_won = [c == "1" for c in base["won"]]
        write_json(
            args.out,
            {
                "complete": final,
                "question": "do SEKA's learned key projections beat plain key scaling (P = I) on CounterFact dev?",
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "commit": git_commit(),
                "model": args.model,
                "settings": {k: v for k, v in vars(args).items() if k != "out"},
                "data": {
                    "counterfact": args.counterfact,
                    "example_subset": args.example_subset,
                    "prompts": len(case_ids),
                    "metric": "efficacy: first-token P(target_new) > P(target_true), attribute highlighted",
                },
                "case_ids": case_ids,
                "baseline": {**base, "wilson95": list(wilson(sum(baseline_won), len(baseline_won)))},
                "projectors": summary,
                "avenues": avenues.notes,
                "cached_prefix_max_abs_logit_diff": check_diff,
                "summary": summarise(results, args.seeds),
                "split_half": split_half_selection(results, case_ids),
                "results": results,
                "wall_time_s": time.perf_counter() - began,
            },
        )

    base, results, check_diff = evaluate_grid(
        model,
        layout,
        batches,
        variants,
        layer_specs=args.layers,
        grid=grid,
        n=len(case_ids),
        edits=avenues.edits,
        device=device,
        on_result=save,
    )
    save(base, results, check_diff, final=True)
    log.info("wrote %s (%.0f s)", args.out, time.perf_counter() - began)


if __name__ == "__main__":
    main()
