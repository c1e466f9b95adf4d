"""SIGTERM or SIGINT during `seka fit` saves a resumable checkpoint and exits non-zero, on one process and when the
signal reaches any one of two DDP ranks; resuming gives the bank of an uninterrupted build. During a two-rank
`seka predict`, a signal to one rank stops both with their partial files, also when it comes during the extra last
batch of the rank that has one, and resuming gives the files of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_litm_predict_args

from seka_lightning.bank import ProjectionBank
from seka_lightning.cli import run_lightning
from seka_lightning.evidence import METRIC_RESULT, PREDICTIONS
from seka_lightning.lit.builder import stats_path_for
from seka_lightning.lit.partial import partial_files, partial_path
from seka_lightning.stats import KeySums

REPO = Path(__file__).resolve().parents[2]
BUILD_CONFIG = REPO / "configs" / "build" / "synthetic_qa.yaml"
HERE = Path(__file__).resolve().parent
STOP_WITHIN_S = 60


def fit_args(
    model_dir: Path, qa_path: Path, out: Path, ckpt_dir: Path, *, devices: int, throttle: Path | None
) -> list[str]:
    """12 pairs = 24 triplets in batches of 2; a checkpoint every 2 batches; optionally slowed after batch 2."""
    callbacks = [
        {
            "class_path": "seka_lightning.lit.callbacks.BatchCheckpoint",
            "init_args": {"dirpath": str(ckpt_dir), "every_n_batches": 2},
        }
    ]
    if throttle is not None:
        callbacks.append({"class_path": "throttle.Throttle", "init_args": {"folder": str(throttle)}})
    return [
        "fit",
        "-c",
        str(BUILD_CONFIG),
        "--model.pretrained",
        str(model_dir),
        "--model.dtype",
        "float64",
        "--model.top_pct",
        "0.7",
        "--model.min_diff",
        "0.0",
        "--model.output",
        str(out),
        "--data.path",
        str(qa_path),
        "--data.max_samples",
        "12",
        "--data.batch_size",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(devices),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks",
        json.dumps(callbacks),
    ]


def start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "seka_lightning.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 240) -> int:
    """The pid written to ``path`` once the run reached its throttled batches (fails if a process ended first)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            output = finish(procs, 1)
            pytest.fail(f"the run never reached its throttled batch: {output[-3000:]}")
        time.sleep(0.05)
    time.sleep(0.05)  # the pid is written before the file is closed
    return int(path.read_text())


def finish(procs: list[subprocess.Popen], timeout: float) -> str:
    """Wait for every process (killing those still running after ``timeout`` s); their output."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
    hung = [p for p in procs if p.poll() is None]
    for p in hung:
        p.kill()
    output = "\n".join(p.communicate()[0] or "" for p in procs)
    if hung:
        pytest.fail(f"{len(hung)} process(es) still ran {timeout} s after the signal: {output[-3000:]}")
    return output


@pytest.fixture(scope="module")
def reference_build(tiny_model_dir, tmp_path_factory):
    """An uninterrupted one-device build of a QA file, built once per file content for the tests of this module."""
    built: dict[bytes, Path] = {}

    def build(qa_path: Path) -> Path:
        content = qa_path.read_bytes()
        if content not in built:
            folder = tmp_path_factory.mktemp("uninterrupted")
            (folder / "qa.jsonl").write_bytes(content)
            out = folder / "full.safetensors"
            run_lightning(fit_args(tiny_model_dir, folder / "qa.jsonl", out, folder / "ck", devices=1, throttle=None))
            built[content] = out
        return built[content]

    return build


def assert_same_build(a: Path, b: Path, *, exact: bool) -> None:
    bank_a, bank_b = ProjectionBank.load(a), ProjectionBank.load(b)
    assert bank_a.metadata["triplets_used"] == bank_b.metadata["triplets_used"] == 24
    assert bank_a.metadata["num_rows"] == bank_b.metadata["num_rows"]
    sums_a, _ = KeySums.load(stats_path_for(a))
    sums_b, _ = KeySums.load(stats_path_for(b))
    for name, tensor in sums_a.tensors().items():
        if exact:
            assert torch.equal(tensor, sums_b.tensors()[name]), name
        else:  # DDP adds the ranks' sums in another order
            torch.testing.assert_close(tensor, sums_b.tensors()[name], rtol=1e-12, atol=1e-9)
    if exact:
        assert torch.equal(bank_a.pos, bank_b.pos) and torch.equal(bank_a.neg, bank_b.neg)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_exits_non_zero_and_the_resume_equals_an_uninterrupted_build(
    tiny_model_dir, qa_file, tmp_path, signum, reference_build
):
    out, ckpt_dir = tmp_path / "bank.safetensors", tmp_path / "ck"
    args = fit_args(tiny_model_dir, qa_file, out, ckpt_dir, devices=1, throttle=tmp_path)
    proc = start(args, tmp_path)
    os.kill(wait_for(tmp_path / "ready.0", [proc]), signum)
    output = finish([proc], STOP_WITHIN_S)

    assert proc.returncode == 128 + signum, output[-3000:]
    assert not out.exists(), "a stopped build must not write a bank"
    checkpoint = ckpt_dir / "last.ckpt"
    assert f"resume with the same command plus --ckpt_path {checkpoint}" in output
    consumed = torch.load(checkpoint, weights_only=True)["SyntheticQADataModule"]["batches_consumed"]
    assert 2 <= consumed < 12, "the checkpoint must be the stopped build's, mid-run"
    assert [p.name for p in ckpt_dir.iterdir()] == ["last.ckpt"]

    run_lightning(
        [*fit_args(tiny_model_dir, qa_file, out, ckpt_dir, devices=1, throttle=None), "--ckpt_path", str(checkpoint)]
    )
    assert_same_build(reference_build(qa_file), out, exact=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args: list[str], cwd: Path) -> list[subprocess.Popen]:
    """Two ranks launched as torchrun would (one process each, so the test knows both pids and exit codes)."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "NODE_RANK": "0"}
    return [start(args, cwd, LOCAL_RANK=str(rank), **env) for rank in range(2)]


def test_sigterm_to_one_ddp_rank_stops_both_with_a_resumable_checkpoint(
    tiny_model_dir, qa_file, tmp_path, reference_build
):
    out, ckpt_dir = tmp_path / "bank.safetensors", tmp_path / "ck"
    args = fit_args(tiny_model_dir, qa_file, out, ckpt_dir, devices=2, throttle=tmp_path)
    ranks = start_ranks(args, tmp_path)
    rank1 = wait_for(tmp_path / "ready.1", ranks)
    assert rank1 == ranks[1].pid
    os.kill(rank1, signal.SIGTERM)
    signalled = time.monotonic()
    output = finish(ranks, STOP_WITHIN_S)
    assert time.monotonic() - signalled < STOP_WITHIN_S
    assert [p.returncode for p in ranks] == [128 + signal.SIGTERM] * 2, output[-3000:]
    assert not out.exists()
    saved = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert (
        saved["SyntheticQADataModule"]["world_size"] == 2
        and 2 <= saved["SyntheticQADataModule"]["batches_consumed"] < 6
    )

    resumed = start_ranks(
        [
            *fit_args(tiny_model_dir, qa_file, out, ckpt_dir, devices=2, throttle=None),
            "--ckpt_path",
            str(ckpt_dir / "last.ckpt"),
        ],
        tmp_path,
    )
    output = finish(resumed, 240)
    assert [p.returncode for p in resumed] == [0, 0], output[-3000:]
    assert_same_build(reference_build(qa_file), out, exact=False)


def predict_args(
    model_dir: Path, oracle: Path, out: Path, *, throttle: Path | None = None, hold_rank: int = 0, ready_after: int = 1
) -> list[str]:
    """5 lost-in-the-middle prompts in batches of 1 on two CPU ranks: rank 0 has batches 0, 2, 4 and rank 1 has
    batches 1, 3. No periodic save: what a stopped run keeps is what it saved when it stopped. With ``throttle``,
    rank ``hold_rank`` waits after its batch ``ready_after`` until the test has signalled it."""
    callbacks = [
        {
            "class_path": "seka_lightning.lit.writers.BenchmarkWriter",
            "init_args": {"output_dir": str(out), "checkpoint_every_s": 1000},
        }
    ]
    if throttle is not None:
        callbacks.append(
            {
                "class_path": "throttle.Throttle",
                "init_args": {"folder": str(throttle), "ready_after": ready_after, "hold_rank": hold_rank},
            }
        )
    return [
        *tiny_litm_predict_args(model_dir, oracle, gold_positions="[0]", example_subset="0:5", batch_size=1),
        "--trainer.devices", "2",
        "--trainer.callbacks", json.dumps(callbacks),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference_predict(tiny_model_dir, tmp_path_factory):
    """An uninterrupted two-rank predict run of an oracle file, run once per file content for this module's tests."""
    written: dict[bytes, Path] = {}

    def run(oracle: Path) -> Path:
        content = oracle.read_bytes()
        if content not in written:
            folder = tmp_path_factory.mktemp("uninterrupted_predict")
            (folder / oracle.name).write_bytes(content)
            ranks = start_ranks(predict_args(tiny_model_dir, folder / oracle.name, folder / "out"), folder)
            output = finish(ranks, 240)
            assert [p.returncode for p in ranks] == [0, 0], output[-3000:]
            written[content] = folder / "out"
        return written[content]

    return run


def signal_one_rank(args: list[str], cwd: Path, rank: int, signum: int) -> tuple[list[subprocess.Popen], str]:
    """Start two ranks, signal ``rank`` where its throttle holds it, and wait for both (failing if either runs on
    longer than ``STOP_WITHIN_S``); the ranks and their output."""
    ranks = start_ranks(args, cwd)
    pid = wait_for(cwd / f"ready.{rank}", ranks)
    assert pid == ranks[rank].pid
    os.kill(pid, signum)
    (cwd / "sent").write_text("")
    return ranks, finish(ranks, STOP_WITHIN_S)


def saved_batches(out: Path) -> list[int]:
    """The number of finished batches in each rank's partial file."""
    return [len(torch.load(partial_path(out, rank), weights_only=True)["rows"]) for rank in range(2)]


def assert_resumes_to_the_uninterrupted_files(args: list[str], cwd: Path, out: Path, whole: Path, resumed: int) -> None:
    ranks = start_ranks(args, cwd)
    output = finish(ranks, 240)
    assert [p.returncode for p in ranks] == [0, 0], output[-3000:]
    assert partial_files(out) == []
    assert (out / PREDICTIONS).read_bytes() == (whole / PREDICTIONS).read_bytes()
    run, reference = (json.loads((folder / METRIC_RESULT).read_text()) for folder in (out, whole))
    assert run["counts"].pop("resumed_batches") == resumed and "resumed_batches" not in reference["counts"]
    for result in (run, reference):  # where and when each ran; the reference read a copy of the oracle file
        del result["provenance"], result["wall_time_s"], result["config"]["data"]["path"]
    assert run == reference


def test_sigterm_to_one_ddp_rank_stops_predict_on_both_at_an_agreed_batch_and_the_run_resumes(
    tiny_model_dir, litm_oracle, tmp_path, reference_predict
):
    out = tmp_path / "out"
    args = predict_args(tiny_model_dir, litm_oracle, out, throttle=tmp_path, hold_rank=1, ready_after=1)
    ranks, output = signal_one_rank(args, tmp_path, 1, signal.SIGTERM)

    assert [p.returncode for p in ranks] == [128 + signal.SIGTERM] * 2, output[-3000:]
    assert output.count("stopped by SIGTERM after batch 2; the same command resumes from") == 2
    assert saved_batches(out) == [2, 2]  # both stopped at the next batch end every rank has (rank 1's last)
    assert not (out / METRIC_RESULT).exists() and not (out / PREDICTIONS).exists()
    whole = reference_predict(litm_oracle)
    assert_resumes_to_the_uninterrupted_files(predict_args(tiny_model_dir, litm_oracle, out), tmp_path, out, whole, 4)


def test_a_signal_during_the_extra_last_batch_of_one_ddp_rank_stops_both_at_the_epoch_end(
    tiny_model_dir, litm_oracle, tmp_path, reference_predict
):
    """Rank 0's third batch has no counterpart on rank 1, which meanwhile waits at the epoch end: the ranks agree
    there, before the metric reduction, instead of rank 1 reducing alone while rank 0 exits."""
    out = tmp_path / "out"
    args = predict_args(tiny_model_dir, litm_oracle, out, throttle=tmp_path, hold_rank=0, ready_after=3)
    ranks, output = signal_one_rank(args, tmp_path, 0, signal.SIGINT)

    assert [p.returncode for p in ranks] == [128 + signal.SIGINT] * 2, output[-3000:]
    assert output.count("stopped by SIGINT after its last batch; the same command resumes from") == 2
    assert saved_batches(out) == [3, 2]
    assert not (out / METRIC_RESULT).exists() and not (out / PREDICTIONS).exists()
    whole = reference_predict(litm_oracle)
    assert_resumes_to_the_uninterrupted_files(predict_args(tiny_model_dir, litm_oracle, out), tmp_path, out, whole, 5)
