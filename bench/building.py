"""Projection-building throughput and memory: the streaming builder of ``seka fit`` against a naive one.

The streaming path is the code ``seka fit`` runs (:func:`~seka_lightning.capture.collect_triplet_keys` into
:class:`~seka_lightning.stats.KeyStatistics`): batched passes, answer-token keys copied out by hooks, float64 sums.
The naive comparison point exists only here: it follows the reference builder (one example at a time,
``output_hidden_states=True``, keys recomputed from the hidden states, every key kept in lists and concatenated at
the end), so its memory grows with the data. DDP scaling runs ``seka fit`` itself through the CLI on a saved
random-weight checkpoint and reads the fit stage's time and peak memory from a callback on every rank.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from bench.generation import matmul_flops_per_s, resolve_device
from bench.report import (
    allocated_memory,
    environment,
    gib,
    markdown_table,
    peak_memory,
    plain,
    ratio,
    reset_peak_memory,
    synchronize,
    times,
)
from bench.shapes import get_shape, offline_tokenizer, random_model, save_checkpoint
from seka_lightning.capture import check_pack_tokens, collect_triplet_keys
from seka_lightning.data.triplets import (
    Triplet,
    answer_token_indices,
    check_length_window,
    iter_bucketed,
    iter_triplets,
    read_pairs,
)
from seka_lightning.families import ModelLayout, resolve_layout
from seka_lightning.files import write_json, write_text
from seka_lightning.stats import KeyStatistics, KeySums

log = logging.getLogger(__name__)

# NVLink multicast stays off on shared multi-GPU hosts (see the device notes); children inherit these.
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class BuildingSettings:
    """What the building benchmark runs; every field is recorded in the result file."""

    shape: str = "qwen3-8b"
    data: str = "data/synthetic_qa.jsonl"
    batch_sizes: list[int] = field(default_factory=lambda: [16, 32])
    sizes: list[int] = field(default_factory=lambda: [512, 2048])
    naive_sizes: list[int] = field(default_factory=lambda: [32, 64])
    dtype: str = "bfloat16"
    device: str = "auto"
    seed: int = 0
    tokenizer_vocab: int = 8192
    ddp_devices: list[int] = field(default_factory=list)
    ddp_pairs: list[int] = field(default_factory=lambda: [100, 2000])
    ddp_batch_size: int = 32
    config: str = "configs/build/synthetic_qa.yaml"
    accelerator: str = "auto"
    matmul_size: int | None = None  # the peak probe's matmul size: 8192 on a GPU, 256 on a CPU
    length_window: int | None = None  # streaming and seka fit: bucket texts by length within this many batches
    pack_tokens: int | None = None  # streaming and seka fit: pack each pass's texts into rows of this many tokens

    def __post_init__(self) -> None:
        get_shape(self.shape)
        for name in ("batch_sizes", "sizes", "naive_sizes", "ddp_devices", "ddp_pairs"):
            values = getattr(self, name)
            if any(v < 1 for v in values):
                raise ValueError(f"{name} must hold values >= 1, got {values}")
        for name in ("sizes", "naive_sizes", "ddp_pairs"):
            values = getattr(self, name)
            if len(values) != 2 or values[0] >= values[1]:
                raise ValueError(
                    f"{name} must be two increasing dataset sizes (memory is compared across them), got {values}"
                )
        if not self.batch_sizes:
            raise ValueError("batch_sizes must name at least one batch size")
        if self.matmul_size is not None and self.matmul_size < 1:
            raise ValueError(f"matmul_size must be >= 1 or None (8192 on a GPU, 256 on a CPU), got {self.matmul_size}")
        check_length_window(self.length_window)
        check_pack_tokens(self.pack_tokens)
        if self.ddp_batch_size < 1:
            raise ValueError(f"ddp_batch_size must be >= 1, got {self.ddp_batch_size}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.accelerator not in ("auto", "gpu", "cpu"):
            raise ValueError(f"accelerator must be auto, gpu or cpu, got {self.accelerator!r}")


def _zero_sums(layers: int, heads: int, head_dim: int, device: torch.device) -> KeySums:
    zeros = KeySums.zeros(layers, heads, head_dim)
    return KeySums(**{name: value.to(device) for name, value in zeros.tensors().items()})


@dataclass(frozen=True)
class BuildCost:
    """The model FLOPs a build needs: the weights applied to every token up to the last captured key site, plus
    causal attention in the layers below it (padding, the layers above, the final norm and the LM head excluded).

    ``flops(lengths) = 2 * matmul_params * sum(L) + 4 * attention_layers * heads * head_dim * sum(L * (L + 1) / 2)``
    over the token counts ``L`` of the texts run: ``matmul_params`` counts every 2-D weight of the decoder layers
    below the last captured layer and that layer's key projection (the pass stops at its keys); each causal
    (query, key) pair costs ``2 d`` for ``QK^T`` and ``2 d`` for ``AV`` per query head. Norms, RoPE, softmax and
    activations are not counted (as in the usual MFU), nor is the embedding lookup (a gather).
    """

    matmul_params: int
    attention_layers: int
    num_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: nn.Module, layer_ids: list[int]) -> BuildCost:
        """The cost of capturing ``layer_ids`` on a Qwen3-shaped ``model`` (``model.model.layers[i].self_attn``)."""
        last = max(layer_ids)
        blocks = model.model.layers
        below = sum(p.numel() for block in blocks[:last] for p in block.parameters() if p.ndim == 2)
        config = model.config
        return cls(
            matmul_params=below + blocks[last].self_attn.k_proj.weight.numel(),
            attention_layers=last,
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
        )

    def flops(self, lengths: list[int]) -> int:
        pairs = sum(n * (n + 1) // 2 for n in lengths)
        return (
            2 * self.matmul_params * sum(lengths) + 4 * self.attention_layers * self.num_heads * self.head_dim * pairs
        )


def streaming_build(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    triplets: list[Triplet],
    *,
    batch_size: int,
    device: torch.device,
    passes: list[tuple[tuple[int, ...], int]] | None = None,
    pack_tokens: int | None = None,
) -> KeySums:
    """The ``seka fit`` training step over ``triplets``, without Lightning: batched capture into float64 sums.
    With ``passes``, the token counts of the texts of each forward pass and its ``rows x width`` are appended to it;
    ``pack_tokens`` packs each pass's texts into rows of that many tokens (``seka fit --model.pack_tokens``)."""
    layer_ids = list(range(layout.num_layers))
    stats = KeyStatistics(len(layer_ids), layout.num_kv_heads, layout.head_dim).to(device)
    for start in range(0, len(triplets), batch_size):
        keys = collect_triplet_keys(
            model,
            tokenizer,
            layout,
            layer_ids,
            triplets[start : start + batch_size],
            device=device,
            pack_tokens=pack_tokens,
        )
        if keys is not None:
            stats.update(keys.neutral, keys.positive, keys.negative)
            if passes is not None:
                passes.append((keys.lengths, keys.slots))
    return stats.compute()


def _recomputed_keys(model: nn.Module, layer: int, hidden: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Keys of decoder ``layer`` rebuilt from its input hidden state, as the reference does for Qwen3: ``[T, H, d]``."""
    block = model.model.layers[layer]
    attention = block.self_attn
    normed = block.input_layernorm(hidden)
    keys = attention.k_proj(normed).view(*normed.shape[:-1], -1, head_dim)
    return attention.k_norm(keys)[0]


@torch.no_grad()
def naive_build(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    triplets: list[Triplet],
    *,
    device: torch.device,
) -> KeySums:
    """The reference's way: one text per forward pass with all hidden states, per-(layer, head) lists of every
    example's answer-token keys, concatenated into float64 matrices at the end. Same sums as the streaming path."""
    num_layers, heads, head_dim = layout.num_layers, layout.num_kv_heads, layout.head_dim
    kept: list[list[list[list[torch.Tensor]]]] = [[[[], [], []] for _ in range(heads)] for _ in range(num_layers)]
    for triplet in triplets:
        texts = triplet.texts()
        encoded = [tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) for text in texts]
        found = [
            answer_token_indices(enc["offset_mapping"], text, triplet.answer)
            for enc, text in zip(encoded, texts, strict=True)
        ]
        if not all(found) or len({len(f) for f in found}) != 1:
            continue  # the streaming path skips the same triplets
        for kind, (enc, rows) in enumerate(zip(encoded, found, strict=True)):
            input_ids = torch.tensor([enc["input_ids"]], device=device)
            hidden = model(input_ids=input_ids, use_cache=False, output_hidden_states=True).hidden_states
            for layer in range(num_layers):
                keys = _recomputed_keys(model, layer, hidden[layer], head_dim)[rows].float()  # [m, H, d]
                for head in range(heads):
                    kept[layer][head][kind].append(keys[:, head])
    sums = _zero_sums(num_layers, heads, head_dim, device)
    for layer in range(num_layers):
        for head in range(heads):
            if not kept[layer][head][0]:
                continue
            neutral, positive, negative = (torch.cat(kept[layer][head][k]).double() for k in range(3))  # [N, d]
            sums.a0[layer, head] = neutral.T @ neutral
            sums.a_pos[layer, head] = neutral.T @ positive
            sums.a_neg[layer, head] = neutral.T @ negative
            sums.d_pos_neg[layer, head] = (positive - negative).square().sum()
            sums.d_pos_neutral[layer, head] = (positive - neutral).square().sum()
    sums.count.fill_(sum(keys.shape[0] for keys in kept[0][0][0]))
    return sums


def sums_difference(a: KeySums, b: KeySums) -> float:
    """Largest relative Frobenius difference over the sums (0 when the two builders agree exactly)."""
    worst = 0.0
    for name, x in a.tensors().items():
        y = b.tensors()[name].to(x.device)
        worst = max(worst, float((x - y).norm() / y.norm().clamp_min(1e-300)))
    return worst


def _measure(
    builder: str, batch_size: int, triplets: int, run: Callable[[], KeySums], device: torch.device
) -> tuple[dict, KeySums]:
    """Time one build of ``triplets`` examples and record its throughput and peak memory."""
    synchronize(device)
    before = allocated_memory(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    sums = run()
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak = peak_memory(device)
    record = {
        "builder": builder,
        "status": "ok",
        "devices": 1,
        "batch_size": batch_size,
        "triplets": triplets,
        "rows": int(sums.count.item()),
        "seconds": elapsed,
        "examples_per_s": triplets / elapsed,
        "peak_mem_bytes": peak,
        "peak_mem_over_start_bytes": None if peak is None else peak - (before or 0),
    }
    log.info("%s, batch %d: %d triplets in %.2f s", builder, batch_size, triplets, elapsed)
    return record, sums


def utilisation(
    record: dict, cost: BuildCost, passes: list[tuple[tuple[int, ...], int]], peak_flops_per_s: float
) -> dict[str, Any]:
    """The work of a timed build (``passes``: the token counts of each pass's texts, and its token slots) and its model FLOPs
    utilisation: the FLOPs it needed (:class:`BuildCost`) per second of the build over the measured matmul peak.
    ``padding_fraction`` is the share of the padded ``rows x width`` token slots of the passes that were padding."""
    lengths = [n for lengths, _ in passes for n in lengths]
    padded = sum(slots for _, slots in passes)
    flops = cost.flops(lengths)
    achieved = flops / record["seconds"]
    return {
        "tokens": sum(lengths),
        "padding_fraction": 1 - sum(lengths) / padded if padded else None,
        "model_flops": flops,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak_flops_per_s,
        "mfu": achieved / peak_flops_per_s,
    }


class PeakMemoryRecorder(L.Callback):
    """Writes this rank's fit-stage timings, peak allocated memory and host-device syncs to ``{path}/rank{r}.json``
    (for the DDP runs of the building benchmark: the CLI's own numbers, measured inside the processes it starts).

    ``fit_s`` runs from the train start to the train end; ``first_batch_s`` to the end of batch 0 (CUDA, cuBLAS and
    allocator start-up land there); ``steady_s`` from the end of batch 0 to the end of the last batch, which processed
    ``steady_triplets`` (the device is synchronised at those three points only, so the steps in between overlap as in
    a normal run). During batch ``sync_probe_batch`` CUDA's sync debug mode warns at every operation that makes the
    host wait for the GPU; their number and Python call sites are recorded.
    """

    def __init__(self, path: str, sync_probe_batch: int = 2) -> None:
        """
        Args:
            path: folder for one JSON file per rank.
            sync_probe_batch: the batch whose host-device syncs are counted (CUDA only).
        """
        self.path = Path(path)
        self.sync_probe_batch = sync_probe_batch
        self._start = self._first_end = self._last_end = 0.0
        self._start_unix = 0.0
        self._batches = self._triplets = self._first_triplets = 0
        self._probe: warnings.catch_warnings | None = None
        self._caught: list[warnings.WarningMessage] = []
        self._syncs: list[str] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        reset_peak_memory(pl_module.device)
        self._start, self._start_unix = time.perf_counter(), time.time()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == self.sync_probe_batch and pl_module.device.type == "cuda":
            self._probe = warnings.catch_warnings(record=True)
            self._caught = self._probe.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def _end_probe(self) -> None:
        if self._probe is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._probe.__exit__(None, None, None)
            self._probe = None
            self._syncs = [f"{_short(w.filename)}:{w.lineno}" for w in self._caught if "synchroniz" in str(w.message)]

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._end_probe()  # leave no sync debug mode or warning filter behind

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self._end_probe()
        self._batches += 1
        self._triplets += len(batch)
        if batch_idx == 0:
            synchronize(pl_module.device)
            self._first_end, self._first_triplets = time.perf_counter(), self._triplets
        if batch_idx == trainer.num_training_batches - 1:
            synchronize(pl_module.device)
            self._last_end = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        end = time.perf_counter()
        self._last_end = self._last_end or end  # a loader without a length: the last batch was not known
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "train_start_unix": self._start_unix,
            "fit_s": end - self._start,
            "first_batch_s": self._first_end - self._start,
            "steady_s": self._last_end - self._first_end,
            "after_last_batch_s": end - self._last_end,
            "batches": self._batches,
            "triplets": self._triplets,
            "steady_triplets": self._triplets - self._first_triplets,
            "peak_mem_bytes": peak_memory(pl_module.device),
            "syncs_in_probe_batch": None if self._syncs is None else len(self._syncs),
            "sync_sites": None if self._syncs is None else dict(Counter(self._syncs)),
        }
        write_json(self.path / f"rank{trainer.global_rank}.json", record)


def _short(filename: str) -> str:
    """A source path from its package on (``.../site-packages/torch/x.py`` -> ``torch/x.py``): relative to the longest
    ``sys.path`` entry holding it, so no machine's install location ends up in a results file."""
    for entry in sorted((p for p in sys.path if p), key=len, reverse=True):
        prefix = entry.rstrip(os.sep) + os.sep
        if filename.startswith(prefix):
            return filename[len(prefix) :]
    return filename


def fit_command(
    settings: BuildingSettings, *, checkpoint: Path, pairs: int, devices: int, run_dir: Path, accelerator: str
) -> list[str]:
    """The ``seka fit`` command line for one DDP run (the shipped config with paths into ``run_dir``)."""
    callbacks = [
        {
            "class_path": "seka_lightning.lit.callbacks.BatchCheckpoint",
            "init_args": {"dirpath": str(run_dir / "checkpoints"), "every_n_batches": 50},
        },
        {"class_path": f"{__name__}.PeakMemoryRecorder", "init_args": {"path": str(run_dir / "ranks")}},
    ]
    return [
        sys.executable,
        "-m",
        "seka_lightning.cli",
        "fit",
        "-c",
        str(Path(settings.config).resolve()),
        "--model.pretrained",
        str(checkpoint),
        "--model.dtype",
        settings.dtype,
        "--model.output",
        str(run_dir / "bank.safetensors"),
        "--data.path",
        str(Path(settings.data).resolve()),
        "--data.max_samples",
        str(pairs),
        "--data.batch_size",
        str(settings.ddp_batch_size),
        "--trainer.devices",
        str(devices),
        "--trainer.accelerator",
        accelerator,
        "--trainer.callbacks",
        json.dumps(callbacks),
        *(["--data.length_window", str(settings.length_window)] if settings.length_window else []),
        *(["--model.pack_tokens", str(settings.pack_tokens)] if settings.pack_tokens else []),
    ]


def run_fit(command: list[str], run_dir: Path) -> tuple[float, list[dict]]:
    """Run one ``seka fit``; returns its wall time and the per-rank records. Output goes to ``run_dir/fit.log``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ}
    for key, value in SAFE_NCCL_ENV.items():
        env.setdefault(key, value)
    start = time.perf_counter()
    with (run_dir / "fit.log").open("w") as log_file:
        done = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (run_dir / "fit.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"seka fit exited with {done.returncode}; last output:\n{tail}")
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank*.json"))]
    return wall, ranks


def ddp_record(settings: BuildingSettings, checkpoint: Path, work_dir: Path, accelerator: str, devices: int) -> dict:
    """``seka fit`` on ``devices`` devices: examples/s of the fit stage (all ranks' triplets over the slowest rank's
    time), the same once running (:func:`steady_rate`), the same from the wall-time difference of the two dataset
    sizes (loading and start-up cancel out), peak memory (the largest rank's) and the host-device syncs of one
    steady batch."""
    small, large = settings.ddp_pairs
    runs = {}
    for pairs in (small, large):
        run_dir = work_dir / f"fit-{devices}dev-{pairs}pairs"
        command = fit_command(
            settings, checkpoint=checkpoint, pairs=pairs, devices=devices, run_dir=run_dir, accelerator=accelerator
        )
        log.info("seka fit on %d device(s), %d pairs", devices, pairs)
        runs[pairs] = run_fit(command, run_dir)
    (wall_small, ranks_small), (wall_large, ranks) = runs[small], runs[large]
    triplets = sum(r["triplets"] for r in ranks)
    fit_s = max(r["fit_s"] for r in ranks)
    starts = [r["train_start_unix"] for r in ranks]
    return {
        "builder": "seka fit",
        "status": "ok",
        "devices": devices,
        "batch_size": settings.ddp_batch_size,
        "triplets": triplets,
        "examples_per_s": triplets / fit_s,
        "examples_per_s_steady": steady_rate(ranks),
        "examples_per_s_wall_diff": 2 * (large - small) / (wall_large - wall_small)
        if wall_large > wall_small
        else None,
        "fit_s": fit_s,
        "first_batch_s": max(r["first_batch_s"] for r in ranks),
        "after_last_batch_s": max(r["after_last_batch_s"] for r in ranks),
        "train_start_skew_s": max(starts) - min(starts),
        "wall_s": {str(small): wall_small, str(large): wall_large},
        "peak_mem_bytes": _max_peak(ranks),
        "peak_mem_bytes_per_rank": [r["peak_mem_bytes"] for r in ranks],
        "peak_mem_bytes_small": _max_peak(ranks_small),
        "syncs_in_probe_batch": [r["syncs_in_probe_batch"] for r in ranks],
        "sync_sites": ranks[0]["sync_sites"],
        "ranks": ranks,
    }


def steady_rate(ranks: list[dict]) -> float | None:
    """Triplets per second once running: every rank's triplets after its first batch over the longest of the
    ranks' spans from the end of their first batch to the end of their last (the first batch carries the CUDA and
    cuBLAS start-up). None when no rank had a second batch."""
    span = max(r["steady_s"] for r in ranks)
    steady = sum(r["steady_triplets"] for r in ranks)
    return steady / span if steady and span > 0 else None


def ddp_records(settings: BuildingSettings, checkpoint: Path, work_dir: Path, accelerator: str) -> list[dict]:
    """One :func:`ddp_record` per device count (a failed run is recorded with its reason), with the scaling over
    the one-device run."""
    records = []
    for devices in settings.ddp_devices:
        try:
            records.append(ddp_record(settings, checkpoint, work_dir, accelerator, devices))
        except (RuntimeError, OSError, json.JSONDecodeError, KeyError, ValueError) as err:
            log.error("seka fit on %d device(s) failed: %s", devices, err)
            records.append({"builder": "seka fit", "status": "failed", "devices": devices, "reason": str(err)})
    one = next((r for r in records if r["devices"] == 1 and r["status"] == "ok"), {})
    for record in records:
        record["scaling_vs_1_device"] = ratio(record.get("examples_per_s"), one.get("examples_per_s"))
        record["scaling_steady_vs_1_device"] = ratio(
            record.get("examples_per_s_steady"), one.get("examples_per_s_steady")
        )
    return records


def _max_peak(ranks: list[dict]) -> int | None:
    peaks = [r["peak_mem_bytes"] for r in ranks]
    return None if not peaks or None in peaks else max(peaks)


def in_process_records(
    settings: BuildingSettings,
    triplets: list[Triplet],
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    *,
    peak_flops_per_s: float,
    checkpoint: Path | None = None,
) -> tuple[list[dict], float]:
    """Streaming and naive builds on a model built here; returns their records (the streaming ones with their MFU
    against ``peak_flops_per_s``) and the largest relative difference between the two builders' sums. With
    ``checkpoint``, the model is saved there for ``seka fit`` (it is freed when this returns)."""
    model = random_model(
        get_shape(settings.shape), device=device, dtype=getattr(torch, settings.dtype), seed=settings.seed
    )
    layout = resolve_layout(model)
    cost = BuildCost.of(model, list(range(layout.num_layers)))
    records = []
    # one untimed batch per batch size, packed as the timed runs, so kernel selection (packed passes run SDPA with a
    # mask, another kernel) and allocator growth stay out of the numbers
    first = settings.batch_sizes[0]
    for batch_size in settings.batch_sizes:
        streaming_build(
            model, tokenizer, layout, triplets[:batch_size], batch_size=batch_size, device=device,
            pack_tokens=settings.pack_tokens,
        )  # fmt: skip
    for batch_size in settings.batch_sizes:
        for size in settings.sizes:
            passes: list[tuple[tuple[int, ...], int]] = []
            ordered = list(iter_bucketed(triplets[:size], batch_size=batch_size, window=settings.length_window))
            run = partial(
                streaming_build,
                model,
                tokenizer,
                layout,
                ordered,
                batch_size=batch_size,
                device=device,
                passes=passes,
                pack_tokens=settings.pack_tokens,
            )
            record = _measure("streaming", batch_size, size, run, device)[0]
            usage = utilisation(record, cost, passes, peak_flops_per_s)
            records.append(
                {**record, "length_window": settings.length_window, "pack_tokens": settings.pack_tokens, **usage}
            )
    naive_sums = None
    for size in settings.naive_sizes:
        run = partial(naive_build, model, tokenizer, layout, triplets[:size], device=device)
        record, naive_sums = _measure("naive", 1, size, run, device)
        records.append(record)
    subset = triplets[: settings.naive_sizes[-1]]
    streamed = streaming_build(
        model, tokenizer, layout, subset, batch_size=first, device=device, pack_tokens=settings.pack_tokens
    )  # the builder the timed records ran, packed or not
    difference = sums_difference(streamed, naive_sums)
    if checkpoint is not None:
        started = time.perf_counter()
        save_checkpoint(model, tokenizer, checkpoint)
        log.info("saved the random %s checkpoint in %.1f s", settings.shape, time.perf_counter() - started)
    return records, difference


def run_building(settings: BuildingSettings, out_dir: str | Path, *, work_dir: str | Path | None = None) -> dict:
    """Run the benchmark and write ``building.json`` (records and the headline comparisons),
    ``building.details.json`` (plus settings and environment) and ``building.md``. Returns the details."""
    out_dir = Path(out_dir)
    device = resolve_device(settings.device)
    shape = get_shape(settings.shape)
    log.info("building benchmark settings:\n%s", json.dumps(asdict(settings), indent=2))
    triplets = list(iter_triplets(read_pairs(settings.data)))
    needed = max(settings.sizes[-1], settings.naive_sizes[-1])
    if len(triplets) < needed:
        raise ValueError(f"{settings.data} yields {len(triplets)} triplets but sizes need {needed}; use smaller sizes")
    texts = [text for triplet in triplets for text in triplet.texts()]
    tokenizer = offline_tokenizer(texts, vocab_size=min(settings.tokenizer_vocab, shape.vocab_size))
    sample = texts[:3000]
    details: dict[str, Any] = {
        "workload": "building",
        "settings": asdict(settings),
        "shape": shape.describe(),
        "environment": environment(device),
        "tokens_per_text_mean": sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in sample)
        / len(sample),
    }
    matmul_size = settings.matmul_size or (8192 if device.type == "cuda" else 256)
    peak = matmul_flops_per_s(device, getattr(torch, settings.dtype), size=matmul_size)
    details["matmul_size"], details["matmul_flops_per_s"] = matmul_size, peak
    log.info("%s matmul peak (%d^3): %.1f TFLOP/s", settings.dtype, matmul_size, peak / 1e12)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="seka-bench-build-") as tmp:
        checkpoint = Path(tmp) / "model" if settings.ddp_devices else None
        records, difference = in_process_records(
            settings, triplets, tokenizer, device, peak_flops_per_s=peak, checkpoint=checkpoint
        )
        details["naive_vs_streaming_max_rel_diff"] = difference
        _write_building(out_dir, details, records)  # kept if the DDP runs are cut short
        if checkpoint is not None:
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the fit processes load their own copy
            accelerator = settings.accelerator
            if accelerator == "auto":
                accelerator = "gpu" if device.type == "cuda" else "cpu"
            records += ddp_records(settings, checkpoint, Path(tmp), accelerator)
    return _write_building(out_dir, details, records)


def _write_building(out_dir: Path, details: dict[str, Any], records: list[dict]) -> dict[str, Any]:
    details["records"] = records
    summary = building_summary(records)
    details.update(summary)
    write_json(out_dir / "building.json", {"records": records, **summary})
    write_json(out_dir / "building.details.json", details)
    write_text(out_dir / "building.md", building_table(details))
    return details


def building_summary(records: list[dict]) -> dict[str, Any]:
    """Speed-up and MFU of each streaming batch size (largest size; speed-up over the naive builder), and memory
    growth from the smaller to the larger dataset for each builder (1.0 = flat)."""

    def largest(builder: str, batch_size: int) -> list[dict]:
        rows = [r for r in records if r["builder"] == builder and r["batch_size"] == batch_size]
        return sorted(rows, key=lambda r: r["triplets"])

    naive = largest("naive", 1)
    naive_rate = naive[-1]["examples_per_s"] if naive else None
    speedup, growth, mfu = {}, {}, {}
    for batch_size in sorted({r["batch_size"] for r in records if r["builder"] == "streaming"}):
        rows = largest("streaming", batch_size)
        speedup[str(batch_size)] = ratio(rows[-1]["examples_per_s"], naive_rate)
        growth[f"streaming_bs{batch_size}"] = _growth(rows)
        mfu[str(batch_size)] = rows[-1].get("mfu")
    if naive:
        growth["naive"] = _growth(naive)
    return {
        "naive_examples_per_s": naive_rate,
        "speedup_over_naive": speedup,
        "mfu": mfu,
        "memory_growth": growth,
    }


def _growth(rows: list[dict]) -> dict[str, Any]:
    """Peak memory (total and above the model) at the smallest and largest dataset size, and their ratios."""
    small, large = rows[0], rows[-1]
    return {
        "triplets": [small["triplets"], large["triplets"]],
        "peak_mem_bytes": [small["peak_mem_bytes"], large["peak_mem_bytes"]],
        "peak_mem_over_start_bytes": [small["peak_mem_over_start_bytes"], large["peak_mem_over_start_bytes"]],
        "ratio": ratio(large["peak_mem_bytes"], small["peak_mem_bytes"]),
        "ratio_over_start": ratio(large["peak_mem_over_start_bytes"], small["peak_mem_over_start_bytes"]),
    }


def building_table(details: dict[str, Any]) -> str:
    env = details["environment"]
    header = (
        f"Building, {details['shape']['name']} (random weights, {details['settings']['dtype']}), synthetic QA "
        f"triplets; {env.get('gpu_name') or env['device']}, torch {env['torch']}. Naive vs streaming sums: max "
        f"relative difference {details['naive_vs_streaming_max_rel_diff']:.2e}. MFU: model FLOPs needed per second over "
        f"the measured {details['settings']['dtype']} matmul peak, {details['matmul_flops_per_s'] / 1e12:.1f} "
        "TFLOP/s.\n\n"
    )
    columns = [
        ("builder", "builder", plain),
        ("status", "status", plain),
        ("devices", "devices", plain),
        ("batch", "batch_size", plain),
        ("triplets", "triplets", plain),
        ("examples/s", "examples_per_s", lambda v: f"{v:.1f}"),
        ("MFU", "mfu", lambda v: f"{v:.3f}"),
        ("padding", "padding_fraction", lambda v: f"{v:.2f}"),
        ("pack tokens", "pack_tokens", plain),
        ("peak GiB", "peak_mem_bytes", gib),
        ("above model GiB", "peak_mem_over_start_bytes", gib),
        ("x 1 device", "scaling_vs_1_device", times),
        ("steady examples/s", "examples_per_s_steady", lambda v: f"{v:.1f}"),
        ("steady x 1 device", "scaling_steady_vs_1_device", times),
    ]
    return header + markdown_table(details["records"], columns)
