"""Generation speed and memory (BENCHMARKS.md "Speed and memory"): every method on the same long prompts.

A Qwen3-shaped model with random weights (speed depends on shapes, not weights) generates a fixed number of greedy
tokens from multi-document prompts with highlighted documents. Per method and batch size: latency per sample (median
of repeats, warm-up excluded, device-synchronised), peak allocated memory, and both as ratios to no steering measured
in the same run, with the repeats of all methods interleaved so drift hits every method alike. A "fast path" (static
KV cache, compiled decode step) is measured for the methods that allow it, and every latency is set against the
floor the hardware allows: weight and KV-cache bytes over measured copy bandwidth, FLOPs over measured matmul rate.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CompileConfig, PreTrainedTokenizerBase

from bench.report import (
    allocated_memory,
    environment,
    gib,
    markdown_table,
    paired_ratio,
    peak_memory,
    plain,
    ratio,
    reset_peak_memory,
    seconds,
    summarize,
    synchronize,
    times,
)
from bench.shapes import SPECIAL_TOKENS, ModelShape, get_shape, offline_tokenizer, random_model
from seka_lightning.bank import ProjectionBank
from seka_lightning.fast_decode import StaticGreedyDecoder, check_prompt_pass
from seka_lightning.files import write_json, write_text
from seka_lightning.methods import Encoded, HighlightMethod, SekaMethod

log = logging.getLogger(__name__)

EAGER, FAST, LOOP = "eager", "static_compile", "static_loop"
PATHS = (EAGER, FAST, LOOP)
COMPILED = (FAST, LOOP)


@dataclass
class GenerationSettings:
    """What the generation benchmark runs; every field is recorded in the result file."""

    shape: str = "qwen3-8b"
    batch_sizes: list[int] = field(default_factory=lambda: [1, 10])
    new_tokens: int = 60
    prompt_tokens: list[int] = field(default_factory=lambda: [4096])
    max_batch_tokens: int | None = None
    documents: int = 30
    highlighted: int = 20
    methods: list[str] = field(default_factory=lambda: ["none", "seka", "adaseka", "pasta", "spa"])
    repeats: int = 5
    warmup: int = 1
    paths: list[str] = field(default_factory=lambda: list(PATHS))
    fast_methods: list[str] = field(default_factory=lambda: ["none", "seka"])
    fast_repeats: int = 3
    fast_warmup: int = 2
    compile_backend: str = "inductor"
    compile_mode: str = "reduce-overhead"
    fuse_projections: bool = False
    split_kv: bool = False
    prompt_pass: str = "batch"
    dtype: str = "bfloat16"
    device: str = "auto"
    seed: int = 0
    bank_rank: int | None = None
    pasta_heads: int = 16
    spa_strength: float = 20.0
    copy_bytes: int | None = None
    matmul_size: int | None = None

    def __post_init__(self) -> None:
        shape = get_shape(self.shape)
        for name in ("new_tokens", "documents", "highlighted", "repeats", "pasta_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "fast_warmup", "fast_repeats"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be a non-empty list of sizes >= 1, got {self.batch_sizes}")
        if self.highlighted > self.documents:
            raise ValueError(f"highlighted={self.highlighted} exceeds documents={self.documents}; highlight fewer")
        self._check_prompt_tokens(shape)
        check_prompt_pass(self.prompt_pass)
        unknown = sorted(set(self.methods) - set(METHOD_FACTORIES))
        if unknown:
            raise ValueError(f"methods {unknown} are unknown; choose from {sorted(METHOD_FACTORIES)}")
        if "none" not in self.methods:
            raise ValueError("methods must include 'none': every ratio is taken against it")
        if self.fast_methods and "none" not in self.fast_methods:
            raise ValueError(
                "fast_methods must include 'none' (the fast path's ratios are taken against it), or be empty"
            )
        outside = sorted(set(self.fast_methods) - set(self.methods))
        if outside:
            raise ValueError(f"fast_methods {outside} are not in methods {self.methods}; add them to methods")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if not self.paths or not set(self.paths) <= set(PATHS):
            raise ValueError(f"paths must be a non-empty subset of {PATHS}, got {self.paths}")
        if not self.blocks():
            raise ValueError(
                f"max_batch_tokens={self.max_batch_tokens} leaves no (prompt tokens, batch size) pair to time of "
                f"{self.prompt_tokens} x {self.batch_sizes}; raise it to at least "
                f"{min(self.prompt_tokens) * min(self.batch_sizes)}"
            )

    def _check_prompt_tokens(self, shape: ModelShape) -> None:
        """Each prompt length fits the documents and, with the new tokens, the shape's positions (a longer run
        would time a model past the context it was trained for)."""
        if not isinstance(self.prompt_tokens, list) or not self.prompt_tokens:
            raise ValueError(f"prompt_tokens must be a non-empty list of lengths, got {self.prompt_tokens!r}")
        for tokens in self.prompt_tokens:
            if tokens < 4 * self.documents:
                raise ValueError(
                    f"prompt_tokens={tokens} is too short for {self.documents} documents; "
                    f"use at least {4 * self.documents} tokens or fewer documents"
                )
            if tokens + self.new_tokens > shape.max_positions:
                raise ValueError(
                    f"prompt_tokens={tokens} + new_tokens={self.new_tokens} exceeds the {shape.max_positions} "
                    f"positions of shape {shape.name!r}; use at most {shape.max_positions - self.new_tokens} "
                    "prompt tokens"
                )

    def blocks(self) -> list[tuple[int, int]]:
        """The (prompt tokens, batch size) pairs to time, in order: every pair whose batch x prompt tokens is at most
        ``max_batch_tokens`` (all pairs when it is None), so one run can time batch 10 at 4k and batch 1 at 32k."""
        return [
            (tokens, batch)
            for tokens in self.prompt_tokens
            for batch in self.batch_sizes
            if self.max_batch_tokens is None or tokens * batch <= self.max_batch_tokens
        ]


@dataclass
class FactoryContext:
    """What a method factory may use: the model shape, a folder for bank files, the settings."""

    shape: ModelShape
    work_dir: Path
    settings: GenerationSettings

    @property
    def bank_rank(self) -> int:
        return self.settings.bank_rank or max(1, self.shape.head_dim // 4)


def random_bank(shape: ModelShape, *, rank: int, seed: int, positive_only: bool = False) -> ProjectionBank:
    """A bank for every layer and KV head of ``shape`` with random orthonormal factors of the given rank.

    Steering cost does not depend on the values (the edit is a dense ``[d, d]`` product per head), only on shapes.
    Positive-only banks are AdaSEKA experts: U and S, projectors of the top ``rank`` directions, no negatives.
    """
    if not 0 < rank <= shape.head_dim:
        raise ValueError(f"rank must be in 1..{shape.head_dim} (the head dim), got {rank}")
    generator = torch.Generator().manual_seed(seed)
    dims = (shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.head_dim)

    def factors() -> tuple[torch.Tensor, torch.Tensor]:
        u, _ = torch.linalg.qr(torch.randn(dims, generator=generator))
        s = torch.rand(dims[:-1], generator=generator).sort(-1, descending=True).values
        return u, s

    def projector(u: torch.Tensor, columns: slice) -> torch.Tensor:
        kept = u[..., columns]
        return kept @ kept.transpose(-1, -2)

    u_pos, s_pos = factors()
    metadata = {"model_id": f"random:{shape.name}", "num_layers": shape.num_layers, "positive_only": positive_only}
    if positive_only:
        return ProjectionBank(
            layers=list(range(shape.num_layers)),
            pos=projector(u_pos, slice(0, rank)),
            u_pos=u_pos,
            s_pos=s_pos,
            metadata=metadata,
        )
    u_neg, s_neg = factors()
    return ProjectionBank(
        layers=list(range(shape.num_layers)),
        pos=projector(u_pos, slice(0, rank)),
        neg=projector(u_neg, slice(rank, None)),  # P- is the complement of the top directions (SPEC §3)
        u_pos=u_pos,
        s_pos=s_pos,
        u_neg=u_neg,
        s_neg=s_neg,
        metadata=metadata,
    )


def pasta_heads(shape: ModelShape, *, count: int, seed: int) -> dict[int, list[int]]:
    """``count`` distinct random (layer, query head) pairs, as a profiled PASTA head set would be."""
    total = shape.num_layers * shape.num_heads
    if count > total:
        raise ValueError(f"pasta_heads={count} exceeds the model's {total} (layer, head) pairs")
    generator = torch.Generator().manual_seed(seed)
    heads: dict[int, list[int]] = {}
    for flat in sorted(torch.randperm(total, generator=generator)[:count].tolist()):
        heads.setdefault(flat // shape.num_heads, []).append(flat % shape.num_heads)
    return heads


def _none(ctx: FactoryContext) -> HighlightMethod:
    return HighlightMethod()


def _seka(ctx: FactoryContext) -> HighlightMethod:
    bank = random_bank(ctx.shape, rank=ctx.bank_rank, seed=ctx.settings.seed)
    path = bank.save(ctx.work_dir / "seka.safetensors")
    return SekaMethod(str(path), gain_pos=1.0, gain_neg=0.5)


def _adaseka(ctx: FactoryContext) -> HighlightMethod:
    from seka_lightning.adaseka.method import AdaSekaMethod

    experts = {
        f"expert{i}": str(
            random_bank(ctx.shape, rank=ctx.bank_rank, seed=ctx.settings.seed + 1 + i, positive_only=True).save(
                ctx.work_dir / f"expert{i}.safetensors"
            )
        )
        for i in range(4)
    }
    return AdaSekaMethod(experts)


def _pasta(ctx: FactoryContext) -> HighlightMethod:
    from seka_lightning.baselines.pasta import PastaMethod

    count = min(ctx.settings.pasta_heads, ctx.shape.num_layers * ctx.shape.num_heads)
    return PastaMethod(pasta_heads(ctx.shape, count=count, seed=ctx.settings.seed), alpha=0.01)


def _spa(ctx: FactoryContext) -> HighlightMethod:
    from seka_lightning.baselines.spa import SpaMethod

    return SpaMethod(strength=ctx.settings.spa_strength)


# One tiny factory per name: when a method's constructor changes, its factory is the one line to fix.
METHOD_FACTORIES: dict[str, Callable[[FactoryContext], HighlightMethod]] = {
    "none": _none,
    "seka": _seka,
    "adaseka": _adaseka,
    "pasta": _pasta,
    "spa": _spa,
}


def make_method(name: str, ctx: FactoryContext) -> HighlightMethod | str:
    """The method ``name``, or the reason it cannot run here (not importable, changed signature, not a method)."""
    try:
        method = METHOD_FACTORIES[name](ctx)
    except (ImportError, TypeError, ValueError, AttributeError) as err:
        log.warning(
            "skipping method %r: %s: %s (fix its factory in bench.generation)",
            name,
            type(err).__name__,
            err,
        )
        return f"{type(err).__name__}: {err}"
    if not isinstance(method, HighlightMethod):
        log.warning("skipping method %r: its factory returned %s, not a HighlightMethod", name, type(method).__name__)
        return f"not a HighlightMethod: {type(method).__name__}"
    return method


def random_prompts(
    batch: int,
    prompt_tokens: int,
    *,
    documents: int,
    highlighted: int,
    vocab_size: int,
    seed: int,
    pad_token_id: int = 0,
    device: torch.device | str = "cpu",
) -> Encoded:
    """Left-padded multi-document prompts of random token ids with ``highlighted`` whole documents marked.

    Row 0 has ``prompt_tokens`` tokens, the others up to 5% fewer (so padding is exercised). Each row is a short
    instruction, ``documents`` equal documents (each ending in a separator token) and a short question; the
    highlighted documents are the middle ones (documents 5..24 of 30, as in the lost-in-the-middle protocol), one
    span each.
    """
    generator = torch.Generator().manual_seed(seed)
    low = len(SPECIAL_TOKENS)
    input_ids = torch.full((batch, prompt_tokens), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, prompt_tokens), dtype=torch.long)
    highlight_mask = torch.zeros((batch, prompt_tokens), dtype=torch.bool)
    first = (documents - highlighted) // 2
    for row in range(batch):
        shorter = 0 if row == 0 else int(torch.randint(0, prompt_tokens // 20 + 1, (1,), generator=generator))
        length = prompt_tokens - shorter
        start = prompt_tokens - length
        input_ids[row, start:] = torch.randint(low, vocab_size, (length,), generator=generator)
        attention_mask[row, start:] = 1
        frame = max(1, length // (4 * documents))  # instruction before and question after the documents
        doc_len = (length - 2 * frame) // documents
        for doc in range(first, first + highlighted):
            begin = start + frame + doc * doc_len
            highlight_mask[row, begin : begin + doc_len - 1] = True  # the last token stands for the separator
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "highlight_mask": highlight_mask.to(device),
    }


@dataclass(frozen=True)
class Ceilings:
    """Measured on the benchmark's device in the same run: copy bandwidth (bytes read + written per second) and
    dense matmul rate (FLOP per second) in the model dtype, on random data."""

    copy_bytes_per_s: float
    matmul_flops_per_s: float
    copy_bytes: int
    matmul_size: int


def _time_op(fn: Callable[[], object], device: torch.device, *, inner: int, repeats: int, warmup: int) -> float:
    """Median seconds of one call of ``fn``, from ``repeats`` timings of ``inner`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) / inner)
    return summarize(samples)["median"]


def _copy_seconds(device: torch.device, nbytes: int, repeats: int) -> tuple[float, int]:
    """Median time of a device-to-device copy of ``nbytes`` and the bytes it moves (read + written)."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return _time_op(partial(dst.copy_, src), device, inner=5, repeats=repeats, warmup=3), 2 * src.nbytes


def _matmul_seconds(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return _time_op(partial(torch.matmul, a, b), device, inner=5, repeats=repeats, warmup=3)


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, *, size: int, repeats: int = 10) -> float:
    """The dense matmul rate of the device in ``dtype``: ``2 size³`` FLOPs over the median time of a square matmul
    on random data (the peak that MFU is measured against)."""
    return 2 * size**3 / _matmul_seconds(device, dtype, size, repeats)


def measure_ceilings(
    device: torch.device, dtype: torch.dtype, *, copy_bytes: int, matmul_size: int, repeats: int = 10
) -> Ceilings:
    """A large device-to-device copy and a large square matmul, both on random data (zeros can run faster)."""
    copy_s, moved = _copy_seconds(device, copy_bytes, repeats)
    rate = matmul_flops_per_s(device, dtype, size=matmul_size, repeats=repeats)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Ceilings(
        copy_bytes_per_s=moved / copy_s,
        matmul_flops_per_s=rate,
        copy_bytes=moved,
        matmul_size=matmul_size,
    )


@dataclass(frozen=True)
class ModelCost:
    """Per-token work of a decoder: weights applied to every token, the LM head, bytes read per forward pass."""

    matmul_params: int  # every 2-D weight except the embedding table and the LM head
    head_params: int
    weight_bytes: int  # all weights but the embedding table (a forward pass gathers only its rows)
    kv_bytes_per_token: int  # K and V of one token, all layers
    num_layers: int
    num_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: nn.Module, shape: ModelShape) -> ModelCost:
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        matmul = weight_bytes = 0
        for param in model.parameters():
            if param is embed:
                continue
            weight_bytes += param.numel() * param.element_size()
            if param.ndim == 2 and param is not head:
                matmul += param.numel()
        return cls(
            matmul_params=matmul,
            head_params=head.numel(),
            weight_bytes=weight_bytes,
            kv_bytes_per_token=2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * embed.element_size(),
            num_layers=shape.num_layers,
            num_heads=shape.num_heads,
            head_dim=shape.head_dim,
        )


def generation_floor(
    cost: ModelCost, ceilings: Ceilings, *, batch: int, prompt_tokens: int, new_tokens: int
) -> dict[str, float]:
    """The least time one ``generate`` call can take: each pass costs max(bytes / bandwidth, FLOPs / rate).

    Prefill: ``2 B T (matmul params) + 2 B (head params)`` (logits of the last position only) plus causal
    attention ``2 B L H d T²``; it reads the weights once. Each of the ``new_tokens - 1`` decode steps at context
    ``c`` reads the weights and ``B c`` cached tokens and does ``2 B (all params) + 4 B L H d c`` FLOPs.
    """
    bw, rate = ceilings.copy_bytes_per_s, ceilings.matmul_flops_per_s
    attention = cost.num_layers * cost.num_heads * cost.head_dim
    prefill_flops = (
        2 * batch * prompt_tokens * cost.matmul_params
        + 2 * batch * cost.head_params
        + 2 * batch * attention * prompt_tokens**2
    )
    prefill_bytes = cost.weight_bytes + batch * prompt_tokens * cost.kv_bytes_per_token
    prefill_s = max(prefill_flops / rate, prefill_bytes / bw)
    decode_s = 0.0
    for step in range(1, new_tokens):
        context = prompt_tokens + step
        flops = 2 * batch * (cost.matmul_params + cost.head_params) + 4 * batch * attention * context
        moved = cost.weight_bytes + batch * context * cost.kv_bytes_per_token
        decode_s += max(flops / rate, moved / bw)
    total = prefill_s + decode_s
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "total_s": total,
        "per_sample_s": total / batch,
        "prefill_flops": float(prefill_flops),
        "weight_bytes": float(cost.weight_bytes),
    }


@contextmanager
def static_compiled_decoding(model: nn.Module, *, backend: str, mode: str) -> Iterator[CompileConfig]:
    """Generate with a static KV cache and a ``torch.compile``d decode step (transformers' own fast path).

    transformers compiles automatically when the cache is static; off CUDA it only does so when asked, which the
    CPU smoke test needs. Compiled graphs are dropped on entry and exit so each block compiles for its own shapes.
    """
    config = model.generation_config
    before = (config.cache_implementation, config.compile_config)
    compile_config = CompileConfig(backend=backend, mode=mode)
    compile_config._compile_all_devices = model.device.type != "cuda"
    config.cache_implementation, config.compile_config = "static", compile_config
    torch._dynamo.reset()
    try:
        yield compile_config
    finally:
        config.cache_implementation, config.compile_config = before
        torch._dynamo.reset()


class _OnDecoder(HighlightMethod):
    """A method timed through :class:`StaticGreedyDecoder` (path ``static_loop``)."""

    def __init__(self, method: HighlightMethod, decoder: StaticGreedyDecoder) -> None:
        self.method, self.decoder, self.name = method, decoder, method.name

    def generate(self, model: nn.Module, enc: Encoded, *, max_new_tokens: int, pad_token_id: int) -> torch.Tensor:
        return self.decoder.generate(self.method, enc, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)


def on_decoder(
    methods: dict[str, HighlightMethod], model: nn.Module, enc: Encoded, settings: GenerationSettings
) -> dict[str, HighlightMethod]:
    """The methods, each generating through one shared decoder sized for this block (compiled graphs reset)."""
    torch._dynamo.reset()
    decoder = StaticGreedyDecoder(
        model,
        batch_size=enc["input_ids"].shape[0],
        max_cache_len=enc["input_ids"].shape[1] + settings.new_tokens,
        backend=settings.compile_backend,
        mode=settings.compile_mode,
        fuse_projections=settings.fuse_projections,
        split_kv=settings.split_kv,
        prompt_pass=settings.prompt_pass,
    )
    return {name: _OnDecoder(method, decoder) for name, method in methods.items()}


def _compiled_graphs() -> int:
    """Graphs torch.compile has built so far in this process (a rise during timed runs means recompilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class _Samples:
    latencies: list[float] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)
    peak: int | None = None
    baseline: int | None = None
    warmup_s: float = 0.0
    compiles: int = 0
    error: str | None = None


def _generate_once(
    model: nn.Module, method: HighlightMethod, enc: Encoded, *, new_tokens: int, device: torch.device
) -> tuple[float, int | None, int | None]:
    """One timed ``generate`` call: ``(seconds, peak bytes, bytes allocated before)``."""
    attention = model.config._attn_implementation
    synchronize(device)
    before = allocated_memory(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    out = method.generate(model, enc, max_new_tokens=new_tokens, pad_token_id=0)
    synchronize(device)
    elapsed = time.perf_counter() - start
    if model.config._attn_implementation != attention:
        log.warning(
            "method %r left attention at %r; restoring %r", method.name, model.config._attn_implementation, attention
        )
        model.set_attn_implementation(attention)
    if tuple(out.shape) != (enc["input_ids"].shape[0], new_tokens):
        raise RuntimeError(f"generated shape {tuple(out.shape)}, expected {(enc['input_ids'].shape[0], new_tokens)}")
    return elapsed, peak_memory(device), before


def measure_block(
    model: nn.Module,
    methods: dict[str, HighlightMethod],
    enc: Encoded,
    *,
    new_tokens: int,
    warmup: int,
    repeats: int,
    device: torch.device,
) -> dict[str, _Samples]:
    """Warm every method up, then time ``repeats`` rounds in which each method generates once (interleaved).

    After each generation the method also runs its prompt pass alone: the same call for one new token, which is
    the prefill that generation does (the method's edit, routing and cache writes included) and no decode step.
    """
    samples = {name: _Samples() for name in methods}

    def run(name: str, tokens: int = new_tokens) -> tuple[float, int | None, int | None] | None:
        record = samples[name]
        if record.error is not None:
            return None
        try:
            return _generate_once(model, methods[name], enc, new_tokens=tokens, device=device)
        except Exception as err:  # one failing method (OOM, a bug) must not lose the others' numbers
            log.exception("method %r failed at batch %d", name, enc["input_ids"].shape[0])
            record.error = f"{type(err).__name__}: {err}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    for name in methods:
        for _ in range(warmup):
            result = run(name)
            if result is not None:
                samples[name].warmup_s += result[0]
            run(name, 1)
    for _ in range(repeats):
        for name in methods:
            graphs = _compiled_graphs()
            result = run(name)
            prefill = run(name, 1)
            samples[name].compiles += _compiled_graphs() - graphs
            if result is None:
                continue
            elapsed, peak, before = result
            record = samples[name]
            record.latencies.append(elapsed)
            if prefill is not None:
                record.prefill.append(prefill[0])
            if peak is not None:
                record.peak = max(record.peak or 0, peak)
                record.baseline = before
    return samples


def _records(
    samples: dict[str, _Samples],
    *,
    path: str,
    batch: int,
    prompt_tokens: int,
    floor: dict[str, float],
    describe: dict[str, dict],
) -> list[dict[str, Any]]:
    reference = samples.get("none")
    ref_latency = summarize(reference.latencies)["median"] / batch if reference and reference.latencies else None
    ref_peak = reference.peak if reference else None
    records = []
    for name, record in samples.items():
        row: dict[str, Any] = {
            "method": name,
            "path": path,
            "batch_size": batch,
            "prompt_tokens": prompt_tokens,
            "describe": describe[name],
        }
        if not record.latencies:
            row.update(status="failed", reason=record.error or "no timed run")
            records.append(row)
            continue
        stats = summarize(record.latencies)
        per_sample = stats["median"] / batch
        row.update(
            status="ok",
            latency_s_median=per_sample,
            latency_s_min=stats["min"] / batch,
            latency_s_max=stats["max"] / batch,
            spread_rel=stats["spread_rel"],
            batch_latency_s_median=stats["median"],
            latencies_s=record.latencies,
            repeats=len(record.latencies),
            peak_mem_bytes=record.peak,
            peak_mem_over_start_bytes=None if record.peak is None else record.peak - (record.baseline or 0),
            ratio_latency=ratio(per_sample, ref_latency),
            ratio_latency_paired=paired_ratio(record.latencies, reference.latencies) if reference else None,
            ratio_mem=ratio(record.peak, ref_peak),
            floor_s_per_sample=floor["per_sample_s"],
            latency_over_floor=ratio(per_sample, floor["per_sample_s"]),
            warmup_s=record.warmup_s,
            compiles_during_timing=record.compiles,
            **_prefill_fields(record.prefill, floor["prefill_s"]),
        )
        if record.error is not None:
            row["reason"] = f"some repeats failed: {record.error}"
        records.append(row)
    return records


def _prefill_fields(prefill: list[float], floor_s: float) -> dict[str, Any]:
    """The prompt pass alone: median seconds of one pass over the whole batch (like the floor's ``prefill_s``, not
    per sample), that floor, and their ratio."""
    median = summarize(prefill)["median"] if prefill else None
    return {
        "prefill_s_median": median,
        "prefill_latencies_s": prefill,
        "prefill_floor_s": floor_s,
        "prefill_over_floor": ratio(median, floor_s),
    }


def build_methods(
    names: list[str], ctx: FactoryContext, model: nn.Module, tokenizer: PreTrainedTokenizerBase
) -> tuple[dict[str, HighlightMethod], dict[str, str]]:
    """Make and set up each named method; those that cannot run here are returned with the reason instead."""
    methods: dict[str, HighlightMethod] = {}
    skipped: dict[str, str] = {}
    for name in names:
        made = make_method(name, ctx)
        if isinstance(made, str):
            skipped[name] = made
            continue
        try:
            made.setup(model, tokenizer)
        except Exception as err:  # a method under construction elsewhere must not stop the others
            log.warning("skipping method %r: setup failed: %s: %s", name, type(err).__name__, err)
            skipped[name] = f"setup failed: {type(err).__name__}: {err}"
            continue
        methods[name] = made
    if "none" not in methods:
        raise RuntimeError(f"the reference method 'none' could not be set up: {skipped.get('none')}")
    return methods, skipped


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def run_generation(settings: GenerationSettings, out_dir: str | Path, *, work_dir: str | Path | None = None) -> dict:
    """Run the benchmark and write ``generation.json`` (records), ``generation.details.json`` (settings,
    environment, ceilings, floors, records; rewritten after every block so a timeout keeps what finished) and
    ``generation.md`` (the table). Returns the details."""
    out_dir = Path(out_dir)
    device = resolve_device(settings.device)
    dtype = getattr(torch, settings.dtype)
    shape = get_shape(settings.shape)
    log.info("generation benchmark settings:\n%s", json.dumps(asdict(settings), indent=2))
    copy_bytes = settings.copy_bytes or (2 * 2**30 if device.type == "cuda" else 64 * 2**20)
    matmul_size = settings.matmul_size or (8192 if device.type == "cuda" else 512)
    ceilings = measure_ceilings(device, dtype, copy_bytes=copy_bytes, matmul_size=matmul_size)
    log.info(
        "ceilings: copy %.1f GB/s, %s matmul %.1f TFLOP/s",
        ceilings.copy_bytes_per_s / 1e9,
        settings.dtype,
        ceilings.matmul_flops_per_s / 1e12,
    )
    started = time.perf_counter()
    model = random_model(shape, device=device, dtype=dtype, seed=settings.seed)
    synchronize(device)
    log.info("built a random %s in %.1f s", shape.name, time.perf_counter() - started)
    cost = ModelCost.of(model, shape)
    tokenizer = offline_tokenizer(["random weights need no real text"], vocab_size=min(shape.vocab_size, 300))
    details: dict[str, Any] = {
        "workload": "generation",
        "settings": asdict(settings),
        "shape": shape.describe(),
        "environment": environment(device),
        "ceilings": asdict(ceilings),
        "cost": asdict(cost),
        "floors": {},
        "records": [],
    }

    def flush() -> None:
        write_json(out_dir / "generation.details.json", details)
        write_json(out_dir / "generation.json", [_public(r) for r in details["records"]])

    with tempfile.TemporaryDirectory(dir=work_dir, prefix="seka-bench-") as tmp:
        wanted = settings.methods if EAGER in settings.paths else settings.fast_methods
        ctx = FactoryContext(shape=shape, work_dir=Path(tmp), settings=settings)
        methods, skipped = build_methods(wanted, ctx, model, tokenizer)
        describe = {name: method.describe() for name, method in methods.items()}
        fast = {name: methods[name] for name in settings.fast_methods if name in methods}
        for path, chosen in ((EAGER, methods), (FAST, fast), (LOOP, fast)):
            if not chosen or path not in settings.paths:
                continue
            for prompt_tokens, batch in settings.blocks():
                enc = random_prompts(
                    batch,
                    prompt_tokens,
                    documents=settings.documents,
                    highlighted=settings.highlighted,
                    vocab_size=shape.vocab_size,
                    seed=settings.seed + batch,
                    device=device,
                )
                floor = generation_floor(
                    cost, ceilings, batch=batch, prompt_tokens=prompt_tokens, new_tokens=settings.new_tokens
                )
                details["floors"].setdefault(str(prompt_tokens), {})[str(batch)] = floor
                log.info(
                    "path %s, %d-token prompts, batch %d: timing %s", path, prompt_tokens, batch, ", ".join(chosen)
                )
                fast_path = path in COMPILED
                with (
                    static_compiled_decoding(model, backend=settings.compile_backend, mode=settings.compile_mode)
                    if path == FAST
                    else nullcontext()
                ):
                    samples = measure_block(
                        model,
                        on_decoder(chosen, model, enc, settings) if path == LOOP else chosen,
                        enc,
                        new_tokens=settings.new_tokens,
                        warmup=settings.fast_warmup if fast_path else settings.warmup,
                        repeats=settings.fast_repeats if fast_path else settings.repeats,
                        device=device,
                    )
                details["records"] += _records(
                    samples, path=path, batch=batch, prompt_tokens=prompt_tokens, floor=floor, describe=describe
                )
                if not fast_path:
                    details["records"] += [
                        {
                            "method": name,
                            "path": path,
                            "batch_size": batch,
                            "prompt_tokens": prompt_tokens,
                            "status": "skipped",
                            "reason": reason,
                        }
                        for name, reason in skipped.items()
                    ]
                flush()
    details["compile_safety"] = _compile_safety(details["records"])
    flush()
    write_text(out_dir / "generation.md", generation_table(details))
    return details


RECORD_KEYS = (
    "method",
    "batch_size",
    "prompt_tokens",
    "latency_s_median",
    "peak_mem_bytes",
    "ratio_latency",
    "ratio_mem",
)
EXTRA_KEYS = (
    "path",
    "status",
    "latency_s_min",
    "latency_s_max",
    "spread_rel",
    "peak_mem_over_start_bytes",
    "ratio_latency_paired",
    "latency_over_floor",
    "prefill_s_median",
    "prefill_floor_s",
    "prefill_over_floor",
    "compiles_during_timing",
    "reason",
)


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """The issue's record format (:data:`RECORD_KEYS`, None where not measured) plus path, status and spread."""
    row = {key: record.get(key) for key in RECORD_KEYS}
    row.update({key: record[key] for key in EXTRA_KEYS if key in record})
    return row


def _compile_safety(records: list[dict[str, Any]]) -> dict[str, str]:
    """Per fast-path method: whether its compiled decode step stayed compiled across calls."""
    verdict: dict[str, str] = {}
    for record in records:
        if record["path"] not in COMPILED:
            continue
        name = f"{record['method']} ({record['path']})"
        if record["status"] != "ok":
            verdict[name] = f"failed under the fast path: {record.get('reason')}"
        elif record["compiles_during_timing"]:
            verdict[name] = (
                f"recompiled {record['compiles_during_timing']} graph(s) during timed runs at batch "
                f"{record['batch_size']}: its hooks change what torch.compile guards on"
            )
        else:
            verdict.setdefault(name, "no recompilation during timed runs")
    return verdict


def fine_times(value: float) -> str:
    """A ratio to three decimals: the targets are 1% and 0.5%."""
    return f"{value:.3f}x"


def generation_table(details: dict[str, Any]) -> str:
    """Markdown: one row per method, path and batch size."""
    settings = details["settings"]
    env = details["environment"]
    compiled = set(COMPILED) & set(settings["paths"])
    fast_repeats = f" ({settings['fast_repeats']} on the compiled paths)" if compiled else ""
    header = (
        f"Generation, {details['shape']['name']} (random weights, {settings['dtype']}), "
        f"{', '.join(map(str, settings['prompt_tokens']))}-token prompts with {settings['highlighted']}/{settings['documents']} documents "
        f"highlighted, {settings['new_tokens']} new tokens, median of {settings['repeats']} repeats"
        f"{fast_repeats}; {env.get('gpu_name') or env['device']}, "
        f"torch {env['torch']}, transformers {env['transformers']}.\n\n"
    )
    columns = [
        ("method", "method", plain),
        ("path", "path", plain),
        ("batch", "batch_size", plain),
        ("prompt", "prompt_tokens", plain),
        ("s / sample", "latency_s_median", seconds),
        ("spread", "spread_rel", lambda v: f"{100 * v:.1f}%"),
        ("x none", "ratio_latency", fine_times),
        ("x none, paired", "ratio_latency_paired", fine_times),
        ("peak GiB", "peak_mem_bytes", gib),
        ("mem x none", "ratio_mem", fine_times),
        ("x floor", "latency_over_floor", times),
        ("prefill s / batch", "prefill_s_median", seconds),
        ("prefill x floor", "prefill_over_floor", times),
        ("status", "status", plain),
    ]
    return header + markdown_table(details["records"], columns)
