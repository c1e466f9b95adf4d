"""The pipeline behind docs/results.md: every number comes from the shipped configs through `seka` commands.

    python scripts/results/run.py --jobs 6 --accelerator gpu            # everything, both models
    python scripts/results/run.py --dry-run                             # print the commands
    python scripts/results/run.py --stages final --methods none seka --benchmarks counterfact --limit 3

Stages, per model (each command's log in OUT/logs/; outputs that exist are skipped, so a re-run resumes):
  build   the SEKA bank (configs/build/<model>.yaml), the AdaSEKA expert banks (configs/adaseka/build/*.yaml) and
          the PASTA head set (`seka pasta-profile`) under OUT;
  dev     CounterFact dev (4500:5000) for unsteered, every bank x layers x gain x strength schedule
          (--length-scaling) of SEKA and (when --methods names adaseka) every layers x gain x strength schedule of
          AdaSEKA (--adaseka-layers, --adaseka-gains), then the generation guards (lost in the middle and PronChange dev
          splits) for unsteered and each grid's best candidates; a length-adaptive twin whose reference reaches the
          longest CounterFact dev highlight (counted with the model's tokenizer) shares its full-strength point's run;
  select  the rule of seka_lightning.selection on each grid's dev runs; writes configs/methods/<model>/{seka,
          key_scaling,random}.yaml (SEKA's choice), adaseka.yaml (AdaSEKA's own choice) and
          docs/results/dev/<model>.json (AdaSEKA's grid under its "adaseka" key).
          SEKA's grid is tuned unless adaseka is the only tuned method --methods names (then AdaSEKA's alone).
  final   the reported slices for every method from `-c configs/eval/<benchmark>.yaml -c configs/models/<model>.yaml
          -c configs/methods/<model>/<method>.yaml` into RESULTS/<benchmark>/<model>/<method>/; then `seka report`
          and `seka report --verify`.
Independent commands run concurrently (--jobs); a command waits for the ones whose outputs it reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from seka_lightning.evidence import METRIC_RESULT, PREDICTIONS, per_id_scores, read_predictions
from seka_lightning.files import atomic_path, write_json
from seka_lightning.report import default_table
from seka_lightning.selection import (
    EFFICACY,
    GUARDS,
    RULE,
    Candidate,
    Estimate,
    Selection,
    by_efficacy,
    guard_failures,
    guards_needed,
    select,
)
from seka_lightning.steering import check_length_scaling

log = logging.getLogger("results")

SEKA = (sys.executable, "-m", "seka_lightning.cli")
STAGES = ("build", "dev", "select", "final")
BENCHMARKS = ("counterfact", "lost_in_the_middle", "pronchange", "biasbios")
METHODS = ("none", "seka", "adaseka", "key_scaling", "random", "pasta", "spa")
TUNED = ("seka", "key_scaling", "random", "adaseka")  # written by the select stage
GRID_METHODS = {"seka": ("seka", "key_scaling", "random"), "adaseka": ("adaseka",)}  # the configs a dev grid tunes
PROMPT_ONLY = ("none", "seka", "key_scaling", "random", "adaseka")  # may decode through --static-decoding
GENERATION = ("lost_in_the_middle", "pronchange", "biasbios")
EXPERT_SOURCES = ("synthetic_qa", "counterfact", "biasbios", "lost_in_the_middle")
RANDOM_SEEDS = (0, 1, 2)
GAINS = (1.0, 2.0, 4.0, 8.0, 16.0)
# AdaSEKA's edit g k P mixes up to four experts with max |c_m| = 1 (SPEC section 5): stronger than SEKA's at one gain
ADASEKA_GAINS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# --guards names -> (the dev benchmark run, the metric the rule guards); the rule's default guards are the first two.
# lost_in_the_middle_outside (opt-in) guards the documents outside the highlight with the same lost-in-the-middle runs.
GUARD_BENCHMARKS = {
    "lost_in_the_middle": ("lost_in_the_middle", "exact_match_inside"),
    "pronchange": ("pronchange", "pron_mean_p"),
    "lost_in_the_middle_outside": ("lost_in_the_middle", "exact_match_outside"),
}
DEFAULT_GUARDS = ("lost_in_the_middle", "pronchange")
HIGHLIGHT_LENGTHS = "longest_highlight.json"  # OUT/dev/<model>/counterfact/: the dev highlights' token counts
assert tuple(GUARD_BENCHMARKS[name][1] for name in DEFAULT_GUARDS) == GUARDS


@dataclass(frozen=True)
class BankVariant:
    """A SEKA bank the dev grid searches beside the model's shipped build (``configs/build/<model>.yaml``): built
    from another config (``config``, ``{tag}`` = the model's tag) or derived, with ``seka derive``, from the shipped
    bank's statistics with another ``top_pct`` (every other building setting as shipped)."""

    name: str
    description: str
    config: str | None = None
    top_pct: float | None = None


BANK_VARIANTS = {
    "p95": BankVariant("p95", "the shipped build's statistics, P+ keeping top_pct 0.95", top_pct=0.95),
    "chat95": BankVariant(
        "chat95", "building texts in the chat template, top_pct 0.95", config="configs/build/{tag}-chat.yaml"
    ),
}


@dataclass(frozen=True)
class Model:
    """An evaluated model: its folder tag, hub id, decoder depth (for the lastN layer grid) and the bank variants
    (``BANK_VARIANTS``) its dev grid searches beside the shipped bank."""

    tag: str
    pretrained: str
    num_layers: int
    banks: tuple[str, ...] = ()

    @property
    def layer_grid(self) -> tuple[str, ...]:
        """``all`` and the last 2/3, 1/2 and 1/3 of the layers (SmolLM2's 30: last20/last15/last10)."""
        return ("all", *(f"last{round(self.num_layers * f)}" for f in (2 / 3, 1 / 2, 1 / 3)))


MODELS = {
    "smollm2-135m": Model("smollm2-135m", "embedded:smollm2-135m", 30, banks=("p95", "chat95")),
    "gemma3-270m": Model("gemma3-270m", "embedded:gemma3-270m", 18, banks=("p95",)),  # a base model: no chat template
}

# the records a reported slice (--test-slice, --counterfact-test) may come from: the test split, never dev records
TEST_RANGES = {"counterfact": (5000, 10000), "lost_in_the_middle": (0, 300), "pronchange": (0, 900)}

# split name (the DataModule's `split`) and the record range it names, for --limit slices
SLICES = {
    ("counterfact", "dev"): ("dev", 4500),
    ("counterfact", "test"): ("test", 5000),
    ("lost_in_the_middle", "dev"): ("dev", 2555),
    ("lost_in_the_middle", "test"): ("test", 0),
    ("pronchange", "dev"): ("dev", 900),
    ("pronchange", "test"): ("test", 0),
    ("biasbios", "test"): (None, 0),  # the shared subset has no split: every row (never tuned on)
}


@dataclass
class Job:
    """One step: a `seka` command (``argv``) or an in-process ``action`` that may return more jobs.

    ``done`` is the output whose existence means the step already ran (skipped on a re-run); ``after`` names the jobs
    whose outputs it reads (they may be added later by an action); ``benchmark`` is the benchmark a `seka predict`
    job evaluates (--max-running caps how many of one benchmark run at once)."""

    name: str
    argv: tuple[str, ...] | None = None
    action: Callable[[], list[Job]] | None = None
    after: tuple[str, ...] = ()
    done: Path | None = None
    note: str = ""
    benchmark: str = ""


@dataclass
class Settings:
    """What the command line chose."""

    models: list[Model]
    stages: list[str]
    benchmarks: list[str]
    methods: list[str]
    out: Path
    results: Path
    shared_data: Path
    accelerator: str
    limit: int | None
    gains: list[float]
    guard_top: int
    guards: list[str] = field(default_factory=lambda: list(DEFAULT_GUARDS))
    table: Path = Path("docs/results_table.md")
    batch_sizes: dict[str, int] = field(default_factory=dict)
    test_slices: dict[str, str] = field(default_factory=dict)
    static_decoding: dict[str, int] = field(default_factory=dict)
    banks: list[str] | None = None
    adaseka_gains: list[float] = field(default_factory=lambda: list(ADASEKA_GAINS))
    adaseka_layers: list[str] | None = None
    # SEKA's strength schedules in the grid: None (full strength) and/or (length_reference, length_power)
    length_scalings: list[tuple[int, float] | None] = field(default_factory=lambda: [None])
    # at most this many `seka predict` commands of a benchmark at once (--max-running), e.g. lost_in_the_middle: 4
    max_running: dict[str, int] = field(default_factory=dict)

    def adaseka_layer_options(self, model: Model) -> list[str]:
        """The layer choices of ``model``'s AdaSEKA grid: its lastN grid, or the part of it --adaseka-layers names."""
        return [layers for layers in model.layer_grid if self.adaseka_layers is None or layers in self.adaseka_layers]

    def tuned_grids(self) -> list[str]:
        """The dev grids tuned (``seka``, ``adaseka``): AdaSEKA's when --methods names it; SEKA's (whose choice seka,
        key_scaling and random share) unless adaseka is the only tuned method named."""
        named = [method for method in TUNED if method in self.methods]
        return [grid for grid, on in (("seka", named != ["adaseka"]), ("adaseka", "adaseka" in named)) if on]

    def bank_variants(self, model: Model) -> list[str]:
        """The banks ``model``'s dev grid searches: ``""`` (the shipped one) and its variants chosen by --banks."""
        return ["", *(b for b in model.banks if self.banks is None or b in self.banks)]


def seka(*args: str | Path) -> tuple[str, ...]:
    """The argv of one `seka` command (``python -m seka_lightning.cli``)."""
    return (*SEKA, *(str(a) for a in args))


def bank_path(s: Settings, model: Model, variant: str = "") -> Path:
    """The shipped bank ``OUT/banks/<model>.safetensors``, a variant's ``OUT/banks/<variant>/<model>.safetensors``."""
    folder = s.out / "banks" / variant if variant else s.out / "banks"
    return folder / f"{model.tag}.safetensors"


def bank_step(variant: str) -> str:
    """The build step of a bank: ``seka`` for the shipped one, ``bank-<variant>`` for a variant."""
    return f"bank-{variant}" if variant else "seka"


def bank_job(model: Model, variant: str) -> str:
    return f"build:{model.tag}:{bank_step(variant)}"


def expert_path(s: Settings, model: Model, source: str) -> Path:
    return s.out / "experts" / model.tag / f"{source}.safetensors"


def expert_paths(s: Settings, model: Model) -> dict[str, str]:
    """AdaSEKA's experts of ``model``: source name -> bank path."""
    return {source: str(expert_path(s, model, source)) for source in EXPERT_SOURCES}


def expert_step(source: str) -> str:
    """The build step of the AdaSEKA expert built from ``source``."""
    return f"expert-{source}"


def expert_jobs(model: Model) -> tuple[str, ...]:
    """The build jobs of ``model``'s AdaSEKA experts."""
    return tuple(f"build:{model.tag}:{expert_step(source)}" for source in EXPERT_SOURCES)


def pasta_path(s: Settings, model: Model) -> Path:
    return s.out / "pasta" / f"{model.tag}.json"


def log_path(s: Settings, name: str) -> Path:
    return s.out / "logs" / (name.replace(":", "__") + ".log")


def method_config(model: Model, method: str) -> Path:
    return Path("configs") / "methods" / model.tag / f"{method}.yaml"


# ---------------------------------------------------------------------------------------------------------- build


def build_jobs(s: Settings, model: Model) -> list[Job]:
    """The SEKA bank, the AdaSEKA experts and the PASTA head set of ``model``."""
    trainer = ("--trainer.accelerator", s.accelerator)
    samples = ("--data.max_samples", str(s.limit)) if s.limit else ()
    jobs = [
        Job(
            f"build:{model.tag}:seka",
            seka(
                "fit",
                "-c",
                f"configs/build/{model.tag}.yaml",
                "--model.output",
                bank_path(s, model),
                *trainer,
                "--trainer.callbacks.dirpath",
                s.out / "resume" / model.tag / "seka",
                *samples,
            ),
            done=bank_path(s, model),
        )
    ]
    for source in EXPERT_SOURCES:
        jobs.append(
            Job(
                f"build:{model.tag}:{expert_step(source)}",
                seka(
                    "fit",
                    "-c",
                    f"configs/adaseka/build/{source}.yaml",
                    "--model.pretrained",
                    model.pretrained,
                    "--model.output",
                    expert_path(s, model, source),
                    *trainer,
                    "--trainer.callbacks.dirpath",
                    s.out / "resume" / model.tag / source,
                    *samples,
                    *_expert_data_path(s, source),
                ),
                done=expert_path(s, model, source),
            )
        )
    profile = seka(
        "pasta-profile",
        "--pretrained",
        model.pretrained,
        "--output",
        pasta_path(s, model),
        "--add_special_tokens",
        str(add_special_tokens(model)).lower(),
        *(("--device", "cuda") if s.accelerator == "gpu" else ("--device", "cpu") if s.accelerator == "cpu" else ()),
        *(("--max_samples", str(s.limit)) if s.limit else ()),
        *("--batch_size", "64", "--heads_per_pass", "8"),  # batching only: fewer passes, same scores up to rounding
    )
    jobs.append(Job(f"build:{model.tag}:pasta", profile, done=pasta_path(s, model)))
    return jobs + [variant_job(s, model, BANK_VARIANTS[v]) for v in model.banks]


def variant_job(s: Settings, model: Model, variant: BankVariant) -> Job:
    """Build a bank variant: ``seka fit`` on its config, or ``seka derive`` from the shipped bank's statistics."""
    output = bank_path(s, model, variant.name)
    if variant.config is not None:
        argv = seka(
            "fit",
            "-c",
            variant.config.format(tag=model.tag),
            "--model.output",
            output,
            "--trainer.accelerator",
            s.accelerator,
            "--trainer.callbacks.dirpath",
            s.out / "resume" / model.tag / variant.name,
            *(("--data.max_samples", str(s.limit)) if s.limit else ()),
        )
        return Job(bank_job(model, variant.name), argv, done=output)
    shipped = yaml.safe_load((Path("configs") / "build" / f"{model.tag}.yaml").read_text())["model"]["init_args"]
    kept = [(f"--{key}", str(shipped[key])) for key in ("min_diff", "head_filter") if key in shipped]
    argv = seka(
        "derive",
        "--stats",
        bank_path(s, model).with_suffix(".stats.safetensors"),  # seka fit's statistics beside the shipped bank
        "--output",
        output,
        "--top_pct",
        f"{variant.top_pct:g}",
        *(item for pair in kept for item in pair),
    )
    after = (bank_job(model, ""),) if "build" in s.stages else ()
    return Job(bank_job(model, variant.name), argv, after=after, done=output)


def _expert_data_path(s: Settings, source: str) -> tuple[str, ...]:
    paths = {
        "counterfact": s.shared_data / "counterfact",
        "biasbios": s.shared_data / "biasbios_subset",
        "lost_in_the_middle": s.shared_data / "lost_in_the_middle" / "nq-open-oracle.jsonl.gz",
    }
    return ("--data.path", str(paths[source])) if source in paths else ()


def model_setting(model: Model, key: str) -> bool:
    """A boolean encoding setting of the model config (``chat``; ``add_special_tokens``: Gemma-3 needs its BOS
    token), so that PASTA profiles and highlights are counted as the evaluator encodes."""
    config = yaml.safe_load((Path("configs") / "models" / f"{model.tag}.yaml").read_text())
    return bool(config["model"]["init_args"].get(key, False))


def add_special_tokens(model: Model) -> bool:
    return model_setting(model, "add_special_tokens")


# ---------------------------------------------------------------------------------------------------- evaluations


def data_args(s: Settings, benchmark: str, split: str, method: str = "") -> tuple[str, ...]:
    """The data options of one benchmark slice (the named split, a --test-slice, or its first --limit records) and
    the batch size --batch-size gives the benchmark (``BENCHMARK.METHOD`` before ``BENCHMARK``)."""
    name, start = SLICES[(benchmark, split)]
    paths = {
        "counterfact": s.shared_data / "counterfact",
        "lost_in_the_middle": s.shared_data / "lost_in_the_middle" / "nq-open-oracle.jsonl.gz",
        "pronchange": s.shared_data / "biasbios_subset",
        "biasbios": s.shared_data / "biasbios_subset",
    }
    args = ["--data.path", str(paths[benchmark])]
    if split == "test" and benchmark in s.test_slices:
        subset: str | None = s.test_slices[benchmark]
    else:
        subset = f"{start}:{start + s.limit}" if s.limit else None
    if name is not None:
        args += ["--data.split", "null" if subset else name]
    args += ["--data.example_subset", subset or "null"]
    batch = s.batch_sizes.get(f"{benchmark}.{method}", s.batch_sizes.get(benchmark))
    if batch is not None:
        args += ["--data.batch_size", str(batch)]
    return tuple(args)


def predict(
    s: Settings, model: Model, benchmark: str, split: str, output: Path, *method: str | Path, name: str
) -> tuple[str, ...]:
    """`seka predict` of one method (``name``, e.g. ``seka``; its options ``method``) on one benchmark slice, writing
    ``output``; through the compiled static-cache decoder where --static-decoding names the benchmark and the method
    acts on the prompt pass only."""
    static = s.static_decoding.get(benchmark) if name in PROMPT_ONLY else None
    return seka(
        "predict",
        "-c",
        f"configs/eval/{benchmark}.yaml",
        "-c",
        f"configs/models/{model.tag}.yaml",
        *method,
        "--trainer.accelerator",
        s.accelerator,
        "--trainer.callbacks.output_dir",
        output,
        *data_args(s, benchmark, split, name),
        *(("--model.static_decoding", str(static)) if static else ()),
    )


def dev_dir(s: Settings, model: Model, benchmark: str, name: str) -> Path:
    return s.out / "dev" / model.tag / benchmark / name


def length_args(candidate: Candidate) -> list[str]:
    """The options of a candidate's length-adaptive strength (none at full strength)."""
    return [arg for key, value in candidate.length_settings().items() for arg in (f"--model.method.{key}", str(value))]


def seka_args(s: Settings, model: Model, candidate: Candidate) -> tuple[str, ...]:
    layers, gain = candidate.layers, candidate.gain
    return (
        "--model.method",
        "SekaMethod",
        "--model.method.bank",
        str(bank_path(s, model, candidate.bank)),
        "--model.method.gain_pos",
        f"{gain:g}",
        "--model.method.layers",
        layers,
        *length_args(candidate),
    )


def adaseka_args(s: Settings, model: Model, candidate: Candidate) -> tuple[str, ...]:
    return (
        "--model.method",
        "AdaSekaMethod",
        "--model.method.experts",
        json.dumps(expert_paths(s, model)),
        "--model.method.gain",
        f"{candidate.gain:g}",
        "--model.method.layers",
        candidate.layers,
        *length_args(candidate),
    )


def dev_run(s: Settings, model: Model, benchmark: str, candidate: Candidate | None) -> Job:
    """One dev run: unsteered (``candidate`` None), SEKA at a candidate's bank, layers and gain, or AdaSEKA (a
    candidate of its grid) at its layers and gain."""
    name = "none" if candidate is None else candidate.name
    output = dev_dir(s, model, benchmark, name)
    after: tuple[str, ...] = ()
    if candidate is None:
        method, method_name = ("-c", method_config(model, "none")), "none"
    elif candidate.method == "adaseka":
        method, method_name, after = adaseka_args(s, model, candidate), "adaseka", expert_jobs(model)
    else:
        method, method_name, after = seka_args(s, model, candidate), "seka", (bank_job(model, candidate.bank),)
    after = after if "build" in s.stages else ()
    return Job(
        f"dev:{model.tag}:{benchmark}:{name}",
        predict(s, model, benchmark, "dev", output, *method, name=method_name),
        after=after,
        done=output / METRIC_RESULT,
        benchmark=benchmark,
    )


def dev_jobs(s: Settings, model: Model) -> list[Job]:
    """CounterFact dev for unsteered and the tuned grids; then the first round of guard runs.

    A length-adaptive twin (--length-scaling) gets its own CounterFact dev run only where it can score differently
    from its full-strength point: once the highlight lengths are counted (:func:`length_twin_jobs`), a twin whose
    ``length_reference`` is at least the longest CounterFact dev highlight edits every prompt at full strength, so
    it shares its full-strength point's runs instead."""
    points = [c for tuned in s.tuned_grids() for c in grid(s, model, tuned)]
    twins = [c for c in points if c.length_reference is not None]
    jobs = [dev_run(s, model, "counterfact", None)]
    jobs += [dev_run(s, model, "counterfact", c) for c in points if c.length_reference is None]
    if not twins:
        return [*jobs, guard_round_job(s, model, after=tuple(job.name for job in jobs))]
    first = tuple(job.name for job in jobs)
    jobs.append(
        Job(
            f"dev:{model.tag}:highlight-lengths",
            action=lambda: length_twin_jobs(s, model, twins, after=first),
            note="count the highlighted tokens of each CounterFact dev prompt (the model's tokenizer); then the "
            "CounterFact dev runs of the length-adaptive twins that can score differently, and the guard runs",
        )
    )
    return jobs


def guard_round_job(s: Settings, model: Model, *, after: tuple[str, ...]) -> Job:
    return Job(
        f"dev:{model.tag}:guard-round-0",
        action=lambda: guard_round(s, model, 0),
        after=after,
        note=f"guard runs (lost in the middle, PronChange dev) for none and, {s.guard_top} at a time, the "
        "candidates that can change the choice",
    )


def length_twin_jobs(s: Settings, model: Model, twins: list[Candidate], *, after: tuple[str, ...]) -> list[Job]:
    """Count the CounterFact dev highlights (:func:`count_highlight_lengths`); the dev runs of the ``twins`` whose
    ``length_reference`` is below the longest; guard round 0 after them and ``after``."""
    longest = count_highlight_lengths(s, model)["longest"]
    shared = None in s.length_scalings  # a twin can share only a full-strength run the grid itself makes
    runs = [dev_run(s, model, "counterfact", c) for c in twins if not shared or c.length_reference < longest]
    check_stale_results(runs)
    log.info(
        "%s: longest CounterFact dev highlight %d tokens: %d of %d length-adaptive twins get their own runs",
        model.tag,
        longest,
        len(runs),
        len(twins),
    )
    return [*runs, guard_round_job(s, model, after=(*after, *(job.name for job in runs)))]


def highlight_lengths_path(s: Settings, model: Model) -> Path:
    return s.out / "dev" / model.tag / "counterfact" / HIGHLIGHT_LENGTHS


def load_tokenizer(model: Model):
    """The model's tokenizer (the embedded models load from their converted cache)."""
    from seka_lightning.models import load_model

    return load_model(model.pretrained)[1]


def counterfact_dev_examples(s: Settings) -> list[dict]:
    """The CounterFact dev prompts as the dev runs read them (the named split or its first --limit records)."""
    from seka_lightning.benchmarks import CounterFactDataModule
    from seka_lightning.benchmarks.base import as_dict

    name, start = SLICES[("counterfact", "dev")]
    subset = f"{start}:{start + s.limit}" if s.limit else None
    data = CounterFactDataModule(
        str(s.shared_data / "counterfact"), split=None if subset else name, example_subset=subset
    )
    return [as_dict(example) for example in data.examples]


def count_highlight_lengths(s: Settings, model: Model) -> dict:
    """The highlighted tokens of each CounterFact dev prompt, encoded as the evaluator encodes it (the model's
    tokenizer and its config's ``chat`` / ``add_special_tokens``; a prompt whose highlight cannot be encoded is
    skipped, as a run skips it); the longest and the counts are written to
    ``OUT/dev/<model>/counterfact/longest_highlight.json`` and returned."""
    from seka_lightning.benchmarks import encode_examples

    context = count_context(s, model)
    encoding = context["encoding"]
    tokenizer = load_tokenizer(model)
    lengths, skipped = [], []
    for example in counterfact_dev_examples(s):
        try:
            enc = encode_examples(tokenizer, [example], **encoding)
        except ValueError:
            skipped.append(example["uid"])
            continue
        lengths.append(int(enc["highlight_mask"].sum()))
    if not lengths:
        raise ValueError(f"{model.tag}: no CounterFact dev prompt could be encoded; check --shared-data")
    record = {
        **context,
        "prompts": len(lengths),
        "skipped": skipped,
        "longest": max(lengths),
    }
    write_json(highlight_lengths_path(s, model), record)
    return record


def highlight_summary(s: Settings, model: Model) -> dict | str:
    """The dev table's record of the counted CounterFact dev highlights (why twins share full-strength runs)."""
    counted = highlight_count(s, model)
    if counted is None:
        return "not counted: every length-adaptive twin has its own CounterFact dev run"
    return {
        "slice": counted["slice"],
        "encoding": counted["encoding"],
        "longest": counted["longest"],
        "prompts": counted["prompts"],
        "skipped": len(counted["skipped"]),
        "rule": "a length-adaptive twin whose length_reference is at least the longest highlight edits every "
        "CounterFact dev prompt at full strength, so it is scored by its full-strength point's run "
        "(counterfact_dev_run)",
    }


def full_strength(candidate: Candidate) -> Candidate:
    """The full-strength grid point of a length-adaptive twin."""
    return replace(candidate, length_reference=None, length_power=1.0, metrics={})


def shares_full_strength_runs(s: Settings, model: Model, candidate: Candidate) -> bool:
    """Whether ``candidate`` is a length-adaptive twin without its own CounterFact dev run whose reference is at
    least the longest counted CounterFact dev highlight (so it scores every prompt as its full-strength point)."""
    if (
        candidate.length_reference is None
        or None not in s.length_scalings
        or (dev_dir(s, model, "counterfact", candidate.name) / METRIC_RESULT).exists()
    ):
        return False
    counted = highlight_count(s, model)
    return counted is not None and counted["longest"] <= candidate.length_reference


def count_context(s: Settings, model: Model) -> dict:
    """What a highlight count must have been made with to hold for this run: the model, the slice, the encoding."""
    return {
        "model": model.pretrained,
        "slice": f"{dev_label(s)} (records 4500:5000)",
        "encoding": {key: model_setting(model, key) for key in ("chat", "add_special_tokens")},
    }


def dev_label(s: Settings) -> str:
    """How the dev table and the highlight count name the dev slices (``dev``, or its first --limit records)."""
    return "dev" if not s.limit else f"first {s.limit} of dev"


def highlight_count(s: Settings, model: Model) -> dict | None:
    """The written highlight count when it was made for this model, slice and encoding (else None: a count from
    another --limit or model config never lets a twin share a run)."""
    path = highlight_lengths_path(s, model)
    if not path.exists():
        return None
    counted = json.loads(path.read_text())
    context = count_context(s, model)
    return counted if all(counted.get(key) == value for key, value in context.items()) else None


def grid(s: Settings, model: Model, method: str = "seka") -> list[Candidate]:
    """A dev grid, in order (no estimates): SEKA's every bank variant x layer choice x gain x strength schedule
    (--length-scaling; each length-adaptive point right after its full-strength one, so a tie goes to full strength),
    or AdaSEKA's every layer choice x gain x strength schedule (its four experts in each)."""
    if method == "adaseka":
        return [
            Candidate(layers, gain, method="adaseka", **length_options(scaling))
            for layers in s.adaseka_layer_options(model)
            for gain in s.adaseka_gains
            for scaling in s.length_scalings
        ]
    return [
        Candidate(layers, gain, bank=bank, **length_options(scaling))
        for bank in s.bank_variants(model)
        for layers in model.layer_grid
        for gain in s.gains
        for scaling in s.length_scalings
    ]


def length_options(scaling: tuple[int, float] | None) -> dict[str, int | float]:
    """A strength schedule of --length-scaling as Candidate fields (none: full strength)."""
    return {} if scaling is None else {"length_reference": scaling[0], "length_power": scaling[1]}


def guard_round(s: Settings, model: Model, number: int) -> list[Job]:
    """One round of guard runs (lost in the middle and PronChange dev) and the action planning the next round.

    Round 0 runs unsteered and each tuned grid's ``guard_top`` best CounterFact candidates; later rounds (and round
    0 of a resumed run, whose unsteered guard runs exist) the candidates :func:`guards_needed` names in each grid,
    until every grid's choice is settled (then the ``dev:<model>:guards`` marker)."""
    grids = [dev_candidates(s, model, tuned) for tuned in s.tuned_grids()]
    jobs = [dev_run(s, model, benchmark, None) for benchmark in guard_benchmarks(s)] if number == 0 else []
    check_stale_results(jobs)
    if all(job.done is not None and job.done.exists() for job in jobs):
        baseline, guards = baseline_estimates(s, model), guard_metrics(s)
        needed = [c for cs in grids for c in guards_needed(cs, baseline, limit=s.guard_top, guards=guards)]
    else:
        needed = [c for candidates in grids for c in by_efficacy(candidates)[: s.guard_top]]
    if not needed:
        return [Job(f"dev:{model.tag}:guards", action=list)]
    log.info("%s: guard round %d for %s", model.tag, number, [c.name for c in needed])
    jobs += [dev_run(s, model, b, c) for c in needed for b in guard_benchmarks(s)]
    after = tuple(job.name for job in jobs)
    jobs.append(
        Job(f"dev:{model.tag}:guard-round-{number + 1}", action=lambda: guard_round(s, model, number + 1), after=after)
    )
    return jobs


def read_estimate(folder: Path, metric: str) -> Estimate:
    """The mean and SE of ``metric`` over the example ids of one run's predictions."""
    return Estimate.from_scores(per_id_scores(read_predictions(folder / PREDICTIONS), metric).values())


def guard_metrics(s: Settings) -> list[str]:
    """The guard metrics the rule applies (``--guards``)."""
    return [GUARD_BENCHMARKS[name][1] for name in s.guards]


def guard_benchmarks(s: Settings) -> list[str]:
    """The dev benchmarks the guards of ``--guards`` read, each once, in order."""
    return list(dict.fromkeys(GUARD_BENCHMARKS[name][0] for name in s.guards))


def dev_candidates(s: Settings, model: Model, method: str = "seka") -> list[Candidate]:
    """A grid's candidates (:func:`grid`) with their CounterFact dev efficacy and, where run, their guard metrics."""
    candidates = []
    for point in grid(s, model, method):
        source = full_strength(point) if shares_full_strength_runs(s, model, point) else point
        folder = dev_dir(s, model, "counterfact", source.name)
        if point.length_reference is not None and not (folder / METRIC_RESULT).exists():
            raise FileNotFoundError(
                f"{point.name} has no CounterFact dev run and no highlight count for this model and slice lets it "
                f"share {full_strength(point).name}'s ({highlight_lengths_path(s, model)}); run the dev stage "
                "(--stages dev select), which counts the highlights and runs the twins that need their own runs"
            )
        metrics = {EFFICACY: read_estimate(folder, EFFICACY)}
        for name in dict.fromkeys([*DEFAULT_GUARDS, *s.guards]):  # the default guards' metrics even where not applied
            benchmark, metric = GUARD_BENCHMARKS[name]
            folder = dev_dir(s, model, benchmark, point.name)
            if (folder / METRIC_RESULT).exists():
                metrics[metric] = read_estimate(folder, metric)
        candidates.append(replace(point, metrics=metrics))
    return candidates


# -------------------------------------------------------------------------------------------------------- select


def baseline_estimates(s: Settings, model: Model) -> dict[str, Estimate]:
    estimates = {EFFICACY: read_estimate(dev_dir(s, model, "counterfact", "none"), EFFICACY)}
    for name in s.guards:
        benchmark, metric = GUARD_BENCHMARKS[name]
        estimates[metric] = read_estimate(dev_dir(s, model, benchmark, "none"), metric)
    return estimates


def select_job(s: Settings, model: Model) -> Job:
    after = (f"dev:{model.tag}:guards",) if "dev" in s.stages else ()
    written = [method_config(model, m) for tuned in s.tuned_grids() for m in GRID_METHODS[tuned]]
    return Job(
        f"select:{model.tag}",
        action=lambda: write_selection(s, model),
        after=after,
        note=f"write {', '.join(map(str, written))} and docs/results/dev/{model.tag}.json",
    )


def write_selection(s: Settings, model: Model) -> list[Job]:
    """Apply the rule to each tuned grid's dev runs; write the configs of each grid with an admissible candidate and
    the dev table (also when a grid has none, so the reasons can be read; then the error names that grid)."""
    baseline = baseline_estimates(s, model)
    candidates = {tuned: dev_candidates(s, model, tuned) for tuned in s.tuned_grids()}
    selections: dict[str, Selection | None] = {}
    errors = []
    for tuned, points in candidates.items():
        try:
            selections[tuned] = select(points, baseline, guards=guard_metrics(s))
        except ValueError as error:
            selections[tuned] = None
            errors.append(f"{'AdaSEKA (--adaseka-gains, --adaseka-layers)' if tuned == 'adaseka' else 'SEKA'}: {error}")
            continue
        chosen = selections[tuned].chosen
        log.info("%s: %s chose %s (best admissible %s)", model.tag, tuned, chosen.name, selections[tuned].best.name)
        if tuned == "seka":
            texts = seka_configs(s, model, chosen.layers, chosen.gain, chosen.bank, chosen.length_settings())
        else:
            texts = {"adaseka": adaseka_config(s, model, chosen.layers, chosen.gain, chosen.length_settings())}
        for method, text in texts.items():
            with atomic_path(method_config(model, method)) as tmp:
                tmp.write_text(text)
    write_dev_table(s, model, candidates, baseline, selections)
    if errors:
        raise ValueError("; ".join(errors))
    return []


def candidate_rows(s: Settings, model: Model, candidates: list[Candidate], baseline: dict[str, Estimate]) -> list[dict]:
    """The dev table's rows of one grid: each candidate's settings, dev estimates and guard verdict; a length-adaptive
    twin scored by its full-strength point's CounterFact dev run says so (``counterfact_dev_run``)."""
    rows = []
    for c in candidates:
        rejected = guard_failures(c, baseline, guard_metrics(s))
        shared = {"counterfact_dev_run": full_strength(c).name} if shares_full_strength_runs(s, model, c) else {}
        rows.append(
            {
                "name": c.name,
                **({} if c.method else {"bank": c.bank or "shipped"}),
                "layers": c.layers,
                "gain": c.gain,
                **c.length_settings(),
                "metrics": {metric: e.to_dict() for metric, e in c.metrics.items()},
                **shared,
                "admissible": not rejected,
                "rejected": rejected,
            }
        )
    return rows


def choice(selection: Selection | None) -> tuple[str | None, dict | None]:
    """The dev table's ``best`` and ``chosen`` entries of one grid's selection (None when nothing is admissible)."""
    if selection is None:
        return None, None
    chosen = selection.chosen
    bank = {} if chosen.method else {"bank": chosen.bank or "shipped"}
    settings = {"layers": chosen.layers, "gain": chosen.gain, **chosen.length_settings()}
    return selection.best.name, {"name": chosen.name, **bank, **settings}


def write_dev_table(
    s: Settings,
    model: Model,
    candidates: dict[str, list[Candidate]],
    baseline: dict[str, Estimate],
    selections: dict[str, Selection | None],
) -> None:
    """``RESULTS/dev/<model>.json``: the slices, the rule, every candidate's dev estimates and guard verdict, the choice;
    SEKA's grid at the top level, AdaSEKA's under ``adaseka`` (with its own slices, guards and baseline). A grid not
    tuned by this run keeps its entries from the table already there."""
    path = s.results / "dev" / f"{model.tag}.json"
    table = json.loads(path.read_text()) if path.exists() else {"model": model.pretrained}
    dev = dev_label(s)
    baseline_row = {metric: e.to_dict() for metric, e in baseline.items()}
    context = {
        "rule": RULE,
        "guards": guard_metrics(s),
        "guards_not_applied": [GUARD_BENCHMARKS[name][1] for name in DEFAULT_GUARDS if name not in s.guards],
        "slices": {
            "counterfact": f"{dev} (records 4500:5000)",
            "lost_in_the_middle": f"{dev} (questions 2555:2655) x 7 gold positions",
            "pronchange": f"{dev} (bios 900:1000)",
        },
    }
    # the schedules of the grids and the highlight count that let a twin share its full-strength point's run
    length_record = (
        {
            "length_scalings": [length_options(x) or "full" for x in s.length_scalings],
            "counterfact_highlights": highlight_summary(s, model),
        }
        if s.length_scalings != [None]
        else {}
    )
    if "seka" in candidates:
        best, chosen = choice(selections["seka"])
        kept = {"adaseka": table["adaseka"]} if "adaseka" in table and "adaseka" not in candidates else {}
        table = {
            "model": model.pretrained,
            **context,
            "banks": {
                "shipped": f"configs/build/{model.tag}.yaml",
                **{v: BANK_VARIANTS[v].description for v in s.bank_variants(model) if v},
            },
            **length_record,
            "baseline": baseline_row,
            "candidates": candidate_rows(s, model, candidates["seka"], baseline),
            "best": best,
            "chosen": chosen,
            **kept,
        }
    if "adaseka" in candidates:
        best, chosen = choice(selections["adaseka"])
        table["adaseka"] = {
            **context,
            "experts": expert_paths(s, model),
            "layer_options": s.adaseka_layer_options(model),
            "gains": s.adaseka_gains,
            **length_record,
            "baseline": baseline_row,
            "candidates": candidate_rows(s, model, candidates["adaseka"], baseline),
            "best": best,
            "chosen": chosen,
        }
    write_json(path, table)


def config_text(model: Model, method: dict) -> str:
    """A tuned method's YAML fragment, with the header saying where it came from."""
    header = (
        f"# {model.tag}: chosen on dev data by scripts/results/run.py (select stage; rule in "
        f"src/seka_lightning/selection.py, table in docs/results/dev/{model.tag}.json). Written by the script.\n"
    )
    return header + yaml.safe_dump({"model": {"init_args": {"method": method}}}, sort_keys=False)


def seka_configs(
    s: Settings, model: Model, layers: str, gain: float, variant: str = "", length: dict | None = None
) -> dict[str, str]:
    """The YAML fragments of SEKA and its ablations (same bank, layers, gain and strength schedule: ``length``, the
    ``length_reference`` / ``length_power`` options, or None for full strength)."""
    bank = str(bank_path(s, model, variant))
    settings = {"gain_pos": gain, "layers": layers, **(length or {})}
    methods = {
        "seka": {"class_path": "SekaMethod", "init_args": {"bank": bank, **settings}},
        "key_scaling": {"class_path": "KeyScalingMethod", "init_args": {"bank": bank, **settings}},
        "random": {"class_path": "RandomProjectionMethod", "init_args": {"bank": bank, **settings, "seed": 0}},
    }
    return {name: config_text(model, method) for name, method in methods.items()}


def adaseka_config(
    s: Settings, model: Model, layers: str, gain: float, length: dict[str, int | float] | None = None
) -> str:
    """The YAML fragment of AdaSEKA (its four experts) at the layers, gain and strength schedule its own grid chose."""
    init_args = {"experts": expert_paths(s, model), "gain": gain, "layers": layers, **(length or {})}
    return config_text(model, {"class_path": "AdaSekaMethod", "init_args": init_args})


# --------------------------------------------------------------------------------------------------------- final


def final_output(s: Settings, model: Model, benchmark: str, method: str, seed: int | None = None) -> Path:
    folder = s.results / benchmark / model.tag / method
    return folder if seed is None else folder / f"seed-{seed}"


def final_jobs(s: Settings, model: Model, benchmark: str, method: str) -> list[Job]:
    """The reported run(s) of one method on one benchmark (three seeds for the random ablation)."""
    config = method_config(model, "spa_long" if method == "spa" and benchmark == "lost_in_the_middle" else method)
    artifacts: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    if method in ("seka", "key_scaling", "random") and "select" in s.stages:
        needs = tuple(map(bank_step, s.bank_variants(model)))  # the config this run's select writes names the bank
    elif method in ("seka", "key_scaling", "random"):
        variant = configured_variant(model)
        artifacts, needs = ("--model.method.bank", str(bank_path(s, model, variant))), (bank_step(variant),)
    elif method == "adaseka":
        artifacts = ("--model.method.experts", json.dumps(expert_paths(s, model)))
        needs = tuple(map(expert_step, EXPERT_SOURCES))
    elif method == "pasta":
        artifacts, needs = ("--model.method.heads", str(pasta_path(s, model))), ("pasta",)
    after = tuple(f"build:{model.tag}:{n}" for n in needs) if "build" in s.stages else ()
    if method in TUNED and "select" in s.stages:
        after += (f"select:{model.tag}",)
    seeds: Sequence[int | None] = RANDOM_SEEDS if method == "random" else (None,)
    jobs = []
    for seed in seeds:
        output = final_output(s, model, benchmark, method, seed)
        extra = ("--model.method.seed", str(seed)) if seed is not None else ()
        name = f"final:{model.tag}:{benchmark}:{method}" + ("" if seed is None else f":seed-{seed}")
        argv = predict(s, model, benchmark, "test", output, "-c", config, *artifacts, *extra, name=method)
        jobs.append(Job(name, argv, after=after, done=output / METRIC_RESULT, benchmark=benchmark))
    return jobs


def configured_variant(model: Model) -> str:
    """The bank variant the tuned configs name (the folder of their bank, ``""`` for the shipped bank)."""
    path = method_config(model, "seka")
    if not path.exists():
        return ""  # check_method_configs refuses the run before anything starts
    config = yaml.safe_load(path.read_text())
    folder = Path(config["model"]["init_args"]["method"]["init_args"]["bank"]).parent.name
    if folder in BANK_VARIANTS and folder not in model.banks:
        raise ValueError(
            f"{path} names the bank variant {folder!r}, which {model.tag} does not have (its variants: "
            f"{list(model.banks)}); re-run the select stage (--stages dev select) to rewrite it"
        )
    return folder if folder in BANK_VARIANTS else ""


def report_jobs(s: Settings, after: tuple[str, ...]) -> list[Job]:
    """The table (and the lost-in-the-middle plot) of every run under RESULTS, then the check of every run."""
    plot = s.results / "lost_in_the_middle.png" if "lost_in_the_middle" in s.benchmarks else "null"
    report = seka("report", "--results", s.results, "--output", s.table, "--plot", plot, "--overwrite", "true")
    return [
        Job("report", report, after=after),
        Job("verify", seka("report", "--verify", "true", "--results", s.results), after=("report",)),
    ]


# ------------------------------------------------------------------------------------------------------ planning


def plan(s: Settings) -> list[Job]:
    """Every job of the chosen stages, models, benchmarks and methods."""
    jobs: list[Job] = []
    for model in s.models:
        if "build" in s.stages:
            wanted = {"seka"} | ({"pasta"} if "pasta" in s.methods else set())
            if ("dev" in s.stages or "select" in s.stages) and "seka" in s.tuned_grids():  # the grid's banks
                wanted |= set(map(bank_step, s.bank_variants(model)))
            if "final" in s.stages and "select" not in s.stages:
                wanted.add(bank_step(configured_variant(model)))  # the bank the tuned configs name
            wanted |= set(map(expert_step, EXPERT_SOURCES)) if "adaseka" in s.methods else set()
            jobs += [job for job in build_jobs(s, model) if job.name.split(":")[-1] in wanted]
        if "dev" in s.stages:
            jobs += dev_jobs(s, model)
        if "select" in s.stages:
            jobs.append(select_job(s, model))
        if "final" in s.stages:
            jobs += [job for b in s.benchmarks for m in s.methods for job in final_jobs(s, model, b, m)]
    if "final" in s.stages:
        jobs += report_jobs(s, tuple(job.name for job in jobs if job.name.startswith("final:")))
    return jobs


def check_stale_results(jobs: list[Job]) -> None:
    """Refuse result folders holding a ``metric_result.json`` without its predictions (an earlier pipeline's run):
    they are neither evidence (``seka report --verify`` fails on them) nor safe to skip or overwrite silently."""
    stale = [
        str(job.done.parent)
        for job in jobs
        if job.done is not None
        and job.done.name == METRIC_RESULT
        and job.done.exists()
        and not (job.done.parent / PREDICTIONS).exists()
    ]
    if stale:
        raise FileExistsError(
            f"{len(stale)} result folders hold a {METRIC_RESULT} without {PREDICTIONS} (an earlier run), e.g. "
            f"{', '.join(stale[:3])}; remove them (git rm -r) or write elsewhere with --results"
        )


def check_method_configs(s: Settings) -> None:
    """Refuse a final stage whose tuned method configs neither exist nor come from this run's select stage."""
    if "final" not in s.stages or "select" in s.stages:
        return
    missing = [
        str(method_config(model, method))
        for model in s.models
        for method in s.methods
        if method in TUNED and not method_config(model, method).exists()
    ]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} do not exist; they are written by the select stage: add --stages dev select "
            "(or select, when the dev runs exist under --out)"
        )


def describe(job: Job) -> str:
    if job.argv is not None:
        return shlex.join(job.argv)
    return f"[{job.name}] {job.note or 'in-process step'}"


# ----------------------------------------------------------------------------------------------------- execution


@dataclass
class Outcome:
    """How every job ended: ``ok``, ``exists`` (skipped), ``failed`` or ``blocked`` (a job it waits for failed)."""

    status: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def failures(self) -> list[str]:
        return [name for name, state in self.status.items() if state in ("failed", "blocked")]


def run_job(job: Job, s: Settings, env: dict[str, str]) -> tuple[str, list[Job]]:
    """Run one job; returns its status and the jobs its action added."""
    if job.done is not None and job.done.exists():
        return "exists", []
    if job.action is not None:
        return "ok", job.action()
    log_file = log_path(s, job.name)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as handle:
        handle.write(f"$ {shlex.join(job.argv)}\n")
        handle.flush()
        code = run_command(job.argv, env=env, output=handle)
    return ("ok" if code == 0 else "failed"), []


_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()
_stopping = threading.Event()


def run_command(argv: Sequence[str], *, env: dict[str, str], output) -> int:
    """Run one command to its end, registered so that :func:`stop_children` can end it early."""
    with _children_lock:
        if _stopping.is_set():
            return -signal.SIGTERM
        process = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT)
        _children.add(process)
    try:
        return process.wait()
    finally:
        with _children_lock:
            _children.discard(process)


def stop_children() -> None:
    """Terminate the commands still running (the runner itself was stopped); their outputs are written atomically,
    so a stopped run leaves nothing and is redone on the next call."""
    with _children_lock:
        _stopping.set()
        for process in _children:
            process.terminate()


def execute(jobs: list[Job], s: Settings, *, workers: int) -> Outcome:
    """Run ``jobs`` with at most ``workers`` at once, each after the jobs it waits for; a failure blocks its
    dependents but not the rest."""
    pending = {job.name: job for job in jobs}
    outcome = Outcome()
    env = child_env(workers)
    running: dict[Future, tuple[Job, float]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            schedule(pending, running, outcome, pool, s, env, workers)
        except BaseException:
            stop_children()
            raise
    return outcome


def schedule(
    pending: dict[str, Job],
    running: dict[Future, tuple[Job, float]],
    outcome: Outcome,
    pool: ThreadPoolExecutor,
    s: Settings,
    env: dict[str, str],
    workers: int,
) -> None:
    """Start every job whose dependencies succeeded (at most --max-running of one benchmark at once), block those
    whose dependencies failed, until none is left."""

    def room(job: Job) -> bool:
        cap = s.max_running.get(job.benchmark)
        return cap is None or sum(other.benchmark == job.benchmark for other, _ in running.values()) < cap

    while pending or running:
        for name, job in list(pending.items()):
            states = [outcome.status.get(dep) for dep in job.after]
            if any(state in ("failed", "blocked") for state in states):
                outcome.status[name] = "blocked"
                del pending[name]
                log.error("%s: blocked (a job it waits for failed)", name)
            elif all(state in ("ok", "exists") for state in states) and len(running) < workers and room(job):
                del pending[name]
                running[pool.submit(run_job, job, s, env)] = (job, time.perf_counter())
        if not running:
            for name in pending:
                outcome.status[name] = "blocked"
                log.error("%s: blocked (waits for jobs that were never planned)", name)
            break
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            job, started = running.pop(future)
            outcome.seconds[job.name] = time.perf_counter() - started
            try:
                state, added = future.result()
            except Exception:
                log.exception("%s: failed", job.name)
                state, added = "failed", []
            outcome.status[job.name] = state
            for new in added:
                pending.setdefault(new.name, new)
            level = logging.ERROR if state == "failed" else logging.INFO
            log.log(
                level,
                "%s: %s (%.1f s)%s",
                job.name,
                state,
                outcome.seconds[job.name],
                f", log {log_path(s, job.name)}" if state == "failed" and job.argv else "",
            )


def child_env(workers: int) -> dict[str, str]:
    """The environment of each command: this one, with the CPU threads shared among concurrent commands."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# ---------------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=BENCHMARKS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=Path("outputs/results"), help="banks, dev runs and logs")
    parser.add_argument("--results", type=Path, default=Path("docs/results"), help="the reported runs")
    parser.add_argument(
        "--table",
        type=Path,
        help="seka report's table (default: docs/results_table.md for docs/results, else RESULTS/results_table.md, "
        "so a run elsewhere never overwrites the committed table)",
    )
    parser.add_argument("--shared-data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--accelerator", default="auto", choices=("auto", "gpu", "cpu"))
    parser.add_argument("--jobs", type=int, default=1, help="commands run at once")
    parser.add_argument("--limit", type=int, help="smoke run: the first N records of every slice and build")
    parser.add_argument(
        "--counterfact-test", default="test", help="'test' (5000:10000) or a slice such as 5000:6000 if time forces"
    )
    parser.add_argument(
        "--test-slice",
        nargs="+",
        default=[],
        metavar="BENCHMARK=A:B",
        help="report a slice of a benchmark's test records if time forces, e.g. lost_in_the_middle=0:100 (say so)",
    )
    parser.add_argument(
        "--static-decoding",
        nargs="+",
        default=[],
        metavar="BENCHMARK=N",
        help="generate through the compiled static-cache decoder with N cache positions (longest prompt + new "
        "tokens) on a generation benchmark, dev guard runs included, for the methods that act on the prompt pass "
        "only (not PASTA, SPA); each run's provenance records its command, so keep it the same across a resumed run",
    )
    parser.add_argument(
        "--banks",
        nargs="*",
        choices=list(BANK_VARIANTS),
        help="bank variants the dev grid searches beside the shipped bank (default: every variant of each model)",
    )
    parser.add_argument("--gains", nargs="+", type=float, default=list(GAINS))
    parser.add_argument(
        "--adaseka-gains",
        nargs="+",
        type=float,
        default=list(ADASEKA_GAINS),
        help="the gains of AdaSEKA's dev grid (tuned when --methods names adaseka)",
    )
    parser.add_argument(
        "--adaseka-layers",
        nargs="+",
        metavar="LAYERS",
        help="restrict AdaSEKA's dev grid to these of each model's layer options (all and lastN, as SEKA's grid; "
        "default every one)",
    )
    parser.add_argument(
        "--guards",
        nargs="*",
        default=list(DEFAULT_GUARDS),
        choices=list(GUARD_BENCHMARKS),
        help="the guards the rule applies: lost_in_the_middle (exact_match_inside), pronchange (pron_mean_p) and, opt-in, "
        "lost_in_the_middle_outside (exact_match_outside: the documents outside the highlight, from the same runs); "
        "default the first two; the dev table records the ones left out",
    )
    parser.add_argument(
        "--length-scaling",
        nargs="+",
        default=["none"],
        metavar="none|R:P",
        help="the strength schedules in the dev grids (SEKA's and AdaSEKA's): none (full strength) and/or R:P, the "
        "length-adaptive strength (a row with n > R highlighted tokens gets (R / n)^P of the edit), e.g. none 8:0.5",
    )
    parser.add_argument("--guard-top", type=int, default=4, help="candidates guard-checked at once (per round)")
    parser.add_argument(
        "--batch-size",
        nargs="+",
        default=[],
        metavar="BENCHMARK[.METHOD]=N",
        help="override a benchmark's batch size (for one method: e.g. lost_in_the_middle.pasta=8)",
    )
    parser.add_argument(
        "--max-running",
        nargs="+",
        default=[],
        metavar="BENCHMARK=N",
        help="run at most N commands of a benchmark at once (e.g. lost_in_the_middle=4: its ~4,500-token prompts "
        "take up to ~15 GB of GPU memory each), whatever --jobs allows",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    args.guards = list(dict.fromkeys(args.guards))  # a guard named twice is applied once
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if any(gain <= 0 for gain in args.adaseka_gains):
        parser.error(f"--adaseka-gains must all be > 0, got {args.adaseka_gains}")
    for layers in args.adaseka_layers or []:
        for tag in args.models:
            if layers not in MODELS[tag].layer_grid:
                parser.error(
                    f"--adaseka-layers {layers}: not a layer option of {tag} (its options: "
                    f"{' '.join(MODELS[tag].layer_grid)}); choose among them, or run each model on its own"
                )
    batch_sizes = {}
    for item in args.batch_size:
        key, _, value = item.partition("=")
        benchmark, _, method = key.partition(".")
        if benchmark not in BENCHMARKS or (method and method not in METHODS) or not value.isdigit() or int(value) < 1:
            parser.error(
                f"--batch-size takes BENCHMARK[.METHOD]=N with BENCHMARK in {BENCHMARKS}, METHOD in {METHODS} "
                f"and N >= 1, got {item!r}"
            )
        batch_sizes[key] = int(value)
    slices = args.test_slice + ([] if args.counterfact_test == "test" else [f"counterfact={args.counterfact_test}"])
    test_slices = {}
    for item in slices:
        benchmark, _, subset = item.partition("=")
        start, colon, stop = subset.partition(":")
        if benchmark not in BENCHMARKS or not (colon and start.isdigit() and stop.isdigit() and int(start) < int(stop)):
            parser.error(f"--test-slice takes BENCHMARK=A:B with BENCHMARK in {BENCHMARKS} and A < B, got {item!r}")
        low, high = TEST_RANGES.get(benchmark, (0, None))
        if int(start) < low or (high is not None and int(stop) > high):
            parser.error(f"--test-slice {item}: {benchmark}'s reported records are {low}:{high} (the rest is dev)")
        test_slices[benchmark] = subset
    static_decoding = benchmark_counts(parser, "--static-decoding", args.static_decoding, GENERATION)
    max_running = benchmark_counts(parser, "--max-running", args.max_running, BENCHMARKS)
    length_scalings: list[tuple[int, float] | None] = []
    for item in args.length_scaling:
        reference, colon, power = item.partition(":")
        usage = f"--length-scaling takes none or R:P (an integer R >= 1, a power P > 0), got {item!r}"
        scaling: tuple[int, float] | None = None
        if item != "none":
            if not colon:
                parser.error(usage)
            try:
                scaling = (int(reference), float(power))
                check_length_scaling(*scaling)
            except ValueError as error:
                parser.error(f"{usage}: {error}")
            if float(f"{scaling[1]:g}") != scaling[1]:  # the run folders name the power with 6 significant digits
                parser.error(f"{usage}: give the power with at most 6 significant digits")
        if scaling in length_scalings:
            parser.error(f"--length-scaling names {item!r} twice")
        length_scalings.append(scaling)
    length_scalings.sort(key=lambda scaling: scaling is not None)  # full strength first: a tie goes to it
    settings = Settings(
        models=[MODELS[m] for m in args.models],
        stages=[stage for stage in STAGES if stage in args.stages],
        benchmarks=args.benchmarks,
        methods=args.methods,
        out=args.out,
        results=args.results,
        shared_data=args.shared_data,
        accelerator=args.accelerator,
        limit=args.limit,
        gains=args.gains,
        guard_top=args.guard_top,
        guards=args.guards,
        table=args.table or default_table(args.results),
        batch_sizes=batch_sizes,
        test_slices=test_slices,
        static_decoding=static_decoding,
        banks=args.banks,
        adaseka_gains=args.adaseka_gains,
        adaseka_layers=args.adaseka_layers,
        length_scalings=length_scalings,
        max_running=max_running,
    )
    return settings, args


def benchmark_counts(
    parser: argparse.ArgumentParser, option: str, items: Sequence[str], benchmarks: Sequence[str]
) -> dict[str, int]:
    """``{benchmark: N}`` from an option's ``BENCHMARK=N`` items (``benchmarks`` allowed, N >= 1)."""
    counts = {}
    for item in items:
        benchmark, _, value = item.partition("=")
        if benchmark not in benchmarks or not value.isdigit() or int(value) < 1:
            parser.error(f"{option} takes BENCHMARK=N with BENCHMARK in {tuple(benchmarks)} and N >= 1, got {item!r}")
        counts[benchmark] = int(value)
    return counts


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds execute(), which terminates the running commands


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings, args = parse_args(argv)
    if not Path("configs/eval").is_dir():
        raise FileNotFoundError(f"no configs/eval under {Path.cwd()}; run this script from the repository root")
    jobs = plan(settings)
    if args.dry_run:
        for job in jobs:
            print(describe(job))
        return 0
    check_method_configs(settings)
    check_stale_results(jobs)
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    outcome = execute(jobs, settings, workers=args.jobs)
    failures = outcome.failures()
    log.info(
        "%d jobs in %.0f s: %d ok, %d skipped (outputs exist), %d failed or blocked",
        len(outcome.status),
        time.perf_counter() - started,
        sum(v == "ok" for v in outcome.status.values()),
        sum(v == "exists" for v in outcome.status.values()),
        len(failures),
    )
    for name in failures:
        log.error("%s %s", outcome.status[name], name)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
