"""The run behind docs/results.md: build, tune and evaluate every method on every benchmark for one model.

    python scripts/results/run_all.py --model embedded:smollm2-135m --tag smollm2-135m --out outputs/run \
        --shared ../shared/data --stages build search profile experts eval

Stages (each reads what the earlier ones wrote under --out):
  build    SEKA bank from data/synthetic_qa.jsonl (all 2,000 pairs) with `ProjectionBuilder`, statistics saved beside it;
  search   layers / gain / min_diff on the CounterFact dev slice 4500:5000 (`seka search`), never the test slice;
  profile  PASTA head set on the synthetic QA data (`seka pasta-profile`);
  experts  AdaSEKA expert banks (positive-only builds) from the expert sources, when the AdaSEKA code is present;
  gate     the learned routing gate on the held-out synthetic QA, with its held-out NLL before and after fitting;
  eval     none / seka / random / pasta / spa / adaseka (/ adaseka_gate once a gate exists) on CounterFact 5000:5500, BiasBios, PronChange and
           lost-in-the-middle; one metric_result.json per run under --out/results/<benchmark>/<tag>/<method>/.
The model is loaded once per process and shared by every evaluation (a script-level cache, not library behaviour).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from pathlib import Path

import lightning as L
import torch

import seka_lightning.lit.frozen as frozen_module
from seka_lightning.baselines.pasta import PastaMethod
from seka_lightning.baselines.pasta_profile import profile_heads
from seka_lightning.baselines.random_projection import RandomProjectionMethod
from seka_lightning.baselines.spa import SpaMethod
from seka_lightning.data.benchmark_modules import (
    BiasBiosDataModule,
    CounterFactDataModule,
    LostInTheMiddleDataModule,
    PronChangeDataModule,
)
from seka_lightning.data.synthetic_qa import SyntheticQADataModule
from seka_lightning.files import write_json
from seka_lightning.lit.builder import ProjectionBuilder, stats_path_for
from seka_lightning.lit.evaluator import BenchmarkEvaluator
from seka_lightning.lit.writers import BenchmarkWriter
from seka_lightning.methods import HighlightMethod, SekaMethod
from seka_lightning.models import load_model
from seka_lightning.search import search

log = logging.getLogger("run_all")

cached_load_model = functools.lru_cache(maxsize=2)(load_model)


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def stage_build(args, out: Path) -> None:
    bank = out / "banks" / f"{args.tag}.safetensors"
    module = ProjectionBuilder(args.model, layers="all", top_pct=0.9, min_diff=0.0, output=str(bank))
    trainer(max_epochs=1).fit(module, datamodule=SyntheticQADataModule("data/synthetic_qa.jsonl", batch_size=64))


def stage_search(args, out: Path) -> None:
    if args.search_from:  # reuse a committed search (its best setting) instead of re-running it
        target = out / "search" / f"{args.tag}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(Path(args.search_from).read_text())
        return
    search(
        pretrained=args.model,
        stats=str(stats_path_for(out / "banks" / f"{args.tag}.safetensors")),
        output=str(out / "search" / f"{args.tag}.json"),
        data=f"{args.shared}/counterfact",
        example_subset="4500:5000",
        layers=args.search_layers
        or (["all", "last20", "last15", "last10"] if args.layers > 20 else ["all", "last12", "last8", "last5"]),
        gains=args.search_gains,
        min_diffs=args.search_min_diffs,
        top_pcts=args.search_top_pcts,
        batch_size=64,
        add_special_tokens=args.bos,
    )


def stage_profile(args, out: Path) -> None:
    profile_heads(
        pretrained=args.model,
        data="data/synthetic_qa.jsonl",
        output=str(out / "pasta" / f"{args.tag}.json"),
        max_samples=64,
        top_k=args.pasta_top_k,
        batch_size=64,
        heads_per_pass=8,
        add_special_tokens=args.bos,
        device="cuda" if torch.cuda.is_available() else None,
    )


def stage_experts(args, out: Path) -> None:
    from seka_lightning.data import expert_sources

    shared, n = args.shared, 500
    sources = {
        "synthetic_qa": SyntheticQADataModule("data/synthetic_qa.jsonl", batch_size=64, max_samples=n),
        "counterfact": expert_sources.CounterFactTripletDataModule(
            f"{shared}/counterfact", batch_size=64, max_samples=n
        ),
        "biasbios": expert_sources.BiasBiosTripletDataModule(f"{shared}/biasbios_subset", batch_size=64, max_samples=n),
        "lost_in_the_middle": expert_sources.LostInTheMiddleTripletDataModule(
            f"{shared}/lost_in_the_middle/nq-open-oracle.jsonl.gz", batch_size=64, max_samples=n
        ),
    }
    min_diff = json.loads((out / "search" / f"{args.tag}.json").read_text())["best"]["min_diff"]
    for name, datamodule in sources.items():
        bank = out / "experts" / args.tag / f"{name}.safetensors"
        module = ProjectionBuilder(
            args.model, positive_only=True, attention_ratio=1.2, top_pct=0.9, min_diff=min_diff, output=str(bank)
        )
        trainer(max_epochs=1).fit(module, datamodule=datamodule)


def stage_gate(args, out: Path) -> None:
    """Fit the learned routing gate on the held-out synthetic QA (200 pairs train, 100 validate) with the search's
    gain and layers, and record the held-out answer NLL before (gate = identity = router) and after fitting."""
    from seka_lightning.adaseka.gate import AdaSekaGateTrainer, GateQADataModule

    best = json.loads((out / "search" / f"{args.tag}.json").read_text())["best"]
    module = AdaSekaGateTrainer(
        args.model,
        expert_banks(out, args.tag),
        gain=best["gain_pos"],
        layers=best["layers"],
        output=str(out / "gates" / f"{args.tag}.safetensors"),
    )
    data = GateQADataModule("data/synthetic_qa_heldout.jsonl", train_pairs=200, val_pairs=100, batch_size=8)
    run = trainer(max_epochs=2, num_sanity_val_steps=0)
    before = run.validate(module, datamodule=data, verbose=False)[0]
    run.fit(module, datamodule=data)
    after = run.validate(module, datamodule=data, verbose=False)[0]
    write_json(
        out / "gates" / f"{args.tag}.json",
        {
            "model": args.model,
            "gain": best["gain_pos"],
            "layers": best["layers"],
            "train": "data/synthetic_qa_heldout.jsonl pairs 0:200 (4 highlighted probes each), 2 epochs, Adam lr 0.05",
            "validate": "pairs 200:300",
            "before_fit": before,
            "after_fit": after,
        },
    )


def expert_banks(out: Path, tag: str) -> dict[str, str]:
    banks = [
        p for p in sorted((out / "experts" / tag).glob("*.safetensors")) if not p.name.endswith(".stats.safetensors")
    ]
    return {p.name.removesuffix(".safetensors"): str(p) for p in banks}


def methods(args, out: Path, *, long_context: bool) -> dict[str, HighlightMethod]:
    search_result = json.loads((out / "search" / f"{args.tag}.json").read_text())
    best = search_result["best"]
    top_pct = best.get("top_pct", search_result["settings"].get("top_pct", 0.9))  # older searches: one top_pct
    tuned_bank = out / "banks" / f"{args.tag}-p{top_pct}-m{best['min_diff']}.safetensors"  # named by its settings
    if not tuned_bank.exists():
        from seka_lightning.bank import derive_bank

        derive_bank(
            stats=str(stats_path_for(out / "banks" / f"{args.tag}.safetensors")),
            output=str(tuned_bank),
            top_pct=top_pct,
            min_diff=best["min_diff"],
        )
    seka_kwargs = {"gain_pos": best["gain_pos"], "layers": best["layers"]}
    chosen = {
        "none": HighlightMethod(),
        "seka": SekaMethod(str(tuned_bank), **seka_kwargs),
        "random": RandomProjectionMethod(str(tuned_bank), seed=0, **seka_kwargs),
        "pasta": PastaMethod(str(out / "pasta" / f"{args.tag}.json")),
        "spa": SpaMethod(strength=20.0 if long_context else 1.6),
    }
    if (out / "experts" / args.tag).is_dir():
        from seka_lightning.adaseka.method import AdaSekaMethod

        experts = expert_banks(out, args.tag)
        chosen["adaseka"] = AdaSekaMethod(experts, gain=best["gain_pos"], layers=best["layers"])
        gate = out / "gates" / f"{args.tag}.safetensors"
        if gate.exists():
            chosen["adaseka_gate"] = AdaSekaMethod(
                experts, gain=best["gain_pos"], layers=best["layers"], gate=str(gate)
            )
    return {name: m for name, m in chosen.items() if name in args.methods}


def stage_eval(args, out: Path) -> None:
    shared = args.shared
    benchmarks = {
        "counterfact": lambda: CounterFactDataModule(
            f"{shared}/counterfact", example_subset="5000:5500", batch_size=64
        ),
        "biasbios": lambda: BiasBiosDataModule(f"{shared}/biasbios_subset", max_new_tokens=64, batch_size=64),
        "pronchange": lambda: PronChangeDataModule(
            f"{shared}/biasbios_subset", example_subset=args.pron_subset, batch_size=100
        ),
        "lost_in_the_middle": lambda: LostInTheMiddleDataModule(
            f"{shared}/lost_in_the_middle/nq-open-oracle.jsonl.gz", example_subset="0:300", batch_size=args.litm_batch
        ),
    }
    for benchmark in args.benchmarks:
        for name, method in methods(args, out, long_context=benchmark == "lost_in_the_middle").items():
            target = out / "results" / benchmark / args.tag / name
            if (target / "metric_result.json").exists():
                continue
            started = time.perf_counter()
            evaluator = BenchmarkEvaluator(args.model, method, add_special_tokens=args.bos)
            trainer(callbacks=[BenchmarkWriter(str(target))]).predict(
                evaluator, datamodule=benchmarks[benchmark](), return_predictions=False
            )
            log.info("%s / %s / %s: %.1f s", benchmark, args.tag, name, time.perf_counter() - started)


STAGES = {
    "build": stage_build,
    "search": stage_search,
    "profile": stage_profile,
    "experts": stage_experts,
    "gate": stage_gate,
    "eval": stage_eval,
}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--out", default="outputs/run")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument(
        "--benchmarks", nargs="+", default=["counterfact", "biasbios", "pronchange", "lost_in_the_middle"]
    )
    parser.add_argument(
        "--methods", nargs="+", default=["none", "seka", "random", "pasta", "spa", "adaseka", "adaseka_gate"]
    )
    parser.add_argument("--search-layers", nargs="+", help="layer selections (default: all and three lastN)")
    parser.add_argument("--search-gains", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--search-min-diffs", nargs="+", type=float, default=[0.0, 0.02, 0.04, 0.06])
    parser.add_argument("--search-top-pcts", nargs="+", type=float, default=[0.9])
    parser.add_argument("--search-from", help="a search JSON written earlier: copy it instead of searching")
    parser.add_argument("--pron-subset", default="0:200")
    parser.add_argument("--litm-batch", type=int, default=64)
    parser.add_argument("--pasta-top-k", type=int, default=16)
    parser.add_argument("--bos", action="store_true", help="let the tokenizer add BOS (base models such as Gemma-3)")
    args = parser.parse_args()
    args.layers = cached_load_model(args.model)[0].config.get_text_config().num_hidden_layers
    frozen_module.load_model = cached_load_model  # one model load for every build and evaluation in this process
    out = Path(args.out)
    print(json.dumps({k: v for k, v in vars(args).items()}, indent=1), flush=True)
    for stage in args.stages:
        started = time.perf_counter()
        STAGES[stage](args, out)
        log.info("stage %s done in %.1f s", stage, time.perf_counter() - started)


if __name__ == "__main__":
    main()
