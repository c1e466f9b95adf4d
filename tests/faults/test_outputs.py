"""One overwrite policy for every writer: never an input, never a file of another kind, the same kind only with
overwrite; checked before any model loads."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from seka_lightning import ProjectionBank
from seka_lightning.bank import stats_path_for
from seka_lightning.cli import main
from seka_lightning.lit.frozen import FrozenModelModule
from seka_lightning.stats import KeyStatistics

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def stats(tmp_path) -> Path:
    gen = torch.Generator().manual_seed(0)
    h, hp, hn = (torch.randn(2, 30, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    metric = KeyStatistics(2, 2, 4)
    metric.update(h, hp, hn)
    path = tmp_path / "bank.stats.safetensors"
    metric.compute().save(path, metadata={"layers": [0, 1], "head_dim": 4, "model_id": "m"})
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any command loads a model before refusing its output."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(FrozenModelModule, "load_frozen_model", refuse)
    monkeypatch.setattr("seka_lightning.baselines.pasta_profile.load_model", refuse)


def test_derive_never_writes_over_its_statistics(stats):
    before = stats.read_bytes()
    for extra in ([], ["--overwrite", "true"]):
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"the output {stats} is also this command's input --stats ({stats}); writing it would destroy the "
                "input: choose another output path"
            ),
        ):
            main(["derive", "--stats", str(stats), "--output", str(stats), *extra])
    assert stats.read_bytes() == before


def test_derive_replaces_a_bank_only_with_overwrite(stats, tmp_path):
    output = tmp_path / "derived.safetensors"
    main(["derive", "--stats", str(stats), "--output", str(output), "--min_diff", "0"])
    first = output.read_bytes()
    with pytest.raises(
        FileExistsError,
        match=re.escape(
            f"{output} already holds a projection bank; pass --overwrite to replace it, or choose another path"
        ),
    ):
        main(["derive", "--stats", str(stats), "--output", str(output), "--top_pct", "0.5", "--min_diff", "0"])
    assert output.read_bytes() == first
    main(
        [
            "derive",
            "--stats",
            str(stats),
            "--output",
            str(output),
            "--top_pct",
            "0.5",
            "--min_diff",
            "0",
            "--overwrite",
            "true",
        ]
    )
    assert ProjectionBank.load(output).metadata["top_pct"] == 0.5


def test_derive_never_replaces_a_file_of_another_kind(stats, tmp_path):
    other = tmp_path / "other.stats.safetensors"
    shutil.copy(stats, other)
    with pytest.raises(
        FileExistsError,
        match=re.escape(
            f"{other} already holds a key-statistics file, not a projection bank; choose another output path "
            "(--overwrite never replaces a file of another kind)"
        ),
    ):
        main(["derive", "--stats", str(stats), "--output", str(other), "--overwrite", "true"])
    notes = tmp_path / "notes.safetensors"
    notes.write_bytes(b"my own data")
    with pytest.raises(
        FileExistsError,
        match=re.escape(
            f"{notes} already exists and is not a projection bank written by seka; choose another output path "
            "(--overwrite never replaces other files)"
        ),
    ):
        main(["derive", "--stats", str(stats), "--output", str(notes), "--overwrite", "true"])
    assert notes.read_bytes() == b"my own data"


def test_derive_refuses_a_bank_beside_statistics_of_another_build(stats, tmp_path):
    shutil.copy(stats, tmp_path / "b.stats.safetensors")
    output = tmp_path / "b.safetensors"
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{output} would sit beside {stats_path_for(output)}, statistics it was not derived from, and then fail "
            "to load; choose another output path"
        ),
    ):
        main(["derive", "--stats", str(stats), "--output", str(output)])


def test_the_builder_checks_its_outputs_before_loading_the_model(stats, tmp_path, no_model):
    from seka_lightning.lit.builder import ProjectionBuilder

    bank = tmp_path / "bank.safetensors"
    ProjectionBank(layers=[0], pos=torch.zeros(1, 1, 2, 2)).save(bank)
    with pytest.raises(
        FileExistsError,
        match=re.escape(
            f"{bank} already holds a projection bank; pass --model.overwrite true to replace it, or choose another path"
        ),
    ):
        ProjectionBuilder("embedded:smollm2-135m", output=str(bank))
    with pytest.raises(
        FileExistsError, match=re.escape(f"{stats} already holds a key-statistics file, not a projection bank")
    ):
        ProjectionBuilder("embedded:smollm2-135m", output=str(stats), overwrite=True)
    # overwrite=True passes the checks (and reaches the model load)
    with pytest.raises(AssertionError, match="a model was loaded"):
        ProjectionBuilder("embedded:smollm2-135m", output=str(bank), overwrite=True)


def test_writers_refuse_data_files_and_earlier_results(tmp_path):
    from seka_lightning.evidence import write_predictions
    from seka_lightning.lit.writers import BenchmarkWriter, ComparisonWriter

    data = tmp_path / "synthetic_qa.jsonl"
    shutil.copy(REPO / "data" / "synthetic_qa.jsonl", data)
    with pytest.raises(
        FileExistsError,
        match=re.escape(
            f"{data} already exists and is not a predictions file written by seka; choose another output path "
            "(the writer's `overwrite: true` init arg never replaces other files)"
        ),
    ):
        ComparisonWriter(str(data), overwrite=True)
    run = tmp_path / "run"
    run.mkdir()
    write_predictions(run / "predictions.jsonl.gz", [{"id": "a", "scores": {"x": 1.0}}])
    (run / "metric_result.json").write_text(json.dumps({"metrics": {}, "method": {}}))
    with pytest.raises(
        FileExistsError,
        match=re.escape(
            f"{run / 'predictions.jsonl.gz'} already holds a predictions file; pass the writer's `overwrite: true` "
            "init arg to replace it, or choose another path"
        ),
    ):
        BenchmarkWriter(str(run))
    BenchmarkWriter(str(run), overwrite=True)


def test_report_never_writes_over_a_result_or_a_user_file(tmp_path):
    from seka_lightning.evidence import summarize, write_predictions
    from seka_lightning.report import report

    results = tmp_path / "results"
    run = results / "counterfact" / "m" / "none"
    run.mkdir(parents=True)
    records = [{"id": i, "scores": {"efficacy_score": float(i % 2)}} for i in range(4)]
    write_predictions(run / "predictions.jsonl.gz", records)
    result = run / "metric_result.json"
    result.write_text(json.dumps({**summarize(records), "method": {"method": "none"}, "model": "m", "config": {}}))
    with pytest.raises(ValueError, match=re.escape(f"the output {results} is also this command's input --results")):
        report(results=str(results), output=str(results), plot=None)
    with pytest.raises(
        FileExistsError, match=re.escape(f"{result} already holds a benchmark result, not a results table")
    ):
        report(results=str(results), output=str(result), plot=None, overwrite=True)
    readme = tmp_path / "README.md"
    readme.write_text("# my notes\n")
    with pytest.raises(
        FileExistsError, match=re.escape(f"{readme} already exists and is not a results table written by seka")
    ):
        report(results=str(results), output=str(readme), plot=None, overwrite=True)
    assert readme.read_text() == "# my notes\n"
    table = tmp_path / "table.md"
    report(results=str(results), output=str(table), plot=None)
    with pytest.raises(FileExistsError, match=re.escape(f"{table} already holds a results table; pass --overwrite")):
        report(results=str(results), output=str(table), plot=None)
    report(results=str(results), output=str(table), plot=None, overwrite=True)


def test_pasta_profile_validator_and_gate_check_before_the_model_loads(tmp_path, no_model):
    from seka_lightning.adaseka.gate import AdaSekaGateTrainer
    from seka_lightning.baselines.pasta_profile import profile_heads
    from seka_lightning.lit.validator import BankValidator
    from seka_lightning.methods import SekaMethod

    data = tmp_path / "qa.jsonl"
    shutil.copy(REPO / "data" / "synthetic_qa.jsonl", data)
    with pytest.raises(ValueError, match=re.escape(f"the output {data} is also this command's input --data")):
        profile_heads(pretrained="embedded:smollm2-135m", data=str(data), output=str(data))
    bank = ProjectionBank(layers=[0], pos=torch.zeros(1, 1, 2, 2)).save(tmp_path / "bank.safetensors")
    with pytest.raises(
        ValueError, match=re.escape(f"the output {bank} is also this command's input --model.method.bank")
    ):
        BankValidator("embedded:smollm2-135m", SekaMethod(str(bank)), output=str(bank))
    with pytest.raises(ValueError, match=re.escape(f"the output {bank} is also this command's input --model.experts")):
        AdaSekaGateTrainer("embedded:smollm2-135m", {"a": str(bank)}, output=str(bank))


def test_lightning_cli_checks_the_writer_before_the_model_loads(tmp_path, no_model):
    from seka_lightning.cli import run_lightning

    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"index": 0, "prompt": "p", "unsteered": "a", "steered": "b"}) + "\n")
    bank = ProjectionBank(layers=[0], pos=torch.zeros(1, 1, 2, 2)).save(tmp_path / "bank.safetensors")
    args = ["predict", "-c", str(REPO / "configs/predict/highlight.yaml"), "--trainer.callbacks.output", str(old)]
    args += ["--model.method.bank", str(bank)]
    with pytest.raises(ValueError) as err:
        run_lightning([*args, "--trainer.accelerator", "cpu"])
    assert str(err.value.__cause__) == (
        f"{old} already holds a predictions file; pass the writer's `overwrite: true` init arg to replace it, or "
        "choose another path"
    )


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    from seka_lightning.files import BANK, check_output

    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder would go\n")
    with pytest.raises(
        NotADirectoryError,
        match=re.escape(
            f"cannot write {blocker / 'sub' / 'bank.safetensors'}: {blocker} is a file, not a folder; choose an "
            "output path under a folder"
        ),
    ):
        check_output(blocker / "sub" / "bank.safetensors", kind=BANK)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(
        PermissionError,
        match=re.escape(
            f"cannot write {locked / 'new' / 'bank.safetensors'}: the folder {locked} is not writable; choose an "
            "output path you can write to"
        ),
    ):
        check_output(locked / "new" / "bank.safetensors", kind=BANK)
    assert not (locked / "new").exists()
    assert (
        check_output(tmp_path / "a" / "b" / "bank.safetensors", kind=BANK) == tmp_path / "a" / "b" / "bank.safetensors"
    )


def test_plain_commands_end_with_the_natural_next_command(stats, tmp_path, caplog):
    import logging

    output = tmp_path / "derived.safetensors"
    with caplog.at_level(logging.INFO, logger="seka_lightning.cli"):
        main(["derive", "--stats", str(stats), "--output", str(output), "--min_diff", "0"])
    assert caplog.messages[-1] == f"next: seka predict -c configs/predict/highlight.yaml --model.method.bank {output}"


def test_a_bare_overwrite_flag_replaces_as_the_error_message_says(stats, tmp_path):
    output = tmp_path / "derived.safetensors"
    main(["derive", "--stats", str(stats), "--output", str(output), "--min_diff", "0"])
    first = output.read_bytes()
    main(
        ["derive", "--stats", str(stats), "--output", str(output), "--top_pct", "0.5", "--min_diff", "0", "--overwrite"]
    )
    assert output.read_bytes() != first
    main(["derive", "--stats", str(stats), "--output", str(output), "--overwrite", "--min_diff", "0"])
    with pytest.raises(FileExistsError, match="pass --overwrite to replace it"):
        main(["derive", "--stats", str(stats), "--output", str(output), "--overwrite", "false", "--min_diff", "0"])
