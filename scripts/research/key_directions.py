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

    PYTHONPATH=src python scripts/research/key_directions.py --model embedded:smollm2-135m \
        --counterfact ../shared/data/counterfact --out docs/research/key_directions_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import logging
import math
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from seka_lightning.bank import ProjectionBank
from seka_lightning.baselines.random_projection import projector_ranks, random_projectors
from seka_lightning.benchmarks.counterfact import load_counterfact
from seka_lightning.capture import collect_triplet_keys
from seka_lightning.data.triplets import iter_triplets, read_pairs
from seka_lightning.families import ModelLayout, keys_view, resolve_layout
from seka_lightning.files import write_json
from seka_lightning.highlight import encode_spans
from seka_lightning.layers import parse_layers
from seka_lightning.methods import position_ids_for
from seka_lightning.metrics import first_token_logprob, target_first_token_ids
from seka_lightning.models import load_model
from seka_lightning.projections import projections_from_sums
from seka_lightning.significance import mcnemar_exact as significance_mcnemar
from seka_lightning.significance import wilson_interval
from seka_lightning.stats import KeyStatistics
from seka_lightning.steering import FusedGains, KeySteerer

log = logging.getLogger("key_directions")

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


# ----------------------------------------------------------------------------------------------------- statistics


def capture_triplet_keys(
    model: nn.Module, tokenizer, layout: ModelLayout, pairs: Sequence[dict], *, batch_size: int
) -> dict[str, torch.Tensor]:
    """Answer-token keys of every layer for the triplets of ``pairs``: ``neutral``/``positive``/``negative``, each
    ``[L, M, H, d]`` float64 on the CPU (rows aligned across the three texts)."""
    layer_ids = list(range(layout.num_layers))
    triplets = list(iter_triplets(pairs))
    parts: dict[str, list[torch.Tensor]] = {"neutral": [], "positive": [], "negative": []}
    for start in range(0, len(triplets), batch_size):
        got = collect_triplet_keys(
            model, tokenizer, layout, layer_ids, triplets[start : start + batch_size], device=torch.device("cpu")
        )
        if got is None:
            continue
        for name in parts:
            parts[name].append(getattr(got, name).to(torch.float64))
    return {name: torch.cat(chunks, dim=1) for name, chunks in parts.items()}


def cross_projector(h: torch.Tensor, hp: torch.Tensor, hn: torch.Tensor, *, top_pct: float) -> torch.Tensor:
    """SPEC §3's P+ from rows ``h, h+, h-`` ``[L, M, H, d]``: top singular directions of ``Σ hᵀh+ / N``
    (the product's :class:`KeyStatistics` and :func:`projections_from_sums`, min_diff 0: every head kept)."""
    stats = KeyStatistics(h.shape[0], h.shape[2], h.shape[3])
    stats.update(h, hp, hn)
    return projections_from_sums(stats.compute(), top_pct=top_pct, min_diff=0.0).pos


def unit_mean_key(keys: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unit mean of the neutral and positive answer-token keys per layer and head, ``[L, H, d]``."""
    mean = torch.cat([keys["neutral"], keys["positive"]], dim=1).mean(1)
    return mean / mean.norm(dim=-1, keepdim=True)


def variant_projectors(
    keys: dict[str, torch.Tensor], *, top_pct: float, seeds: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Every P+ variant ``[L, H, d, d]`` (float32) compared here; see the module docstring."""
    h, hp, hn = keys["neutral"], keys["positive"], keys["negative"]
    seka = cross_projector(h, hp, hn, top_pct=top_pct)
    centred = cross_projector(h - h.mean(1, keepdim=True), hp - hp.mean(1, keepdim=True), hn, top_pct=top_pct)
    m = unit_mean_key(keys).to(torch.float32)
    d = seka.shape[-1]
    without_mean = torch.eye(d) - m[..., :, None] * m[..., None, :]  # [L, H, d, d]
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
    path: str, tokenizer, *, example_subset: str, add_special_tokens: bool, batch_size: int
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


@torch.no_grad()
def steered_logits(
    model: nn.Module,
    layout: ModelLayout,
    batch: DevBatch,
    bank: ProjectionBank,
    fused: FusedGains,
    *,
    gain: float,
    layer_ids: list[int],
    start: int | None,
    cached: torch.Tensor | None,
    acc: list[float],
) -> torch.Tensor:
    """Logits with the product's SEKA hooks on ``layer_ids``; from ``cached`` hidden states entering layer ``start``
    when given (layers below ``start`` are not steered, so their output is the baseline's)."""
    highlight = batch.enc["highlight_mask"]
    rows = highlight.reshape(-1).nonzero().squeeze(1)
    handles = [
        layout.layers[layer].key_module.register_forward_hook(
            make_edit_norm_hook(layout.layers[layer], layout, fused.gains[layer], rows, acc)
        )
        for layer in layer_ids
    ]
    steerer = KeySteerer.attach(
        model, bank, highlight, gain_pos=gain, layers=",".join(map(str, layer_ids)), fused=fused, layout=layout
    )
    try:
        if cached is None:
            return forward_logits(model, batch.enc, input_ids=batch.enc["input_ids"])
        with layers_skipped(decoder_layers(model), start):
            return forward_logits(model, batch.enc, embeds=cached)
    finally:
        steerer.remove()
        for handle in handles:
            handle.remove()


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
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def evaluate_grid(
    model: nn.Module,
    layout: ModelLayout,
    batches: list[DevBatch],
    variants: dict[str, torch.Tensor],
    *,
    layer_specs: Sequence[str],
    grid: dict[str, list[float]],
    n: int,
    on_result=None,
) -> tuple[dict, list[dict], float]:
    """Baseline and every (variant, layer set, gain) configuration; returns the baseline record, the results and
    the largest |logit| difference between the cached-prefix path and a full steered pass (first configuration).
    ``grid`` maps a variant (``random`` for every seed) to its gains; ``on_result(base, results, check)`` is called
    after each configuration, so partial results are saved."""
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
        bank = ProjectionBank(layers=layer_ids_all, pos=projector, metadata={"num_layers": num_layers})
        for spec, layer_ids in selections.items():
            for gain in grid["random" if name.startswith("random_s") else name]:
                began = time.perf_counter()
                fused = FusedGains.build(bank, gain_pos=gain, gain_neg=None)
                start = min(layer_ids)
                won, margins, acc = [False] * n, [0.0] * n, [0.0, 0]
                for b, batch in enumerate(batches):
                    cached = cache[b][start] if start > 0 else None
                    logits = steered_logits(
                        model,
                        layout,
                        batch,
                        bank,
                        fused,
                        gain=gain,
                        layer_ids=layer_ids,
                        start=start,
                        cached=cached,
                        acc=acc,
                    )
                    if math.isnan(check_diff) and cached is not None:
                        full = steered_logits(
                            model,
                            layout,
                            batch,
                            bank,
                            fused,
                            gain=gain,
                            layer_ids=layer_ids,
                            start=None,
                            cached=None,
                            acc=[0.0, 0],
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
        default=list(DEFAULT_GRID),
        help="VARIANT=G1,G2,... gains per variant (random = every seed); variants not listed are not evaluated",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random-projector seeds")
    parser.add_argument("--add-special-tokens", action="store_true", help="add BOS to prompts (Gemma-3)")
    parser.add_argument("--batch-size", type=int, default=50, help="prompts per forward pass")
    parser.add_argument("--capture-batch-size", type=int, default=32, help="triplets per capture pass")
    parser.add_argument("--example-subset", default=DEV_SLICE, help="CounterFact records (dev only)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    lo, _, hi = args.example_subset.partition(":")
    if int(hi) > 4500 and int(lo) < 10000 and not (int(lo) >= 4500 and int(hi) <= 5000):
        raise ValueError(
            f"--example-subset {args.example_subset} overlaps the test split 5000:10000; use dev 4500:5000"
        )
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    began = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype="float32")
    layout = resolve_layout(model)
    pairs = read_pairs(args.pairs, max_samples=args.num_pairs)
    keys = capture_triplet_keys(model, tokenizer, layout, pairs, batch_size=args.capture_batch_size)
    log.info("captured %d answer-token rows per text (%.0f s)", keys["neutral"].shape[1], time.perf_counter() - began)
    variants = variant_projectors(keys, top_pct=args.top_pct, seeds=args.seeds)
    summary = projector_summary(variants, keys)
    del keys
    grid = parse_grid(args.grid)
    known = {"random" if k.startswith("random_s") else k for k in variants}
    unknown = sorted(set(grid) - known)
    if unknown or "key_scaling" not in grid:
        raise ValueError(f"--grid: unknown variants {unknown} or no key_scaling; choose from {sorted(known)}")
    order = list(grid)  # evaluated in the grid's order, so a cut-short run has the comparisons that matter first
    kept = [k for k in variants if ("random" if k.startswith("random_s") else k) in grid]
    kept.sort(key=lambda k: order.index("random" if k.startswith("random_s") else k))
    variants = {k: variants[k] for k in kept}
    batches, case_ids = dev_batches(
        args.counterfact,
        tokenizer,
        example_subset=args.example_subset,
        add_special_tokens=args.add_special_tokens,
        batch_size=args.batch_size,
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
                "cached_prefix_max_abs_logit_diff": check_diff,
                "summary": summarise(results, args.seeds),
                "split_half": split_half_selection(results, case_ids),
                "results": results,
                "wall_time_s": time.perf_counter() - began,
            },
        )

    base, results, check_diff = evaluate_grid(
        model, layout, batches, variants, layer_specs=args.layers, grid=grid, n=len(case_ids), on_result=save
    )
    save(base, results, check_diff, final=True)
    log.info("wrote %s (%.0f s)", args.out, time.perf_counter() - began)


if __name__ == "__main__":
    main()
