"""scripts/results/run.py: its exact commands (--dry-run), its scheduler (order, skips, failures), the select stage
on synthetic dev predictions, the config fragments it stacks, and one real CPU smoke run (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from seka_lightning.cli import run_lightning
from seka_lightning.evidence import write_predictions
from seka_lightning.selection import candidate_name

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
spec = importlib.util.spec_from_file_location("results_run", REPO / "scripts" / "results" / "run.py")
run = importlib.util.module_from_spec(spec)
sys.modules["results_run"] = run
spec.loader.exec_module(run)

SEKA = f"{sys.executable} -m seka_lightning.cli"
SMOLLM2 = run.MODELS["smollm2-135m"]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture
def plain_argv(monkeypatch):
    """run_lightning parses its own args; pytest's command line must not look like extra arguments."""
    monkeypatch.setattr(sys, "argv", ["seka"])


@pytest.fixture
def configs_copy(tmp_path, monkeypatch) -> None:
    """A copy of the repository's configs in tmp_path, made the working directory: the runner reads configs/ and the
    select stage rewrites it there, not in the repository."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)


def smollm2_settings(*args: str) -> run.Settings:
    """The runner's settings for SmolLM2 alone with its reported runs under ./results, plus ``args``."""
    return run.parse_args(["--models", "smollm2-135m", "--results", "results", *args])[0]


def dry_run(capsys, *args: str) -> list[str]:
    assert run.main(["--dry-run", *args]) == 0
    return capsys.readouterr().out.splitlines()


def tuned_configs(settings, model, layers: str, gain: float, variant: str = "") -> dict[str, str]:
    """Every tuned method's fragment at one setting (SEKA's bank variant, layers and gain; AdaSEKA at the same)."""
    return {
        **run.seka_configs(settings, model, layers, gain, variant),
        "adaseka": run.adaseka_config(settings, model, layers, gain),
    }


def test_dry_run_final_seka_counterfact_commands(capsys, in_repo):
    lines = dry_run(
        capsys, "--models", "smollm2-135m", "--stages", "final", "--methods", "seka", "--benchmarks", "counterfact"
    )
    # the bank the shipped tuned config names (the select stage's choice, under the default --out)
    shipped = yaml.safe_load((REPO / "configs" / "methods" / "smollm2-135m" / "seka.yaml").read_text())
    bank = shipped["model"]["init_args"]["method"]["init_args"]["bank"]
    assert bank.startswith("outputs/results/banks/")
    assert lines == [
        f"{SEKA} predict -c configs/eval/counterfact.yaml -c configs/models/smollm2-135m.yaml "
        f"-c configs/methods/smollm2-135m/seka.yaml --model.method.bank {bank} "
        "--trainer.accelerator auto --trainer.callbacks.output_dir docs/results/counterfact/smollm2-135m/seka "
        "--data.path ../shared/data/counterfact --data.split test --data.example_subset null",
        f"{SEKA} report --results docs/results --output docs/results_table.md --plot null --overwrite true",
        f"{SEKA} report --verify true --results docs/results",
    ]


def test_a_results_folder_elsewhere_gets_its_own_table(capsys, in_repo):
    """--results outside docs/results: the report writes its table inside that folder, never the committed one."""
    lines = dry_run(
        capsys,
        *("--models", "smollm2-135m", "--stages", "final", "--methods", "none", "--benchmarks", "counterfact"),
        *("--results", "outputs/cpures"),
    )
    assert lines[-2] == (
        f"{SEKA} report --results outputs/cpures --output outputs/cpures/results_table.md --plot null --overwrite true"
    )
    assert not any("docs/results_table.md" in line for line in lines)
    explicit = dry_run(capsys, "--stages", "final", "--results", "outputs/cpures", "--table", "t.md")
    assert "--results outputs/cpures --output t.md " in explicit[-2]


def test_dry_run_random_seeds_limit_and_long_context_spa(capsys, in_repo):
    lines = dry_run(
        capsys,
        "--models",
        "gemma3-270m",
        "--stages",
        "final",
        "--methods",
        "random",
        "spa",
        "--benchmarks",
        "lost_in_the_middle",
        "--limit",
        "3",
        "--accelerator",
        "gpu",
        "--batch-size",
        "lost_in_the_middle=32",
    )
    tail = (
        "--trainer.accelerator gpu --trainer.callbacks.output_dir docs/results/lost_in_the_middle/gemma3-270m/{} "
        "--data.path ../shared/data/lost_in_the_middle/nq-open-oracle.jsonl.gz --data.split null "
        "--data.example_subset 0:3 --data.batch_size 32"
    )
    head = f"{SEKA} predict -c configs/eval/lost_in_the_middle.yaml -c configs/models/gemma3-270m.yaml"
    bank = "--model.method.bank outputs/results/banks/gemma3-270m.safetensors"
    assert lines[:4] == [
        *(
            f"{head} -c configs/methods/gemma3-270m/random.yaml {bank} --model.method.seed {k} "
            + tail.format(f"random/seed-{k}")
            for k in (0, 1, 2)
        ),
        f"{head} -c configs/methods/gemma3-270m/spa_long.yaml " + tail.format("spa"),
    ]
    assert "--plot docs/results/lost_in_the_middle.png" in lines[4]


def test_dry_run_build_and_dev_plan(capsys, in_repo):
    lines = dry_run(capsys, "--models", "gemma3-270m", "--stages", "build", "dev", "select", "--gains", "2", "8")
    assert lines[0] == (
        f"{SEKA} fit -c configs/build/gemma3-270m.yaml --model.output outputs/results/banks/gemma3-270m.safetensors "
        "--trainer.accelerator auto --trainer.callbacks.dirpath outputs/results/resume/gemma3-270m/seka"
    )
    assert sum(" -c configs/adaseka/build/" in line for line in lines) == 4
    assert lines[5] == (
        f"{SEKA} pasta-profile --pretrained embedded:gemma3-270m --output outputs/results/pasta/gemma3-270m.json "
        "--add_special_tokens true --batch_size 64 --heads_per_pass 8"
    )
    # Gemma-3's bank variant: P+ at top_pct 0.95 from the shipped build's statistics, every other setting as shipped
    assert lines[6] == (
        f"{SEKA} derive --stats outputs/results/banks/gemma3-270m.stats.safetensors "
        "--output outputs/results/banks/p95/gemma3-270m.safetensors --top_pct 0.95 --min_diff 0.0"
    )
    dev = [line for line in lines if "--trainer.callbacks.output_dir outputs/results/dev/" in line]
    # unsteered + 2 banks x 4 layer choices (Gemma-3's 18 layers: all, last12, last9, last6) x 2 gains, on CounterFact dev,
    # then AdaSEKA's 4 layer choices x 6 gains (--methods names adaseka by default)
    assert len(dev) == 17 + 24 and all("--data.split dev --data.example_subset null" in line for line in dev)
    assert not any("AdaSekaMethod" in line for line in dev[:17]) and all("AdaSekaMethod" in line for line in dev[17:])
    assert "--model.method.gain_pos 8 --model.method.layers last9" in dev[6]
    assert dev[14].endswith(
        "p95-last9-g8 --data.path ../shared/data/counterfact --data.split dev --data.example_subset null"
    )
    assert "--model.method.bank outputs/results/banks/p95/gemma3-270m.safetensors" in dev[14]
    assert lines[-2].startswith("[dev:gemma3-270m:guard-round-0]") and lines[-1].startswith("[select:gemma3-270m]")
    # --banks with no variant: the shipped bank only
    lines = dry_run(capsys, "--models", "gemma3-270m", "--stages", "build", "dev", "--gains", "2", "8", "--banks")
    assert not any(" derive " in line or "/p95/" in line for line in lines)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "counterfact=0"], "--batch-size takes BENCHMARK[.METHOD]=N"),
        (["--batch-size", "counterfact.qwen=8"], "--batch-size takes BENCHMARK[.METHOD]=N"),
        (["--models", "qwen"], "invalid choice: 'qwen'"),
        (["--test-slice", "lost_in_the_middle=100:0"], "--test-slice takes BENCHMARK=A:B"),
        (["--test-slice", "lost_in_the_middle"], "--test-slice takes BENCHMARK=A:B"),
        # dev questions start at 2555, dev bios at 900, dev CounterFact records end at 5000
        (["--test-slice", "lost_in_the_middle=2500:2600"], "lost_in_the_middle's reported records are 0:300"),
        (["--test-slice", "pronchange=850:950"], "pronchange's reported records are 0:900 (the rest is dev)"),
        (["--counterfact-test", "4900:5100"], "counterfact's reported records are 5000:10000"),
        (["--static-decoding", "counterfact=512"], "--static-decoding takes BENCHMARK=N with BENCHMARK in"),
        (["--max-running", "lost_in_the_middle=0"], "--max-running takes BENCHMARK=N with BENCHMARK in"),
        (["--max-running", "nope=2"], "--max-running takes BENCHMARK=N with BENCHMARK in"),
        (["--max-running", "lost_in_the_middle"], "--max-running takes BENCHMARK=N with BENCHMARK in"),
        (["--banks", "chat"], "invalid choice: 'chat'"),
        (
            ["--models", "smollm2-135m", "--adaseka-layers", "last12"],
            "--adaseka-layers last12: not a layer option of smollm2-135m (its options: all last20 last15 last10); "
            "choose among them, or run each model on its own",
        ),
        (
            ["--adaseka-layers", "last10"],  # both models by default: Gemma-3's 18 layers have no last10
            "--adaseka-layers last10: not a layer option of gemma3-270m (its options: all last12 last9 last6)",
        ),
        (["--adaseka-gains", "0.5", "0"], "--adaseka-gains must all be > 0, got [0.5, 0.0]"),
        (["--length-scaling", "8"], "--length-scaling takes none or R:P (an integer R >= 1, a power P > 0), got '8'"),
        (["--length-scaling", "0:1"], "got '0:1': length_reference must be an integer >= 1"),
        (["--length-scaling", "8:-1"], "got '8:-1': length_power must be a finite number > 0"),
        (["--length-scaling", "8:x"], "--length-scaling takes none or R:P"),
        (["--length-scaling", "none", "none"], "--length-scaling names 'none' twice"),
        (["--length-scaling", "8:0.1234567"], "give the power with at most 6 significant digits"),
    ],
)
def test_bad_options_are_refused(argv, message, in_repo, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["", "p95", "chat95"])
@pytest.mark.parametrize("stages", [["build", "final"], ["build", "dev", "final"], ["build", "dev", "select", "final"]])
@pytest.mark.parametrize("banks", [None, [], ["p95"]])
def test_every_dependency_is_a_planned_job(variant, stages, banks, tmp_path, configs_copy):
    """Whatever the stages, --banks and the bank the tuned configs name, a job only waits for jobs in the plan."""
    settings, _ = run.parse_args(
        ["--models", "smollm2-135m", "--stages", *stages] + ([] if banks is None else ["--banks", *banks])
    )
    for method, text in tuned_configs(settings, SMOLLM2, "last15", 8.0, variant).items():
        (tmp_path / "configs" / "methods" / "smollm2-135m" / f"{method}.yaml").write_text(text)
    jobs = run.plan(settings)
    names = {job.name for job in jobs}
    dynamic = {"dev:smollm2-135m:guards"}  # added by the last guard round (an action)
    assert {dependency for job in jobs for dependency in job.after} <= names | dynamic
    if variant and "select" not in stages:  # the ablations get the configured variant's bank, which gets built
        assert f"build:smollm2-135m:bank-{variant}" in names
        seka = next(job for job in jobs if job.name == "final:smollm2-135m:counterfact:key_scaling")
        assert f"outputs/results/banks/{variant}/smollm2-135m.safetensors" in seka.argv


def test_a_config_naming_a_variant_the_model_lacks_is_refused(tmp_path, configs_copy):
    settings, _ = run.parse_args(["--models", "gemma3-270m", "--stages", "final"])
    for method, text in tuned_configs(settings, run.MODELS["gemma3-270m"], "last6", 4.0, "chat95").items():
        (tmp_path / "configs" / "methods" / "gemma3-270m" / f"{method}.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"names the bank variant 'chat95', which gemma3-270m does not have .* select"):
        run.plan(settings)


def test_test_slices_static_decoding_and_per_method_batch_sizes(capsys, in_repo):
    """--test-slice narrows one benchmark's reported slice; --static-decoding reaches only the methods confined to
    the prompt pass; a BENCHMARK.METHOD batch size beats the benchmark's."""
    lines = dry_run(
        capsys,
        *("--models", "gemma3-270m", "--stages", "final", "--benchmarks", "lost_in_the_middle"),
        *("--methods", "none", "adaseka", "pasta", "spa", "--test-slice", "lost_in_the_middle=0:100"),
        *("--static-decoding", "lost_in_the_middle=6144", "--batch-size", "lost_in_the_middle=32"),
        "lost_in_the_middle.pasta=8",
    )
    runs = {line.split("/lost_in_the_middle/gemma3-270m/")[1].split()[0]: line for line in lines if "predict" in line}
    assert sorted(runs) == ["adaseka", "none", "pasta", "spa"]
    for method, line in runs.items():
        assert "--data.split null --data.example_subset 0:100" in line
        assert f"--data.batch_size {8 if method == 'pasta' else 32} " in line + " "
        assert ("--model.static_decoding 6144" in line) == (method in ("none", "adaseka"))


def job(name: str, code: str, *, after: tuple[str, ...] = (), done: Path | None = None):
    return run.Job(name, (sys.executable, "-c", code), after=after, done=done)


def test_max_running_caps_one_benchmark_not_the_others(tmp_path, monkeypatch):
    """--max-running lost_in_the_middle=2 with --jobs 4: never more than two lost-in-the-middle commands at once, while
    the other benchmark's commands fill the remaining workers."""
    monkeypatch.chdir(tmp_path)
    settings, _ = run.parse_args(["--out", str(tmp_path / "out"), "--max-running", "lost_in_the_middle=2"])
    assert settings.max_running == {"lost_in_the_middle": 2}
    trace = tmp_path / "trace"
    code = (
        "import sys, time; log = lambda w: open(sys.argv[1], 'a').write(w + ' ' + sys.argv[2] + chr(10)); "
        "log('start'); time.sleep(0.4); log('end')"
    )

    def step(name: str, benchmark: str):
        return run.Job(name, (sys.executable, "-c", code, str(trace), benchmark), benchmark=benchmark)

    jobs = [step(f"litm-{i}", "lost_in_the_middle") for i in range(5)] + [
        step(f"pc-{i}", "pronchange") for i in range(3)
    ]
    outcome = run.execute(jobs, settings, workers=4)
    assert set(outcome.status.values()) == {"ok"}
    running = dict.fromkeys(("lost_in_the_middle", "pronchange"), 0)
    most = dict(running)
    for event, benchmark in (line.split() for line in trace.read_text().splitlines()):
        running[benchmark] += 1 if event == "start" else -1
        most[benchmark] = max(most[benchmark], running[benchmark])
    assert most["lost_in_the_middle"] == 2 and most["pronchange"] >= 2


def test_scheduler_order_skips_failures_and_dynamic_jobs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings, _ = run.parse_args(["--out", str(tmp_path / "out")])
    trace = tmp_path / "trace"
    append = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + chr(10))"

    def step(name: str, **kwargs):
        return run.Job(name, (sys.executable, "-c", append, str(trace), name), **kwargs)

    (tmp_path / "exists").write_text("")
    jobs = [
        step("a"),
        step("b", after=("a",)),
        step("skipped", done=tmp_path / "exists"),
        job("fails", "raise SystemExit(3)"),
        step("blocked", after=("fails",)),
        run.Job("expand", action=lambda: [step("added", after=("b",))], after=("a",)),
        step("last", after=("added", "skipped")),
        step("never", after=("not-planned",)),
    ]
    outcome = run.execute(jobs, settings, workers=3)
    assert outcome.status == {
        "a": "ok",
        "b": "ok",
        "skipped": "exists",
        "fails": "failed",
        "blocked": "blocked",
        "expand": "ok",
        "added": "ok",
        "last": "ok",
        "never": "blocked",
    }
    order = trace.read_text().split()
    assert sorted(order) == ["a", "added", "b", "last"]
    assert order.index("a") < order.index("b") < order.index("added") < order.index("last")
    assert (tmp_path / "out" / "logs" / "fails.log").read_text().startswith(f"$ {sys.executable} -c ")
    assert sorted(outcome.failures()) == ["blocked", "fails", "never"]


def write_dev_run(folder: Path, metric: str, scores: list[float]) -> None:
    records = [{"id": i, "scores": {metric: s}} for i, s in enumerate(scores)]
    write_predictions(folder / "predictions.jsonl.gz", records)
    (folder / "metric_result.json").write_text("{}")


def test_select_stage_writes_the_chosen_configs_and_the_dev_table(tmp_path, configs_copy):
    settings = smollm2_settings("--gains", "2", "8", "--banks", "--methods", "seka")
    shipped_adaseka = (tmp_path / "configs" / "methods" / "smollm2-135m" / "adaseka.yaml").read_text()
    efficacy = {"all": (6, 7), "last20": (8, 9), "last15": (9, 10), "last10": (5, 6)}  # wins of 10 at gains 2, 8
    for layers, wins in efficacy.items():
        for gain, won in zip((2.0, 8.0), wins, strict=True):
            dev = run.dev_dir(settings, SMOLLM2, "counterfact", candidate_name(layers, gain))
            write_dev_run(dev, "efficacy_score", [1.0] * won + [0.0] * (10 - won))
    write_dev_run(run.dev_dir(settings, SMOLLM2, "counterfact", "none"), "efficacy_score", [1.0] * 5 + [0.0] * 5)
    guards = {"none": (0.5, 0.5), "last15-g8": (0.0, 0.5), "last15-g2": (0.5, 0.5), "last20-g8": (0.5, 0.5)}
    for name, (em, pron) in guards.items():
        write_dev_run(run.dev_dir(settings, SMOLLM2, "lost_in_the_middle", name), "exact_match_inside", [em, 0.5])
        write_dev_run(run.dev_dir(settings, SMOLLM2, "pronchange", name), "pron_mean_p", [pron, 0.5])
    assert run.write_selection(settings, SMOLLM2) == []
    # last15-g8 (10/10) fails lost in the middle (0.25 < 0.5 - 0); the best admissible are last20-g8 and last15-g2
    # (9/10, SE 0.1; the tie goes to the earlier grid entry); the one-SE band reaches 0.8, where last20-g2 would
    # qualify but has no guard run; the smallest admissible gain in the band: last15-g2
    table = json.loads((tmp_path / "results" / "dev" / "smollm2-135m.json").read_text())
    assert table["chosen"] == {"name": "last15-g2", "bank": "shipped", "layers": "last15", "gain": 2.0}
    assert table["best"] == "last20-g8"
    rows = {row["name"]: row for row in table["candidates"]}
    assert rows["last15-g8"]["rejected"] == ["exact_match_inside: 0.2500 < unsteered - SE = 0.5000"]
    assert rows["last15-g2"]["metrics"]["efficacy_score"]["se"] == pytest.approx(0.1, abs=1e-12)
    assert rows["last20-g2"]["rejected"] == ["exact_match_inside: no dev run", "pron_mean_p: no dev run"]
    seka = yaml.safe_load((tmp_path / "configs" / "methods" / "smollm2-135m" / "seka.yaml").read_text())
    assert seka["model"]["init_args"]["method"] == {
        "class_path": "SekaMethod",
        "init_args": {"bank": "outputs/results/banks/smollm2-135m.safetensors", "gain_pos": 2.0, "layers": "last15"},
    }
    # AdaSEKA was not tuned (--methods seka): its config is not rewritten at SEKA's setting, the table has no entry
    assert (tmp_path / "configs" / "methods" / "smollm2-135m" / "adaseka.yaml").read_text() == shipped_adaseka
    assert "adaseka" not in table


def test_a_bank_variant_can_win_and_the_configs_and_finals_name_its_bank(tmp_path, configs_copy, capsys):
    """The grid spans the bank variants: a chat95 candidate that wins is written with its bank, the dev table says
    which bank, and a later final stage (without select) passes that bank to the ablations."""
    settings = smollm2_settings("--gains", "8", "--banks", "chat95", "--methods", "seka")
    assert [c.name for c in run.grid(settings, SMOLLM2)][3:6] == ["last10-g8", "chat95-all-g8", "chat95-last20-g8"]
    wins = {"all-g8": 6, "last20-g8": 7, "last15-g8": 7, "last10-g8": 5, "chat95-last15-g8": 10, "none": 5}
    wins |= {"chat95-all-g8": 6, "chat95-last20-g8": 8, "chat95-last10-g8": 6}
    for name, won in wins.items():
        write_dev_run(
            run.dev_dir(settings, SMOLLM2, "counterfact", name), "efficacy_score", [1.0] * won + [0.0] * (10 - won)
        )
        write_dev_run(run.dev_dir(settings, SMOLLM2, "lost_in_the_middle", name), "exact_match_inside", [0.5, 0.5])
        write_dev_run(run.dev_dir(settings, SMOLLM2, "pronchange", name), "pron_mean_p", [0.5, 0.5])
    assert run.write_selection(settings, SMOLLM2) == []
    table = json.loads((tmp_path / "results" / "dev" / "smollm2-135m.json").read_text())
    assert table["chosen"] == {"name": "chat95-last15-g8", "bank": "chat95", "layers": "last15", "gain": 8.0}
    assert table["banks"] == {
        "shipped": "configs/build/smollm2-135m.yaml",
        "chat95": "building texts in the chat template, top_pct 0.95",
    }
    bank = "outputs/results/banks/chat95/smollm2-135m.safetensors"
    for method in ("seka", "key_scaling", "random"):
        config = yaml.safe_load((tmp_path / "configs" / "methods" / "smollm2-135m" / f"{method}.yaml").read_text())
        assert config["model"]["init_args"]["method"]["init_args"]["bank"] == bank
    lines = dry_run(
        capsys,
        "--models",
        "smollm2-135m",
        "--stages",
        "final",
        "--benchmarks",
        "counterfact",
        "--methods",
        "key_scaling",
        "--out",
        "elsewhere",
    )
    assert "--model.method.bank elsewhere/banks/chat95/smollm2-135m.safetensors" in lines[0]


def write_counterfact_grid(settings) -> None:
    """CounterFact dev runs of 10 prompts for unsteered and the 4 x 2 grid at gains 2, 8 (best: last15-g8 10/10)."""
    wins = {"all-g2": 6, "all-g8": 7, "last20-g2": 8, "last20-g8": 9, "last15-g2": 9, "last15-g8": 10}
    wins |= {"last10-g2": 5, "last10-g8": 6, "none": 5}
    for name, won in wins.items():
        dev = run.dev_dir(settings, SMOLLM2, "counterfact", name)
        write_dev_run(dev, "efficacy_score", [1.0] * won + [0.0] * (10 - won))


def test_guard_rounds_run_until_the_choice_is_settled(configs_copy):
    argv = ["--models", "smollm2-135m", "--gains", "2", "8", "--guard-top", "2", "--banks", "--methods", "seka"]
    settings, _ = run.parse_args(argv)
    write_counterfact_grid(settings)
    first = run.guard_round(settings, SMOLLM2, 0)
    names = [job.name.removeprefix("dev:smollm2-135m:") for job in first]
    assert names == [
        "lost_in_the_middle:none",
        "pronchange:none",
        "lost_in_the_middle:last15-g8",
        "pronchange:last15-g8",  # the two best efficacies
        "lost_in_the_middle:last20-g8",
        "pronchange:last20-g8",
        "guard-round-1",
    ]
    for name, em in {"none": 0.5, "last15-g8": 0.0, "last20-g8": 0.5}.items():  # last15-g8 fails
        write_dev_run(run.dev_dir(settings, SMOLLM2, "lost_in_the_middle", name), "exact_match_inside", [em, 0.5])
        write_dev_run(run.dev_dir(settings, SMOLLM2, "pronchange", name), "pron_mean_p", [0.5, 0.5])
    second = first[-1].action()
    # best admissible last20-g8 (0.9, SE 0.1): the band's smaller gains last15-g2 and last20-g2 may still be chosen
    assert [job.name.removeprefix("dev:smollm2-135m:") for job in second] == [
        "lost_in_the_middle:last15-g2",
        "pronchange:last15-g2",
        "lost_in_the_middle:last20-g2",
        "pronchange:last20-g2",
        "guard-round-2",
    ]
    # a resumed run's round 0 (the unsteered guard runs exist) goes straight to what can still change the choice
    assert [job.name.removeprefix("dev:smollm2-135m:") for job in run.guard_round(settings, SMOLLM2, 0)] == [
        "lost_in_the_middle:none",
        "pronchange:none",
        *(job.name.removeprefix("dev:smollm2-135m:") for job in second[:-1]),
        "guard-round-1",
    ]
    for name in ("last15-g2", "last20-g2"):
        write_dev_run(run.dev_dir(settings, SMOLLM2, "lost_in_the_middle", name), "exact_match_inside", [0.5, 0.5])
        write_dev_run(run.dev_dir(settings, SMOLLM2, "pronchange", name), "pron_mean_p", [0.5, 0.5])
    assert [job.name for job in second[-1].action()] == ["dev:smollm2-135m:guards"]


def test_guards_option_applies_only_the_named_guards_and_records_the_rest(tmp_path, configs_copy):
    """--guards pronchange: guard rounds run PronChange only, the rule ignores lost in the middle, and the dev table
    names the guard it did not apply."""
    settings = smollm2_settings("--gains", "2", "8", "--guards", "pronchange", "--banks", "--methods", "seka")
    write_counterfact_grid(settings)
    first = run.guard_round(settings, SMOLLM2, 0)
    names = [job.name.removeprefix("dev:smollm2-135m:") for job in first]
    assert names[:3] == ["pronchange:none", "pronchange:last15-g8", "pronchange:last20-g8"]
    assert not any("lost_in_the_middle" in name for name in names)
    for name, pron in {"none": 0.5, "last15-g8": 0.0, "last20-g8": 0.5, "last15-g2": 0.5, "last20-g2": 0.5}.items():
        write_dev_run(run.dev_dir(settings, SMOLLM2, "pronchange", name), "pron_mean_p", [pron, 0.5])
    assert run.write_selection(settings, SMOLLM2) == []
    table = json.loads((tmp_path / "results" / "dev" / "smollm2-135m.json").read_text())
    assert table["guards"] == ["pron_mean_p"] and table["guards_not_applied"] == ["exact_match_inside"]
    rows = {row["name"]: row for row in table["candidates"]}
    assert rows["last15-g8"]["rejected"] == ["pron_mean_p: 0.2500 < unsteered - SE = 0.5000"]
    assert table["chosen"] == {"name": "last15-g2", "bank": "shipped", "layers": "last15", "gain": 2.0}


def test_outside_guard_reads_the_same_lost_in_the_middle_runs_and_rejects_a_fall_outside(tmp_path, configs_copy):
    """--guards ... lost_in_the_middle_outside: one lost-in-the-middle run per candidate serves both of its guards, and
    a candidate whose documents outside the highlight fall below unsteered - SE is rejected, however well it does
    inside."""
    guards = ("lost_in_the_middle", "lost_in_the_middle_outside", "pronchange")
    settings = smollm2_settings("--gains", "2", "8", "--guards", *guards, "--banks", "--methods", "seka")
    write_counterfact_grid(settings)
    first = [job.name.removeprefix("dev:smollm2-135m:") for job in run.guard_round(settings, SMOLLM2, 0)]
    assert first[:6] == [
        "lost_in_the_middle:none",
        "pronchange:none",
        *(f"{b}:{c}" for c in ("last15-g8", "last20-g8") for b in ("lost_in_the_middle", "pronchange")),
    ]
    # (inside, outside) per-example scores: last15-g8 lifts the inside and loses the outside
    litm = {"none": ([0.0, 1.0], [1.0, 1.0]), "last15-g8": ([1.0, 1.0], [0.0, 0.0])}
    litm |= {name: ([0.0, 1.0], [1.0, 1.0]) for name in ("last20-g8", "last15-g2", "last20-g2")}
    for name, (inside, outside) in litm.items():
        # as the benchmark writes them: a question at a gold position inside the highlight scores exact_match_inside,
        # one at a position outside it exact_match_outside
        records = [{"id": f"q{i}@pos14", "scores": {"exact_match_inside": a}} for i, a in enumerate(inside)]
        records += [{"id": f"q{i}@pos0", "scores": {"exact_match_outside": b}} for i, b in enumerate(outside)]
        folder = run.dev_dir(settings, SMOLLM2, "lost_in_the_middle", name)
        write_predictions(folder / "predictions.jsonl.gz", records)
        (folder / "metric_result.json").write_text("{}")
        write_dev_run(run.dev_dir(settings, SMOLLM2, "pronchange", name), "pron_mean_p", [0.5, 0.5])
    assert run.write_selection(settings, SMOLLM2) == []
    table = json.loads((tmp_path / "results" / "dev" / "smollm2-135m.json").read_text())
    assert table["guards"] == ["exact_match_inside", "exact_match_outside", "pron_mean_p"]
    assert table["guards_not_applied"] == []
    assert table["baseline"]["exact_match_outside"] == {"mean": 1.0, "se": 0.0, "n": 2}
    rows = {row["name"]: row for row in table["candidates"]}
    assert rows["last15-g8"]["rejected"] == ["exact_match_outside: 0.0000 < unsteered - SE = 1.0000"]
    assert table["chosen"]["name"] == "last15-g2"  # best admissible last20-g8 (9/10); the gain-2 points within one SE


def test_guards_option_rejects_an_unknown_guard(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--guards", "lost_in_the_middle_inside"])
    assert "invalid choice: 'lost_in_the_middle_inside'" in capsys.readouterr().err
    settings, _ = run.parse_args(["--guards", "pronchange", "lost_in_the_middle_outside", "pronchange"])
    assert settings.guards == ["pronchange", "lost_in_the_middle_outside"]  # named twice, applied once


EXPERTS = {source: f"outputs/results/experts/smollm2-135m/{source}.safetensors" for source in run.EXPERT_SOURCES}


def test_dry_run_adaseka_dev_grid(capsys, in_repo):
    """--methods adaseka tunes AdaSEKA's own grid (its four experts at each --adaseka-layers x --adaseka-gains) and
    not SEKA's; --methods without adaseka plans no AdaSEKA run."""
    args = ("--models", "smollm2-135m", "--stages", "dev", "select", "--adaseka-gains", "0.5", "2")
    lines = dry_run(capsys, *args, "--methods", "adaseka", "--adaseka-layers", "last10", "last20")
    head = f"{SEKA} predict -c configs/eval/counterfact.yaml -c configs/models/smollm2-135m.yaml "
    tail = " --data.path ../shared/data/counterfact --data.split dev --data.example_subset null"
    expected = [
        head + "--model.method AdaSekaMethod --model.method.experts "
        f"'{json.dumps(EXPERTS)}' --model.method.gain {gain} --model.method.layers {layers} --trainer.accelerator auto "
        f"--trainer.callbacks.output_dir outputs/results/dev/smollm2-135m/counterfact/adaseka-{layers}-g{gain}" + tail
        for layers in ("last20", "last10")  # the model's grid order, whatever order --adaseka-layers names them in
        for gain in ("0.5", "2")
    ]
    none = head + "-c configs/methods/smollm2-135m/none.yaml --trainer.accelerator auto --trainer.callbacks.output_dir "
    assert lines[:-2] == [none + "outputs/results/dev/smollm2-135m/counterfact/none" + tail, *expected]
    assert lines[-1] == (
        "[select:smollm2-135m] write configs/methods/smollm2-135m/adaseka.yaml and docs/results/dev/smollm2-135m.json"
    )
    for method in ("seka", "none"):
        lines = dry_run(capsys, *args, "--methods", method)
        assert not any("AdaSekaMethod" in line or "adaseka" in line for line in lines)
        assert (
            sum(" predict " in line for line in lines) == 1 + 3 * 4 * 5
        )  # unsteered + 3 banks x 4 layers x 5 gains (--gains default)


def test_adaseka_grid_takes_the_strength_schedules_and_its_config_records_the_chosen_one(in_repo):
    """--length-scaling applies to AdaSEKA's grid as to SEKA's (each twin right after its full-strength point, run with
    the length options), and select writes the chosen schedule into adaseka.yaml."""
    import yaml

    settings = run.parse_args(
        ["--models", "smollm2-135m", "--methods", "adaseka", "--adaseka-layers", "last10", "--adaseka-gains", "1", "2",
         "--length-scaling", "none", "8:0.5"]
    )[0]  # fmt: skip
    names = [c.name for c in run.grid(settings, SMOLLM2, "adaseka")]
    assert names == [
        "adaseka-last10-g1",
        "adaseka-last10-g1-lref8-p0.5",
        "adaseka-last10-g2",
        "adaseka-last10-g2-lref8-p0.5",
    ]
    twin = run.grid(settings, SMOLLM2, "adaseka")[1]
    args = run.adaseka_args(settings, SMOLLM2, twin)
    assert args[-4:] == ("--model.method.length_reference", "8", "--model.method.length_power", "0.5")
    assert "--model.method.length_reference" not in run.adaseka_args(
        settings, SMOLLM2, run.grid(settings, SMOLLM2, "adaseka")[0]
    )
    text = run.adaseka_config(settings, SMOLLM2, "last10", 1.0, twin.length_settings())
    init_args = yaml.safe_load(text)["model"]["init_args"]["method"]["init_args"]
    assert {k: init_args[k] for k in ("gain", "layers", "length_reference", "length_power")} == {
        "gain": 1.0, "layers": "last10", "length_reference": 8, "length_power": 0.5
    }  # fmt: skip
    assert "length_reference" not in run.adaseka_config(settings, SMOLLM2, "last10", 1.0)


def test_adaseka_dev_runs_wait_for_their_experts_and_parse(capsys, in_repo, plain_argv):
    """With the build stage an AdaSEKA dev run waits for the four expert builds (which are planned); its command
    line parses to AdaSekaMethod at the candidate's gain and layers with the runner's experts."""
    argv = ["--models", "smollm2-135m", "--stages", "build", "dev", "--methods", "adaseka", "--adaseka-gains", "4"]
    settings, _ = run.parse_args(argv)
    jobs = {job.name: job for job in run.plan(settings)}
    dev = jobs["dev:smollm2-135m:counterfact:adaseka-last15-g4"]
    assert dev.after == tuple(f"build:smollm2-135m:expert-{source}" for source in run.EXPERT_SOURCES)
    assert set(dev.after) <= set(jobs)
    with pytest.raises(SystemExit):
        run_lightning([*dev.argv[3:], "--print_config"])
    method = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["method"]
    assert method["class_path"].endswith(".AdaSekaMethod")
    assert (method["init_args"]["gain"], method["init_args"]["layers"]) == (4.0, "last15")
    assert method["init_args"]["experts"] == EXPERTS


# CounterFact dev wins of 10 in AdaSEKA's grid (last15, last10 x gains 0.5, 2, 8) and the one whose guard fails
ADASEKA_WINS = {"last15-g0.5": 6, "last15-g2": 9, "last15-g8": 10, "last10-g0.5": 8, "last10-g2": 7, "last10-g8": 3}


def write_guards(settings, name: str, *, passes: bool = True) -> None:
    """Guard runs of one candidate against the unsteered [0.5, 0.5] (floor 0.5); a failing one scores 0.25."""
    write_dev_run(run.dev_dir(settings, SMOLLM2, "lost_in_the_middle", name), "exact_match_inside", [0.5, 0.5])
    pron = [0.5, 0.5] if passes else [0.0, 0.5]
    write_dev_run(run.dev_dir(settings, SMOLLM2, "pronchange", name), "pron_mean_p", pron)


def test_adaseka_gets_its_own_guarded_choice_and_dev_table_entry(tmp_path, configs_copy):
    """Both grids go through the same guard rounds and rule; adaseka.yaml gets AdaSEKA's own choice (not SEKA's
    layers and gain), the dev table records it under 'adaseka' beside SEKA's unchanged fields."""
    argv = ["--gains", "2", "8", "--guard-top", "2", "--banks"]
    argv += ["--methods", "seka", "adaseka", "--adaseka-layers", "last15", "last10", "--adaseka-gains", "0.5", "2", "8"]
    settings = smollm2_settings(*argv)
    write_counterfact_grid(settings)  # SEKA's best: last15-g8, 10/10
    for name, won in ADASEKA_WINS.items():
        dev = run.dev_dir(settings, SMOLLM2, "counterfact", f"adaseka-{name}")
        write_dev_run(dev, "efficacy_score", [1.0] * won + [0.0] * (10 - won))
    first = run.guard_round(settings, SMOLLM2, 0)
    assert [job.name.removeprefix("dev:smollm2-135m:") for job in first][2::2] == [
        "lost_in_the_middle:last15-g8",  # each grid's two best efficacies
        "lost_in_the_middle:last20-g8",
        "lost_in_the_middle:adaseka-last15-g8",
        "lost_in_the_middle:adaseka-last15-g2",
        "guard-round-1",
    ]
    assert "AdaSekaMethod" in first[6].argv and "--model.method.gain" in first[6].argv
    for name in ("none", "last15-g8", "last20-g8", "adaseka-last15-g2"):
        write_guards(settings, name)
    write_guards(settings, "adaseka-last15-g8", passes=False)
    # SEKA is settled (last15-g8 at 1.0 with SE 0 admissible); AdaSEKA's best admissible is adaseka-last15-g2 (0.9,
    # SE 0.1), whose band reaches adaseka-last10-g0.5 (0.8) at a smaller gain: its guards are needed
    second = first[-1].action()
    assert [job.name.removeprefix("dev:smollm2-135m:") for job in second] == [
        "lost_in_the_middle:adaseka-last10-g0.5",
        "pronchange:adaseka-last10-g0.5",
        "guard-round-2",
    ]
    write_guards(settings, "adaseka-last10-g0.5")
    assert [job.name for job in second[-1].action()] == ["dev:smollm2-135m:guards"]
    assert run.write_selection(settings, SMOLLM2) == []
    methods = tmp_path / "configs" / "methods" / "smollm2-135m"
    seka = yaml.safe_load((methods / "seka.yaml").read_text())["model"]["init_args"]["method"]["init_args"]
    assert (seka["layers"], seka["gain_pos"]) == ("last15", 8.0)
    adaseka = yaml.safe_load((methods / "adaseka.yaml").read_text())["model"]["init_args"]["method"]
    assert adaseka == {
        "class_path": "AdaSekaMethod",
        "init_args": {"experts": EXPERTS, "gain": 0.5, "layers": "last10"},
    }
    table = json.loads((tmp_path / "results" / "dev" / "smollm2-135m.json").read_text())
    seka_keys = ["model", "rule", "guards", "guards_not_applied", "slices", "banks", "baseline", "candidates", "best"]
    assert list(table) == [*seka_keys, "chosen", "adaseka"]
    assert table["chosen"] == {"name": "last15-g8", "bank": "shipped", "layers": "last15", "gain": 8.0}
    assert all(not row["name"].startswith("adaseka") for row in table["candidates"])
    entry = table["adaseka"]
    assert entry["chosen"] == {"name": "adaseka-last10-g0.5", "layers": "last10", "gain": 0.5}
    assert entry["best"] == "adaseka-last15-g2"
    assert (entry["layer_options"], entry["gains"], entry["experts"]) == (
        ["last15", "last10"],
        [0.5, 2.0, 8.0],
        EXPERTS,
    )
    assert entry["guards"] == table["guards"] and entry["baseline"] == table["baseline"]
    rows = {row["name"]: row for row in entry["candidates"]}
    assert list(rows) == [f"adaseka-{name}" for name in ADASEKA_WINS]
    assert rows["adaseka-last15-g8"]["rejected"] == ["pron_mean_p: 0.2500 < unsteered - SE = 0.5000"]
    assert rows["adaseka-last10-g2"]["rejected"] == ["exact_match_inside: no dev run", "pron_mean_p: no dev run"]
    assert rows["adaseka-last10-g0.5"]["metrics"]["efficacy_score"]["mean"] == 0.8

    # a later run tuning one grid keeps the other's configs and table entries
    seka_text, seka_fields = (methods / "seka.yaml").read_text(), {k: table[k] for k in [*seka_keys, "chosen"]}
    argv[argv.index("--methods") : argv.index("--adaseka-layers") + 3] = ["--methods", "adaseka", "--adaseka-layers"]
    argv.insert(argv.index("--adaseka-layers") + 1, "last15")  # AdaSEKA alone, at last15 only: adaseka-last15-g2
    only = smollm2_settings(*argv)
    assert only.tuned_grids() == ["adaseka"] and only.adaseka_layers == ["last15"]
    assert run.write_selection(only, SMOLLM2) == []
    again = json.loads((tmp_path / "results" / "dev" / "smollm2-135m.json").read_text())
    assert {k: again[k] for k in seka_fields} == seka_fields and (methods / "seka.yaml").read_text() == seka_text
    assert again["adaseka"]["chosen"] == {"name": "adaseka-last15-g2", "layers": "last15", "gain": 2.0}
    assert (
        yaml.safe_load((methods / "adaseka.yaml").read_text())["model"]["init_args"]["method"]["init_args"]["gain"]
        == 2.0
    )


def test_an_adaseka_grid_without_admissible_candidates_names_its_options(tmp_path, configs_copy):
    """When every AdaSEKA candidate fails a guard, SEKA's choice is still written, the table shows AdaSEKA's reasons
    and no choice, and the error names AdaSEKA's grid options; adaseka.yaml is left as it was."""
    argv = ["--gains", "2", "8", "--banks", "--guards", "pronchange", "--methods", "seka", "adaseka"]
    settings = smollm2_settings(*argv, "--adaseka-layers", "last10", "--adaseka-gains", "8")
    write_counterfact_grid(settings)
    write_dev_run(run.dev_dir(settings, SMOLLM2, "counterfact", "adaseka-last10-g8"), "efficacy_score", [1.0, 0.0])
    for name in ("none", "last15-g8"):
        write_guards(settings, name)
    write_guards(settings, "adaseka-last10-g8", passes=False)
    adaseka = (tmp_path / "configs" / "methods" / "smollm2-135m" / "adaseka.yaml").read_text()
    with pytest.raises(ValueError, match=r"^AdaSEKA \(--adaseka-gains, --adaseka-layers\): no candidate passes"):
        run.write_selection(settings, SMOLLM2)
    assert (tmp_path / "configs" / "methods" / "smollm2-135m" / "adaseka.yaml").read_text() == adaseka
    seka = yaml.safe_load((tmp_path / "configs" / "methods" / "smollm2-135m" / "seka.yaml").read_text())
    assert seka["model"]["init_args"]["method"]["init_args"]["gain_pos"] == 8.0
    table = json.loads((tmp_path / "results" / "dev" / "smollm2-135m.json").read_text())
    assert table["chosen"]["name"] == "last15-g8"
    assert table["adaseka"]["chosen"] is None and table["adaseka"]["best"] is None
    assert table["adaseka"]["candidates"][0]["rejected"] == ["pron_mean_p: 0.2500 < unsteered - SE = 0.5000"]


FRAGMENTS = sorted((REPO / "configs" / "methods").glob("*/*.yaml"))


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_method_fragments_stack_on_an_eval_config(fragment, capsys, plain_argv):
    model = REPO / "configs" / "models" / f"{fragment.parent.name}.yaml"
    with pytest.raises(SystemExit) as exit_info:
        run_lightning(
            [
                "predict",
                "-c",
                str(REPO / "configs/eval/counterfact.yaml"),
                "-c",
                str(model),
                "-c",
                str(fragment),
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    expected = yaml.safe_load(model.read_text())["model"]["init_args"]
    assert {k: config[k] for k in expected} == expected
    short = yaml.safe_load(fragment.read_text())["model"]["init_args"]["method"]["class_path"]
    assert config["method"]["class_path"].endswith("." + short)


def test_tuned_fragments_stack_and_take_the_runners_artifact_paths(tmp_path, capsys, in_repo, plain_argv):
    settings, _ = run.parse_args([])
    model = run.MODELS["gemma3-270m"]
    for method, text in tuned_configs(settings, model, "last6", 4.0).items():
        (tmp_path / f"{method}.yaml").write_text(text)
    for method in ("adaseka", "random"):
        argv = list(run.final_jobs(settings, model, "pronchange", method)[0].argv[3:])
        argv[argv.index(str(run.method_config(model, method)))] = str(tmp_path / f"{method}.yaml")
        with pytest.raises(SystemExit):
            run_lightning([*argv, "--print_config"])
        config = yaml.safe_load(capsys.readouterr().out)
        method = config["model"]["init_args"]["method"]["init_args"]
        assert method["layers"] == "last6"
        assert method.get("gain", method.get("gain_pos")) == 4.0
        assert config["data"]["init_args"]["split"] == "test"
        assert config["model"]["init_args"]["add_special_tokens"] is True


@pytest.mark.slow
def test_a_count_with_no_encodable_prompt_is_refused_and_writes_nothing(tmp_path, configs_copy, monkeypatch, tokenizer):
    """Prompts whose highlights cannot be encoded are skipped, as a run skips them; when none is left the count is
    refused (naming the data option) and no count file is written."""
    unencodable = [{"uid": "counterfact/1/efficacy", "text": "Rome is in Italy.", "spans": [[3, 3]], "fields": {}}]
    monkeypatch.setattr(run, "load_tokenizer", lambda model: tokenizer)
    monkeypatch.setattr(run, "counterfact_dev_examples", lambda s: unencodable)
    settings = smollm2_settings("--length-scaling", "none", "8:0.5")
    with pytest.raises(
        ValueError, match="smollm2-135m: no CounterFact dev prompt could be encoded; check --shared-data"
    ):
        run.count_highlight_lengths(settings, SMOLLM2)
    assert not run.highlight_lengths_path(settings, SMOLLM2).exists()


@pytest.mark.skipif(not (SHARED_DATA / "counterfact").is_dir(), reason="needs ../shared/data/counterfact")
def test_cpu_smoke_build_and_final_counterfact_passes_verify(tmp_path):
    """The real SmolLM2 on CPU: a bank from 3 pairs, none and seka on 3 CounterFact test records, the table and
    `seka report --verify` (about 90 s on two shared cores)."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shutil.copytree(REPO / "data", tmp_path / "data")
    settings, _ = run.parse_args(["--out", "out"])
    for method, text in tuned_configs(settings, SMOLLM2, "last10", 2.0).items():
        (tmp_path / "configs" / "methods" / "smollm2-135m" / f"{method}.yaml").write_text(text)
    command = [
        sys.executable,
        str(REPO / "scripts" / "results" / "run.py"),
        "--models",
        "smollm2-135m",
        "--stages",
        "build",
        "final",
        "--methods",
        "none",
        "seka",
        "--benchmarks",
        "counterfact",
        "--limit",
        "3",
        "--jobs",
        "2",
        "--accelerator",
        "cpu",
        "--shared-data",
        str(SHARED_DATA),
        "--out",
        "out",
        "--results",
        "results",
        "--table",
        "table.md",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for method in ("none", "seka"):
        result = json.loads((tmp_path / "results/counterfact/smollm2-135m" / method / "metric_result.json").read_text())
        assert result["n"]["efficacy_score"] == 3
    assert "every metric under results equals its recomputation" in (tmp_path / "out/logs/verify.log").read_text()
    table = (tmp_path / "table.md").read_text()
    assert "| counterfact | smollm2-135m | seka |" in table
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)  # a re-run skips what exists
    assert again.returncode == 0 and "3 skipped (outputs exist)" in again.stderr


def test_sigterm_stops_the_running_commands(tmp_path):
    """A stopped runner (e.g. a device call's time limit) ends its commands instead of leaving them running."""
    pid_file = tmp_path / "pid"
    script = f"""
import os, signal, sys, time
sys.path.insert(0, {str(REPO / "scripts" / "results")!r})
import run
signal.signal(signal.SIGTERM, run._exit_on_sigterm)
settings, _ = run.parse_args(["--out", {str(tmp_path / "out")!r}])
code = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
run.execute([run.Job("sleeper", (sys.executable, "-c", code))], settings, workers=1)
"""
    runner = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # the terminated child is reaped by the runner's wait(); give it a moment
            os.kill(child, 0)
            time.sleep(0.05)


def test_final_without_tuned_configs_is_refused_before_running(tmp_path, configs_copy):
    for tuned in (tmp_path / "configs" / "methods").glob("*/seka.yaml"):
        tuned.unlink()
    with pytest.raises(FileNotFoundError, match=r"configs/methods/gemma3-270m/seka.yaml do not exist; .* select"):
        run.main(["--models", "gemma3-270m", "--stages", "final", "--methods", "none", "seka", "--out", "out"])
    assert not (tmp_path / "out").exists()


def test_results_without_predictions_are_refused_not_skipped(tmp_path, configs_copy):
    old = tmp_path / "results" / "counterfact" / "smollm2-135m" / "none"
    old.mkdir(parents=True)
    (old / "metric_result.json").write_text("{}")
    args = ["--models", "smollm2-135m", "--stages", "final", "--methods", "none", "--results", "results"]
    with pytest.raises(FileExistsError, match=r"1 result folders hold a metric_result.json without predictions"):
        run.main([*args, "--benchmarks", "counterfact", "--out", "out"])
    assert (old / "metric_result.json").read_text() == "{}" and not (tmp_path / "out").exists()


def test_counterfact_test_slice_and_limits(in_repo):
    settings, _ = run.parse_args(["--counterfact-test", "5000:6000"])
    assert run.data_args(settings, "counterfact", "test")[2:] == (
        "--data.split",
        "null",
        "--data.example_subset",
        "5000:6000",
    )
    assert run.data_args(settings, "counterfact", "dev")[2:] == ("--data.split", "dev", "--data.example_subset", "null")
    settings, _ = run.parse_args(["--limit", "5"])
    expected = {
        ("counterfact", "dev"): "4500:4505",
        ("lost_in_the_middle", "dev"): "2555:2560",
        ("pronchange", "dev"): "900:905",
        ("pronchange", "test"): "0:5",
    }
    for (benchmark, split), subset in expected.items():
        assert run.data_args(settings, benchmark, split)[2:] == (
            "--data.split",
            "null",
            "--data.example_subset",
            subset,
        )
    assert run.data_args(settings, "biasbios", "test")[2:] == ("--data.example_subset", "0:5")


def test_length_adaptive_strength_in_the_grid_dev_commands_dev_table_and_configs(tmp_path, configs_copy, capsys):
    """--length-scaling adds each grid point's length-adaptive twin right after it: its dev runs pass the options,
    and when the full-strength point fails a guard the twin is chosen, recorded in the dev table and written into the
    configs of SEKA and of both ablations (which share SEKA's strength)."""
    argv = ("--gains", "8", "--banks", "--methods", "seka", "--length-scaling", "8:0.5", "none")
    settings = smollm2_settings(*argv)
    assert settings.length_scalings == [None, (8, 0.5)]  # full strength first, whatever the order given
    assert [c.name for c in run.grid(settings, SMOLLM2)][:3] == ["all-g8", "all-g8-lref8-p0.5", "last20-g8"]
    lines = dry_run(capsys, "--models", "smollm2-135m", "--stages", "dev", "--out", "o", *argv)
    # the twins' CounterFact dev runs wait for the highlight count (they run only where they can score differently)
    assert not [line for line in lines if "o/dev/smollm2-135m/counterfact/last10-g8-lref8-p0.5" in line]
    assert [line for line in lines if line.startswith("[dev:smollm2-135m:highlight-lengths] count")]
    twin = run.dev_run(settings, SMOLLM2, "counterfact", run.grid(settings, SMOLLM2)[-1])
    assert twin.done == Path("outputs/results/dev/smollm2-135m/counterfact/last10-g8-lref8-p0.5/metric_result.json")
    assert "--model.method.layers last10 --model.method.length_reference 8 --model.method.length_power 0.5" in " ".join(
        twin.argv
    )
    wins = {"all-g8": 6, "last20-g8": 7, "last15-g8": 7, "last10-g8": 9, "none": 5}
    wins |= {f"{name}-lref8-p0.5": won for name, won in wins.items() if name != "none"}
    for name, won in wins.items():
        scores = [1.0] * won + [0.0] * (10 - won)
        write_dev_run(run.dev_dir(settings, SMOLLM2, "counterfact", name), "efficacy_score", scores)
    for name, em in {"none": 0.5, "last10-g8": 0.0, "last10-g8-lref8-p0.5": 0.5}.items():
        write_dev_run(run.dev_dir(settings, SMOLLM2, "lost_in_the_middle", name), "exact_match_inside", [em, 0.5])
        write_dev_run(run.dev_dir(settings, SMOLLM2, "pronchange", name), "pron_mean_p", [0.5, 0.5])
    assert run.write_selection(settings, SMOLLM2) == []
    table = json.loads((tmp_path / "results" / "dev" / "smollm2-135m.json").read_text())
    assert table["length_scalings"] == ["full", {"length_reference": 8, "length_power": 0.5}]
    assert table["chosen"] == {
        "name": "last10-g8-lref8-p0.5",
        "bank": "shipped",
        "layers": "last10",
        "gain": 8.0,
        "length_reference": 8,
        "length_power": 0.5,
    }
    rows = {row["name"]: row for row in table["candidates"]}
    assert rows["last10-g8"]["rejected"] == ["exact_match_inside: 0.2500 < unsteered - SE = 0.5000"]
    for method in ("seka", "key_scaling", "random"):
        config = yaml.safe_load((tmp_path / "configs" / "methods" / "smollm2-135m" / f"{method}.yaml").read_text())
        init_args = config["model"]["init_args"]["method"]["init_args"]
        assert (init_args["length_reference"], init_args["length_power"], init_args["gain_pos"]) == (8, 0.5, 8.0)


def cf_examples(counterfact_file, targets: list[tuple[str, str]]) -> list[dict]:
    """CounterFact prompts (``load_counterfact``, every case) whose new targets are ``targets`` (new, old)."""
    from seka_lightning.benchmarks import load_counterfact
    from seka_lightning.benchmarks.base import as_dict

    cases = [
        (i, f"Person {i}", "{} is a citizen of", new, old, ["{} holds a passport of"])
        for i, (new, old) in enumerate(targets)
    ]
    return [as_dict(e) for e in load_counterfact(counterfact_file(cases), split="all")]


@pytest.fixture
def counted(monkeypatch, tokenizer, counterfact_file):
    """count_highlight_lengths on small CounterFact cases with the test tokenizer (the runner loads the model's)."""
    examples = cf_examples(counterfact_file, [("France", "Spain"), ("the United Kingdom of Great Britain", "Peru")])
    monkeypatch.setattr(run, "load_tokenizer", lambda model: tokenizer)
    monkeypatch.setattr(run, "counterfact_dev_examples", lambda s: examples)
    return examples


def test_highlight_count_is_the_mask_a_run_steers(tmp_path, configs_copy, counted, tokenizer):
    """The counted lengths are the highlight masks of the prompts encoded as a run encodes its batches (left padding
    adds no highlighted token), and the record names the longest, the prompts and the encoding."""
    from seka_lightning.benchmarks import encode_examples

    settings = smollm2_settings("--length-scaling", "none", "8:0.5")
    record = run.count_highlight_lengths(settings, SMOLLM2)
    batch = encode_examples(tokenizer, counted)
    per_row = batch["highlight_mask"].sum(dim=1)
    assert record["longest"] == int(per_row.max()) and record["prompts"] == len(counted) == 4
    assert int(per_row.min()) < record["longest"]  # the long target is longer than the short one
    assert record["skipped"] == [] and record["encoding"] == {"chat": False, "add_special_tokens": False}
    assert json.loads(run.highlight_lengths_path(settings, SMOLLM2).read_text()) == record


def test_twins_run_counterfact_dev_only_where_a_highlight_is_longer_than_their_reference(
    tmp_path, configs_copy, counted
):
    """A twin whose reference reaches the longest CounterFact dev highlight scores every prompt at full strength: it
    gets no run, its candidate reads its full-strength point's scores and the dev table says so; a twin with a
    shorter reference gets its own run; guard round 0 waits for every run planned."""
    settings = smollm2_settings("--gains", "8", "--banks", "--methods", "seka", "--length-scaling", "none", "2:1")
    longest = run.count_highlight_lengths(settings, SMOLLM2)["longest"]
    assert longest > 2
    for reference, planned in ((longest, False), (longest - 1, True)):
        settings.length_scalings = [None, (reference, 1.0)]
        twins = [c for c in run.grid(settings, SMOLLM2) if c.length_reference is not None]
        jobs = run.length_twin_jobs(settings, SMOLLM2, twins, after=("first",))
        runs = [job.name for job in jobs if job.argv is not None]
        assert runs == ([f"dev:smollm2-135m:counterfact:{c.name}" for c in twins] if planned else [])
        assert jobs[-1].name == "dev:smollm2-135m:guard-round-0" and jobs[-1].after == ("first", *runs)
    settings.length_scalings = [None, (longest, 1.0)]
    wins = {"all-g8": 6, "last20-g8": 7, "last15-g8": 7, "last10-g8": 9, "none": 5}
    for name, won in wins.items():
        write_dev_run(
            run.dev_dir(settings, SMOLLM2, "counterfact", name), "efficacy_score", [1.0] * won + [0.0] * (10 - won)
        )
    write_dev_run(
        run.dev_dir(settings, SMOLLM2, "counterfact", f"all-g8-lref{longest}-p1"), "efficacy_score", [0.0] * 10
    )
    candidates = {c.name: c for c in run.dev_candidates(settings, SMOLLM2)}
    twin = candidates[f"last10-g8-lref{longest}-p1"]
    assert twin.metrics["efficacy_score"] == candidates["last10-g8"].metrics["efficacy_score"]
    assert candidates[f"all-g8-lref{longest}-p1"].metrics["efficacy_score"].mean == 0.0  # its own run wins
    for name in ("none", "last10-g8", f"last10-g8-lref{longest}-p1"):
        write_dev_run(run.dev_dir(settings, SMOLLM2, "lost_in_the_middle", name), "exact_match_inside", [0.5, 0.5])
        write_dev_run(run.dev_dir(settings, SMOLLM2, "pronchange", name), "pron_mean_p", [0.5, 0.5])
    assert run.write_selection(settings, SMOLLM2) == []
    table = json.loads((tmp_path / "results" / "dev" / "smollm2-135m.json").read_text())
    rows = {row["name"]: row for row in table["candidates"]}
    assert rows[f"last10-g8-lref{longest}-p1"]["counterfact_dev_run"] == "last10-g8"
    assert (
        "counterfact_dev_run" not in rows[f"all-g8-lref{longest}-p1"] and "counterfact_dev_run" not in rows["last10-g8"]
    )
    assert table["counterfact_highlights"]["longest"] == longest and table["counterfact_highlights"]["prompts"] == 4
    assert table["chosen"]["name"] == "last10-g8"  # a tie with its twin goes to full strength


def test_adaseka_twins_share_full_strength_runs_and_its_dev_table_records_the_schedules(
    tmp_path, configs_copy, counted
):
    """AdaSEKA's twins are planned, scored and recorded as SEKA's: one whose reference reaches the longest CounterFact
    dev highlight reads its full-strength point's run, and the 'adaseka' section of the dev table names the schedules
    and the count; adaseka.yaml gets the chosen schedule (here the twin with the better guards)."""
    import yaml

    argv = ["--methods", "adaseka", "--adaseka-layers", "last10", "--adaseka-gains", "1"]
    settings = smollm2_settings(*argv, "--length-scaling", "none", "2:1")
    longest = run.count_highlight_lengths(settings, SMOLLM2)["longest"]
    settings.length_scalings = [None, (longest, 1.0)]
    twin = f"adaseka-last10-g1-lref{longest}-p1"
    twins = [c for c in run.grid(settings, SMOLLM2, "adaseka") if c.length_reference is not None]
    assert [c.name for c in twins] == [twin]
    assert [job.argv for job in run.length_twin_jobs(settings, SMOLLM2, twins, after=())[:-1]] == []  # shares
    for name, won in {"none": 5, "adaseka-last10-g1": 8}.items():
        write_dev_run(
            run.dev_dir(settings, SMOLLM2, "counterfact", name), "efficacy_score", [1.0] * won + [0.0] * (10 - won)
        )
    for name, inside in {"none": 0.5, "adaseka-last10-g1": 0.0, twin: 0.5}.items():
        write_dev_run(run.dev_dir(settings, SMOLLM2, "lost_in_the_middle", name), "exact_match_inside", [inside] * 2)
        write_dev_run(run.dev_dir(settings, SMOLLM2, "pronchange", name), "pron_mean_p", [0.5, 0.5])
    assert run.write_selection(settings, SMOLLM2) == []
    table = json.loads((tmp_path / "results" / "dev" / "smollm2-135m.json").read_text())["adaseka"]
    rows = {row["name"]: row for row in table["candidates"]}
    assert rows[twin]["counterfact_dev_run"] == "adaseka-last10-g1"
    assert table["length_scalings"] == ["full", {"length_reference": longest, "length_power": 1.0}]
    assert table["counterfact_highlights"]["longest"] == longest
    assert table["chosen"]["name"] == twin  # full strength fails the lost-in-the-middle guard
    config = yaml.safe_load((tmp_path / "configs" / "methods" / "smollm2-135m" / "adaseka.yaml").read_text())
    init_args = config["model"]["init_args"]["method"]["init_args"]
    assert (init_args["length_reference"], init_args["length_power"]) == (longest, 1.0)


def test_twins_without_a_count_or_a_run_are_not_scored(tmp_path, configs_copy):
    """Without the highlight count a twin never borrows its full-strength point's scores: selecting is refused."""
    settings = smollm2_settings("--gains", "8", "--banks", "--methods", "seka", "--length-scaling", "none", "8:0.5")
    for name in ("none", "all-g8", "last20-g8", "last15-g8", "last10-g8"):
        write_dev_run(run.dev_dir(settings, SMOLLM2, "counterfact", name), "efficacy_score", [1.0, 0.0])
    assert not run.shares_full_strength_runs(settings, SMOLLM2, run.grid(settings, SMOLLM2)[1])
    with pytest.raises(FileNotFoundError, match=r"all-g8-lref8-p0.5 has no CounterFact dev run and no highlight count"):
        run.dev_candidates(settings, SMOLLM2)


def test_a_count_made_for_another_slice_or_a_grid_without_full_strength_shares_nothing(tmp_path, configs_copy, counted):
    """A twin borrows a full-strength run only when the grid makes that run (--length-scaling includes none) and the
    count was made for this slice, model and encoding: a --limit smoke count, or a grid of twins alone, plans the
    twins' own runs."""
    smoke = smollm2_settings(
        "--gains", "8", "--banks", "--methods", "seka", "--length-scaling", "none", "8:0.5", "--limit", "2"
    )
    longest = run.count_highlight_lengths(smoke, SMOLLM2)["longest"]
    settings = smollm2_settings(
        "--gains", "8", "--banks", "--methods", "seka", "--length-scaling", "none", f"{longest}:1"
    )
    twin = run.grid(settings, SMOLLM2)[1]
    assert run.highlight_count(smoke, SMOLLM2) is not None and run.highlight_count(settings, SMOLLM2) is None
    assert not run.shares_full_strength_runs(settings, SMOLLM2, twin)
    run.count_highlight_lengths(settings, SMOLLM2)
    assert run.shares_full_strength_runs(settings, SMOLLM2, twin)
    alone = smollm2_settings("--gains", "8", "--banks", "--methods", "seka", "--length-scaling", f"{longest}:1")
    twins = run.grid(alone, SMOLLM2)
    jobs = run.length_twin_jobs(alone, SMOLLM2, twins, after=())
    assert [job.name for job in jobs[:-1]] == [f"dev:smollm2-135m:counterfact:{c.name}" for c in twins]
    assert not run.shares_full_strength_runs(alone, SMOLLM2, twins[0])


def test_gemma_counts_with_its_bos_token(tmp_path, configs_copy, counted, tokenizer):
    """Gemma-3's config adds the tokenizer's special tokens: the count encodes the prompts that way."""
    from seka_lightning.benchmarks import encode_examples

    settings = run.parse_args(["--models", "gemma3-270m", "--results", "results", "--length-scaling", "none", "8:0.5"])[
        0
    ]
    record = run.count_highlight_lengths(settings, run.MODELS["gemma3-270m"])
    assert record["encoding"] == {"chat": False, "add_special_tokens": True}
    batch = encode_examples(tokenizer, counted, add_special_tokens=True)
    assert record["longest"] == int(batch["highlight_mask"].sum(dim=1).max())


@pytest.mark.skipif(not (SHARED_DATA / "counterfact").is_dir(), reason="needs ../shared/data/counterfact")
def test_counterfact_dev_examples_are_the_dev_slice(in_repo):
    """The prompts counted are the dev runs' prompts: cases 4500:5000 (an efficacy and a paraphrase prompt each), or
    the first --limit of them."""
    settings = run.parse_args(["--models", "smollm2-135m"])[0]
    examples = run.counterfact_dev_examples(settings)
    assert len(examples) == 1000 and {e["fields"]["case_id"] for e in examples} == set(range(4500, 5000))
    limited = run.counterfact_dev_examples(run.parse_args(["--limit", "3"])[0])
    assert [e["uid"] for e in limited] == [
        f"counterfact/{i}/{kind}" for i in range(4500, 4503) for kind in ("efficacy", "paraphrase/0")
    ]
