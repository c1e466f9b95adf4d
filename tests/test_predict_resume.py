"""An interrupted `seka predict` resumes from its partial state: the same files as an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import tiny_litm_predict_args

from seka_lightning.cli import run_lightning
from seka_lightning.lit import evaluator as evaluator_module
from seka_lightning.lit.partial import partial_path


def predict(model_dir: Path, oracle: Path, out: Path, *extra: str) -> None:
    run_lightning(
        [
            # 6 prompts: 3 batches
            *tiny_litm_predict_args(model_dir, oracle, gold_positions="[0, 3]", example_subset="0:3", batch_size=2),
            "--trainer.callbacks+", "seka_lightning.lit.writers.BenchmarkWriter",
            "--trainer.callbacks.output_dir", str(out),
            "--trainer.callbacks.checkpoint_every_s", "0",
            *extra,
        ]
    )  # fmt: skip


def interrupted() -> None:
    raise RuntimeError("interrupted")


def counting(monkeypatch, fail_at: int | None = None, interrupt=interrupted) -> list[int]:
    """Count the batches the model really runs; call ``interrupt`` at the start of the ``fail_at``-th one."""
    calls: list[int] = []
    real = evaluator_module.evaluate_batch

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            interrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluator_module, "evaluate_batch", wrapped)
    return calls


def test_an_interrupted_predict_resumes_and_writes_the_files_of_an_uninterrupted_run(
    tiny_model_dir, litm_oracle, tmp_path, monkeypatch, caplog
):
    predict(tiny_model_dir, litm_oracle, tmp_path / "whole")

    with pytest.raises(RuntimeError, match="interrupted"):
        counting(monkeypatch, fail_at=3)
        predict(tiny_model_dir, litm_oracle, tmp_path / "cut")
    partial = partial_path(tmp_path / "cut", 0)
    assert partial.exists() and not (tmp_path / "cut" / "metric_result.json").exists()

    monkeypatch.undo()
    calls = counting(monkeypatch)
    with caplog.at_level("INFO", logger="seka_lightning.lit.writers"):
        predict(tiny_model_dir, litm_oracle, tmp_path / "cut", "--trainer.callbacks.progress_every_s", "0")
    assert len(calls) == 1  # batches 0 and 1 were replayed from the partial state, only batch 2 ran
    # the time left is estimated from the batches this process ran, none before one has (replays take no model time)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("predict: ")]
    assert [line.split(" in ")[0] for line in progress] == [
        f"predict: {done}/3 batches ({min(done, 2)} resumed)" for done in (1, 2, 3)
    ]
    assert ["left" in line for line in progress] == [False, False, True] and progress[-1].endswith("about 0 s left")
    assert not partial.exists()
    read = lambda run, name: (tmp_path / run / name).read_bytes()  # noqa: E731
    assert read("cut", "predictions.jsonl.gz") == read("whole", "predictions.jsonl.gz")
    whole, cut = (json.loads(read(run, "metric_result.json")) for run in ("whole", "cut"))
    assert cut["metrics"] == whole["metrics"] and cut["intervals"] == whole["intervals"]
    assert cut["counts"] == {**whole["counts"], "resumed_batches": 2}
    assert "resumed_batches" not in whole["counts"]


def test_a_partial_state_of_other_settings_or_a_corrupt_one_is_refused_and_kept(
    tiny_model_dir, litm_oracle, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="interrupted"):
        counting(monkeypatch, fail_at=2)
        predict(tiny_model_dir, litm_oracle, out)
    partial = partial_path(out, 0)
    saved = partial.read_bytes()
    monkeypatch.undo()

    with pytest.raises(ValueError, match=r"was written by a predict run with other settings; delete .*predict_partial"):
        predict(tiny_model_dir, litm_oracle, out, "--data.max_new_tokens", "5")
    assert partial.read_bytes() == saved  # refused, nothing destroyed
    with pytest.raises(ValueError, match=r"was written by a predict run with other settings"):
        predict(tiny_model_dir, litm_oracle, out, "--trainer.precision", "bf16-mixed")  # autocast changes the rows
    assert partial.read_bytes() == saved

    partial.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(ValueError, match=r"^cannot read the partial predict state .*; delete .* to start the run over"):
        predict(tiny_model_dir, litm_oracle, out)

    predict(tiny_model_dir, litm_oracle, out, "--trainer.callbacks.resume", "false")  # start over, as asked
    assert (out / "metric_result.json").exists() and not partial.exists()


def assert_the_last_batch_completes_the_run(
    model_dir: Path, oracle: Path, tmp_path: Path, monkeypatch, batches_left: int = 1
) -> None:
    """The same command on ``tmp_path / "cut"`` runs only the last ``batches_left`` of the three batches and writes the
    predictions of "whole"."""
    monkeypatch.undo()
    resumed_calls = counting(monkeypatch)
    predict(model_dir, oracle, tmp_path / "cut")
    assert len(resumed_calls) == batches_left
    read = lambda run: (tmp_path / run / "predictions.jsonl.gz").read_bytes()  # noqa: E731
    assert read("cut") == read("whole")


def test_sigterm_stops_predict_at_a_batch_end_with_status_143_and_the_run_resumes(
    tiny_model_dir, litm_oracle, tmp_path, monkeypatch
):
    """Lightning's predict loop runs on after SIGTERM (and exits 0); the writer saves the finished batches, even with
    no periodic save due, and stops the run, which the same command then completes."""
    import os
    import signal

    predict(tiny_model_dir, litm_oracle, tmp_path / "whole")
    # during the second batch; Lightning's handler records it
    calls = counting(monkeypatch, fail_at=2, interrupt=lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stopped:
        predict(tiny_model_dir, litm_oracle, tmp_path / "cut", "--trainer.callbacks.checkpoint_every_s", "1000")
    assert stopped.value.code == 128 + signal.SIGTERM and len(calls) == 2
    assert partial_path(tmp_path / "cut", 0).exists() and not (tmp_path / "cut" / "metric_result.json").exists()

    assert_the_last_batch_completes_the_run(tiny_model_dir, litm_oracle, tmp_path, monkeypatch)


def test_a_commit_that_changes_no_code_keeps_the_run_resumable_an_edit_to_the_code_does_not(
    tiny_model_dir, litm_oracle, tmp_path, monkeypatch
):
    """The fingerprint names the code by the package's files, not by the git state: a commit of docs or results
    (another commit, the same files) resumes; code edited since the save (the same commit, dirty or not) is refused."""
    from seka_lightning.lit import writers
    from seka_lightning.provenance import SOURCE_SHA256_AT_IMPORT, source_sha256

    predict(tiny_model_dir, litm_oracle, tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / "metric_result.json").read_text())
    assert whole["provenance"]["source_sha256"] == SOURCE_SHA256_AT_IMPORT == source_sha256()
    with pytest.raises(RuntimeError, match="interrupted"):
        counting(monkeypatch, fail_at=3)
        predict(tiny_model_dir, litm_oracle, tmp_path / "cut")
    partial = partial_path(tmp_path / "cut", 0)
    saved = partial.read_bytes()
    monkeypatch.undo()

    monkeypatch.setattr(writers, "SOURCE_SHA256_AT_IMPORT", "0" * 64)  # edited code, whatever git says
    with pytest.raises(ValueError, match=r"was written by a predict run with other settings"):
        predict(tiny_model_dir, litm_oracle, tmp_path / "cut")
    assert partial.read_bytes() == saved
    monkeypatch.undo()

    with pytest.MonkeyPatch.context() as later_commit:  # kept through the helper's undo of ``monkeypatch``
        later_commit.setattr(writers, "git_state", lambda: {"commit": "f" * 40, "dirty": True})
        assert_the_last_batch_completes_the_run(tiny_model_dir, litm_oracle, tmp_path, monkeypatch)
    cut = json.loads((tmp_path / "cut" / "metric_result.json").read_text())
    assert cut["provenance"]["git"]["commit"] == "f" * 40  # the resumed run records the code it finished on

    # code whose files cannot be hashed (None) is named by the git state instead: another commit is refused
    monkeypatch.undo()
    monkeypatch.setattr(writers, "SOURCE_SHA256_AT_IMPORT", None)
    with pytest.raises(RuntimeError, match="interrupted"):
        counting(monkeypatch, fail_at=3)
        predict(tiny_model_dir, litm_oracle, tmp_path / "unhashed")
    monkeypatch.setattr(writers, "git_state", lambda: {"commit": "e" * 40, "dirty": False})
    with pytest.raises(ValueError, match=r"was written by a predict run with other settings"):
        predict(tiny_model_dir, litm_oracle, tmp_path / "unhashed")


def saved_batches(out: Path) -> int:
    import torch

    return len(torch.load(partial_path(out, 0), weights_only=False)["rows"])


def test_ctrl_c_saves_the_finished_batches_exits_1_and_the_run_resumes(
    tiny_model_dir, litm_oracle, tmp_path, monkeypatch, caplog
):
    """Ctrl-C during the third of three batches, with no periodic save due: the two finished batches are saved,
    the process exits 1 (Lightning's exit on KeyboardInterrupt), and the same command completes the run."""
    predict(tiny_model_dir, litm_oracle, tmp_path / "whole")

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    counting(monkeypatch, fail_at=3, interrupt=ctrl_c)
    with pytest.raises(SystemExit) as stopped:
        predict(tiny_model_dir, litm_oracle, tmp_path / "cut", "--trainer.callbacks.checkpoint_every_s", "1000")
    assert stopped.value.code == 1 and saved_batches(tmp_path / "cut") == 2
    assert "KeyboardInterrupt after 2 finished batches: saved in" in caplog.text
    assert not (tmp_path / "cut" / "metric_result.json").exists()

    assert_the_last_batch_completes_the_run(tiny_model_dir, litm_oracle, tmp_path, monkeypatch)


def test_a_batch_that_fails_after_updating_the_scorer_saves_nothing_new(
    tiny_model_dir, litm_oracle, tmp_path, monkeypatch, caplog
):
    """The third batch fails after its scorer update: the scorer no longer matches the finished batches' rows, so
    nothing is saved over the last periodic save (here none: no file), rather than a state that would count a batch
    twice on resuming."""
    calls: list[int] = []
    real = evaluator_module.evaluate_batch

    def fails_after_the_update(*args, **kwargs):
        calls.append(1)
        rows = real(*args, **kwargs)
        if len(calls) == 3:
            raise RuntimeError("after the update")
        return rows

    monkeypatch.setattr(evaluator_module, "evaluate_batch", fails_after_the_update)
    with pytest.raises(RuntimeError, match="after the update"):
        predict(tiny_model_dir, litm_oracle, tmp_path / "cut", "--trainer.callbacks.checkpoint_every_s", "1000")
    assert not partial_path(tmp_path / "cut", 0).exists()
    assert "RuntimeError after 2 finished batches: the failed batch had already updated the scorer" in caplog.text


def test_a_save_that_fails_on_the_way_out_keeps_the_last_saved_state_and_the_first_error(
    tiny_model_dir, litm_oracle, tmp_path, monkeypatch, caplog
):
    """A run saved after its first batch resumes, finishes the second and fails in the third; saving its two batches
    then fails half-way through the write (a full disk, a dead CUDA context): the file saved before is kept byte for
    byte, no temp file is left, the run's own error is the one raised, and the same command still completes the run."""
    from seka_lightning.lit import partial as partial_module

    cut, saved = tmp_path / "cut", partial_path(tmp_path / "cut", 0)
    counting(monkeypatch, fail_at=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        predict(tiny_model_dir, litm_oracle, cut)  # checkpoint_every_s 0: saved after batch 1
    before = saved.read_bytes()
    assert saved_batches(cut) == 1

    monkeypatch.undo()
    counting(monkeypatch, fail_at=2)  # the resumed run's second batch: the run's third

    def disk_full(payload, tmp) -> None:
        Path(tmp).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(partial_module.torch, "save", disk_full)
    with pytest.raises(RuntimeError, match="interrupted"):
        predict(tiny_model_dir, litm_oracle, cut, "--trainer.callbacks.checkpoint_every_s", "1000")
    assert (
        f"RuntimeError after 2 finished batches: saving them failed ([Errno 28] No space left on device); {saved} "
        "keeps 1 of them" in caplog.text
    )
    assert saved.read_bytes() == before and sorted(p.name for p in cut.iterdir()) == [saved.name]

    monkeypatch.undo()
    predict(tiny_model_dir, litm_oracle, tmp_path / "whole")
    # batches 2 and 3: batch 1 comes from the kept file
    assert_the_last_batch_completes_the_run(tiny_model_dir, litm_oracle, tmp_path, monkeypatch, batches_left=2)


def test_the_weights_are_hashed_once_per_run_for_the_fingerprint_and_the_provenance(
    tiny_model_dir, litm_oracle, tmp_path, monkeypatch
):
    from seka_lightning import provenance
    from seka_lightning.lit import writers
    from seka_lightning.provenance import weights_hash

    calls: list[str] = []

    def counted(pretrained: str) -> dict:
        calls.append(pretrained)
        return weights_hash(pretrained)

    for module in (writers, provenance):  # every place a run could hash the weights
        monkeypatch.setattr(module, "weights_hash", counted)
    predict(tiny_model_dir, litm_oracle, tmp_path / "run")
    assert calls == [str(tiny_model_dir)]
    recorded = json.loads((tmp_path / "run" / "metric_result.json").read_text())["provenance"]["model"]
    from seka_lightning.models import load_model

    _, tokenizer = load_model(str(tiny_model_dir))  # as the evaluator loads it (pad token set)
    expected_tokenizer = provenance.tokenizer_sha256(tokenizer)
    assert expected_tokenizer is not None
    assert recorded == {
        "id": str(tiny_model_dir),
        **weights_hash(str(tiny_model_dir)),
        "tokenizer_sha256": expected_tokenizer,
    }


def test_bad_partial_states_and_settings_are_refused_with_the_way_out(tmp_path):
    import torch
    from torchmetrics import MeanMetric, SumMetric

    from seka_lightning.lit.partial import PartialRun, load_metric_states, load_partial, metric_states, save_partial
    from seka_lightning.lit.writers import BenchmarkWriter

    with pytest.raises(ValueError, match=r"^checkpoint_every_s must be >= 0 seconds or None, got -1$"):
        BenchmarkWriter(str(tmp_path / "run"), checkpoint_every_s=-1)

    other = tmp_path / "other.pt"
    torch.save({"format": 99}, other)
    with pytest.raises(
        ValueError, match=r"^.*other\.pt is not a partial predict state of format 1; delete .*other\.pt"
    ):
        load_partial(other, "fingerprint")

    class Scorer(torch.nn.Module):
        def __init__(self, metric) -> None:
            super().__init__()
            self.metric = metric

    saved = Scorer(SumMetric())
    saved.metric.update(torch.tensor(3.0))
    path = tmp_path / "partial.pt"
    save_partial(path, PartialRun("fingerprint", rows=[[{"uid": 0}]], metric_states=metric_states(saved)))
    restored = Scorer(SumMetric())
    load_metric_states(restored, load_partial(path, "fingerprint").metric_states, torch.device("cpu"))
    assert restored.metric.compute() == 3.0
    with pytest.raises(
        ValueError, match=r"^the saved scorer states \(\['metric'\]\) do not match this scorer's metrics"
    ):
        load_metric_states(Scorer(MeanMetric()), metric_states(saved), torch.device("cpu"))
