"""``python -m bench {generation,building} ...``: the speed and memory benchmarks.

Plain argparse (no jsonargparse), so the benchmarks run where only torch, transformers and lightning are installed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields

from bench.building import BuildingSettings, building_table, run_building
from bench.generation import (
    METHOD_FACTORIES,
    PATHS,
    GenerationSettings,
    generation_table,
    run_generation,
)
from bench.shapes import SHAPES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen_defaults, build_defaults = GenerationSettings(), BuildingSettings()

    gen = commands.add_parser("generation", help="latency and peak memory of generation, per method and batch size")
    gen.add_argument("--out", required=True, help="folder for generation.json, generation.details.json, generation.md")
    gen.add_argument("--shape", choices=sorted(SHAPES), default=gen_defaults.shape, help="model shape (random weights)")
    gen.add_argument("--batch-sizes", type=int, nargs="+", default=gen_defaults.batch_sizes, help="prompts per call")
    gen.add_argument(
        "--new-tokens", type=int, default=gen_defaults.new_tokens, help="greedy tokens per prompt (no EOS)"
    )
    gen.add_argument(
        "--prompt-tokens",
        type=int,
        nargs="+",
        default=gen_defaults.prompt_tokens,
        help="tokens of the longest prompt; several lengths time each (records carry prompt_tokens)",
    )
    gen.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="time only the (prompt tokens, batch size) pairs with batch x prompt tokens <= this (default: all)",
    )
    gen.add_argument("--documents", type=int, default=gen_defaults.documents, help="documents per prompt")
    gen.add_argument("--highlighted", type=int, default=gen_defaults.highlighted, help="highlighted (middle) documents")
    gen.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(METHOD_FACTORIES),
        default=gen_defaults.methods,
        help="methods to time (must include none; the ones that cannot be built here are recorded as skipped)",
    )
    gen.add_argument("--repeats", type=int, default=gen_defaults.repeats, help="timed runs per method (median)")
    gen.add_argument("--warmup", type=int, default=gen_defaults.warmup, help="untimed runs per method first")
    gen.add_argument(
        "--paths",
        nargs="+",
        choices=PATHS,
        default=gen_defaults.paths,
        help="eager (plain generate), static_compile (generate with a static cache and compiled decode step) and/or "
        "static_loop (StaticGreedyDecoder: a compiled decode step without generate's per-step Python)",
    )
    gen.add_argument(
        "--fast-methods",
        nargs="*",
        choices=sorted(METHOD_FACTORIES),
        default=gen_defaults.fast_methods,
        help="methods also timed with a static cache and compiled decoding (none = skip the fast path)",
    )
    gen.add_argument("--fast-repeats", type=int, default=gen_defaults.fast_repeats, help="timed fast-path runs")
    gen.add_argument("--fast-warmup", type=int, default=gen_defaults.fast_warmup, help="includes compilation")
    gen.add_argument(
        "--compile-backend", default=gen_defaults.compile_backend, help="torch.compile backend (fast path)"
    )
    gen.add_argument("--compile-mode", default=gen_defaults.compile_mode, help="torch.compile mode (fast path)")
    gen.add_argument(
        "--fuse-projections",
        action="store_true",
        help="fast path: each layer's q/k/v and gate/up as one matmul each (StaticGreedyDecoder(fuse_projections=True))",
    )
    gen.add_argument(
        "--split-kv",
        action="store_true",
        help="fast path: decode attention through the split-KV Triton kernel (StaticGreedyDecoder(split_kv=True))",
    )
    gen.add_argument(
        "--prompt-pass",
        choices=("batch", "rows"),
        default=gen_defaults.prompt_pass,
        help="fast path: a padded batch's prompt pass as one masked batch, or row by row without the padding "
        "(StaticGreedyDecoder(prompt_pass=...))",
    )
    gen.add_argument(
        "--pasta-heads", type=int, default=gen_defaults.pasta_heads, help="random PASTA (layer, head) pairs"
    )
    gen.add_argument("--spa-strength", type=float, default=gen_defaults.spa_strength, help="SPA s (20: long contexts)")
    gen.add_argument("--bank-rank", type=int, default=None, help="rank of the random SEKA projectors (default d/4)")
    gen.add_argument("--copy-bytes", type=int, default=None, help="bandwidth probe size (default 2 GiB on GPU)")
    gen.add_argument("--matmul-size", type=int, default=None, help="matmul probe size (default 8192 on GPU)")
    _common(gen, gen_defaults)

    build = commands.add_parser(
        "building",
        help="examples/s, MFU and peak memory of projection building",
        description="Projection building on a random-weight model: the streaming builder `seka fit` runs (examples/s, "
        "peak memory, and MFU: the model FLOPs the build needs per second over a bf16 matmul peak measured in the same "
        "run), a naive builder, and optionally `seka fit` over DDP. The 8B measurement on one GPU: python -m bench "
        "building --shape qwen3-8b --batch-sizes 16 32 64 --out OUT/building (add --length-window 16 for length "
        "bucketing, or --pack-tokens 512 to pack the texts without padding). A CPU smoke run: python -m bench "
        "building --shape tiny --device cpu --batch-sizes 2 --sizes 4 8 --naive-sizes 2 4 --out OUT/smoke",
    )
    build.add_argument("--out", required=True, help="folder for building.json, building.details.json, building.md")
    build.add_argument(
        "--shape", choices=sorted(SHAPES), default=build_defaults.shape, help="model shape (random weights)"
    )
    build.add_argument("--data", default=build_defaults.data, help="synthetic QA pairs (JSONL)")
    build.add_argument(
        "--batch-sizes", type=int, nargs="+", default=build_defaults.batch_sizes, help="triplets per streaming pass"
    )
    build.add_argument("--sizes", type=int, nargs=2, default=build_defaults.sizes, help="triplets, streaming builder")
    build.add_argument("--naive-sizes", type=int, nargs=2, default=build_defaults.naive_sizes, help="triplets, naive")
    build.add_argument(
        "--tokenizer-vocab", type=int, default=build_defaults.tokenizer_vocab, help="BPE trained on the data"
    )
    build.add_argument("--ddp-devices", type=int, nargs="*", default=[], help="run `seka fit` on these device counts")
    build.add_argument("--ddp-pairs", type=int, nargs=2, default=build_defaults.ddp_pairs, help="QA pairs per fit run")
    build.add_argument(
        "--ddp-batch-size", type=int, default=build_defaults.ddp_batch_size, help="--data.batch_size of seka fit"
    )
    build.add_argument("--config", default=build_defaults.config, help="the `seka fit` config")
    build.add_argument("--accelerator", choices=("auto", "gpu", "cpu"), default=build_defaults.accelerator)
    build.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="the MFU peak probe's square matmul (default 8192 on GPU, 256 CPU)",
    )
    build.add_argument(
        "--length-window",
        type=int,
        default=None,
        help="bucket texts by length within runs of this many batches (--data.length_window; default: data order)",
    )
    build.add_argument(
        "--pack-tokens",
        type=int,
        default=None,
        help="pack each pass's texts into rows of this many tokens (--model.pack_tokens; default: a padded row per text)",
    )
    _common(build, build_defaults)
    return parser


def _common(parser: argparse.ArgumentParser, defaults: GenerationSettings | BuildingSettings) -> None:
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), default=defaults.dtype, help="model dtype"
    )
    parser.add_argument("--device", default=defaults.device, help="auto, cuda, cuda:1, cpu")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="weights, prompts and banks")
    parser.add_argument("--work-dir", default=None, help="where temporary banks and checkpoints go (default: $TMPDIR)")


def _settings(cls: type, args: argparse.Namespace) -> GenerationSettings | BuildingSettings:
    values = vars(args)
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    args = _parser().parse_args(argv)
    if args.command == "generation":
        details = run_generation(_settings(GenerationSettings, args), args.out, work_dir=args.work_dir)
        sys.stdout.write(generation_table(details))
    else:
        details = run_building(_settings(BuildingSettings, args), args.out, work_dir=args.work_dir)
        sys.stdout.write(building_table(details))


if __name__ == "__main__":
    main()
