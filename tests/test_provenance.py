"""Provenance of a run: the git state of the sources, also for a copy that is not a git checkout."""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace

import pytest

from seka_lightning.provenance import SOURCE_COMMIT_ENV, git_state


def test_git_state_of_this_checkout_is_its_head(monkeypatch):
    monkeypatch.delenv(SOURCE_COMMIT_ENV, raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    state = git_state()
    assert state["commit"] == head
    assert isinstance(state["dirty"], bool)


def test_a_copy_outside_git_records_the_copiers_commit_or_why_there_is_none(tmp_path, monkeypatch):
    monkeypatch.delenv(SOURCE_COMMIT_ENV, raising=False)
    missing = git_state(tmp_path)
    assert missing["commit"] is None and missing["dirty"] is None
    assert missing["reason"].startswith("not a git checkout or git unavailable")
    monkeypatch.setenv(SOURCE_COMMIT_ENV, "0123abcd")
    assert git_state(tmp_path) == {
        "commit": "0123abcd",
        "dirty": None,
        "reason": "the commit is $SEKA_SOURCE_COMMIT, set by whoever copied the sources",
        "git_head": None,
    }


def test_the_copiers_commit_wins_over_a_stale_checkout(monkeypatch):
    """A copy laid over an older checkout (its HEAD is not the copied code) records the copier's commit."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setenv(SOURCE_COMMIT_ENV, "0123abcd")
    state = git_state()
    assert state["commit"] == "0123abcd" and state["dirty"] is None and state["git_head"] == head


def test_the_source_hash_follows_the_packages_files_not_their_history(tmp_path):
    """The hash names the Python files' paths and bytes: an edit, a rename or a new module changes it; caches, hidden
    files (editor swap files), other files, a wheel's shipped configs and data, file times and the order the files
    were made in do not. By default it hashes the installed package, wherever it lies."""
    from pathlib import Path

    import seka_lightning
    from seka_lightning.provenance import source_sha256

    package = Path(seka_lightning.__file__).resolve().parent
    copy = tmp_path / "copy" / "seka_lightning"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "shipped" / "configs").mkdir(parents=True)
    (copy / "shipped" / "configs" / "x.py").write_text("a shipped file\n")
    assert source_sha256() == source_sha256(copy)
    (copy / "lit" / "writers.py").write_text((copy / "lit" / "writers.py").read_text() + "\n")
    assert source_sha256(copy) != source_sha256()

    def tree(root: Path, files: dict[str, bytes]) -> Path:
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return root

    files = {"a.py": b"x = 1\n", "sub/b.py": b"y = 2\n", "sub/data.json": b"{}"}
    first = source_sha256(tree(tmp_path / "one", files))
    assert source_sha256(tree(tmp_path / "two", dict(reversed(list(files.items()))))) == first
    ignored = {"__pycache__/a.cpython-311.pyc": b"\0", "sub/b.pyc": b"\1", ".a.py.swp": b"", ".hidden/c.py": b""}
    tree(tmp_path / "two", {**ignored, "shipped/data/d.py": b"", "notes.txt": b"text"})
    assert source_sha256(tmp_path / "two") == first
    assert source_sha256(tree(tmp_path / "edit", {**files, "a.py": b"x = 2\n"})) != first
    assert source_sha256(tree(tmp_path / "new", {**files, "c.py": b""})) != first
    renamed = {"sub/a.py" if name == "a.py" else name: data for name, data in files.items()}
    assert source_sha256(tree(tmp_path / "renamed", renamed)) != first
    # a file's bytes cannot pass for the next file's name ("a.py" + "b.pyx" = "a.py" + "" + "b.py" + "x"): each
    # file's length and a separator go in before its bytes
    one_file = source_sha256(tree(tmp_path / "p", {"a.py": b"b.pyx"}))
    assert one_file != source_sha256(tree(tmp_path / "q", {"a.py": b"", "b.py": b"x"}))


def test_code_that_cannot_be_hashed_is_unknown_not_the_same(tmp_path, monkeypatch):
    """No Python files on disk (a package imported from a zip) or an unreadable one: None, which the resume checks
    treat as unknown."""
    from pathlib import Path

    from seka_lightning.provenance import source_sha256

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.json").write_text("{}")
    assert source_sha256(tmp_path / "empty") is None
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "a.py").write_text("x = 1\n")
    assert source_sha256(tmp_path / "code") is not None

    def unreadable(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    assert source_sha256(tmp_path / "code") is None


def test_the_command_names_the_entry_point_not_its_location():
    from seka_lightning.provenance import run_provenance

    record = run_provenance(
        pretrained="embedded:smollm2-135m",
        method={"method": "none"},
        config={},
        data={},
        seeds={},
        argv=["/some/machine/src/seka_lightning/cli.py", "predict", "-c", "configs/eval/counterfact.yaml"],
    )
    assert record["command"] == ["seka", "predict", "-c", "configs/eval/counterfact.yaml"]


def test_a_run_records_the_git_state_it_started_with_and_any_change_by_its_end(monkeypatch):
    """A checkout that moves during a long run (a merge, an edit) must not relabel the run: the record keeps the
    state at the start and adds the state at the end only where it differs."""
    from seka_lightning.provenance import run_provenance

    monkeypatch.delenv(SOURCE_COMMIT_ENV, raising=False)
    now = git_state()

    def record(at_start):
        return run_provenance(
            pretrained="x", method={}, config={}, data={}, seeds={}, argv=["seka"], git_at_start=at_start
        )["git"]

    assert record(dict(now)) == now
    assert record(None) == now
    start = {"commit": "0" * 40, "dirty": False}
    assert record(start) == {**start, "changed_during_run": {"commit": now["commit"], "dirty": now["dirty"]}}


def one_process(**trainer) -> SimpleNamespace:
    """A stand-in trainer whose strategy broadcasts as one process does: the object itself."""
    return SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj), **trainer)


def test_the_benchmark_writer_takes_the_git_state_and_rank_0s_code_hash_when_prediction_starts(tmp_path, monkeypatch):
    from seka_lightning.lit import writers

    writer = writers.BenchmarkWriter(str(tmp_path / "run"))
    assert writer.git_at_start is None and writer.source_at_start is None
    monkeypatch.setattr(writers, "git_state", lambda: {"commit": "f" * 40, "dirty": True})
    writer.on_predict_start(one_process(world_size=1), None)
    assert writer.git_at_start == {"commit": "f" * 40, "dirty": True}
    assert writer.source_at_start == writers.SOURCE_SHA256_AT_IMPORT
    # under DDP every rank checks a partial file against rank 0's hash, not its own
    broadcasts = []
    rank_0 = SimpleNamespace(broadcast=lambda obj, src=0: broadcasts.append((obj, src)) or "0" * 64)
    writer.on_predict_start(SimpleNamespace(world_size=1, strategy=rank_0), None)
    assert writer.source_at_start == "0" * 64 and broadcasts == [(writers.SOURCE_SHA256_AT_IMPORT, 0)]


def test_the_benchmark_writer_logs_progress_lines_at_most_every_progress_every_s(tmp_path, monkeypatch, caplog):
    """Runs whose output is a log file still say how far they are: batches done, elapsed, time left."""

    from seka_lightning.lit import writers

    assert writers.progress_line(3, 44, 60.0) == "predict: 3/44 batches in 60 s, about 820 s left"
    assert writers.progress_line(3, float("inf"), 60.0) == "predict: 3/? batches in 60 s"
    # a resumed run: 8 of the 17 batches came from its partial file, the 9 others took the 450 s
    assert (
        writers.progress_line(17, 157, 450.0, resumed=8)
        == "predict: 17/157 batches (8 resumed) in 450 s, about 7000 s left"
    )
    assert writers.progress_line(8, 157, 2.0, resumed=8) == "predict: 8/157 batches (8 resumed) in 2 s"
    with pytest.raises(ValueError, match=r"^progress_every_s must be >= 0 seconds, got -1$"):
        writers.BenchmarkWriter(str(tmp_path / "bad"), progress_every_s=-1)

    clock = iter([100.0, 110.0, 170.0, 171.0])  # start, then three batch ends
    monkeypatch.setattr(writers.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(writers, "git_state", lambda: {"commit": "f" * 40, "dirty": False})
    writer = writers.BenchmarkWriter(str(tmp_path / "run"), progress_every_s=60)
    trainer = one_process(is_global_zero=True, num_predict_batches=[4], received_sigterm=False, world_size=1)
    writer.on_predict_start(trainer, None)
    fresh_run = SimpleNamespace(resumed={"batches": 0, "wall_time_s": 0.0})  # the evaluator, nothing resumed
    with caplog.at_level("INFO", logger=writers.__name__):
        for index in range(3):
            writer.on_predict_batch_end(trainer, fresh_run, None, None, index)
    assert [r.getMessage() for r in caplog.records] == ["predict: 2/4 batches in 70 s, about 70 s left"]


def test_the_tokenizer_hash_follows_the_tokenizer_not_the_object(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from seka_lightning.provenance import tokenizer_sha256

    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert tokenizer_sha256(tokenizer) == tokenizer_sha256(reloaded)
    assert len(tokenizer_sha256(tokenizer)) == 64
    reloaded(["a", "a longer text"], padding=True, truncation=True, max_length=3)  # settings a call leaves behind
    assert tokenizer_sha256(reloaded) == tokenizer_sha256(tokenizer)
    reloaded.chat_template = "{{ messages[0]['content'] }}"  # what a chat run's prompts are made of
    assert tokenizer_sha256(reloaded) != tokenizer_sha256(tokenizer)
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    reloaded.add_tokens(["<extra_token>"])  # any change to what it tokenizes changes the hash
    assert tokenizer_sha256(reloaded) != tokenizer_sha256(tokenizer)
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    reloaded.pad_token = reloaded.bos_token  # which id pads (and so, which id generation fills in) too
    assert tokenizer_sha256(reloaded) != tokenizer_sha256(tokenizer)
    assert tokenizer_sha256(SimpleNamespace()) is None  # no fast pipeline to hash


def test_library_versions_name_the_tokenizer_and_conversion_packages():
    from seka_lightning.provenance import library_versions

    versions = library_versions()
    assert {"torch", "transformers", "tokenizers", "gguf", "lightning", "torchmetrics"} <= versions.keys()
    assert versions["tokenizers"] is not None  # transformers needs it, so it is installed wherever this runs


def test_a_run_records_what_its_bank_was_built_from_beside_the_banks_hash(tmp_path):
    """Two banks derived from the same statistics in different rounding have different file hashes; the record names
    the statistics they share (the digest the bank stores, equal to the statistics file's), and ignores other files."""
    import torch
    from safetensors.torch import save_file

    from seka_lightning.bank import ProjectionBank, stats_path_for
    from seka_lightning.files import file_sha256
    from seka_lightning.provenance import run_provenance
    from seka_lightning.stats import KeySums

    gen = torch.Generator().manual_seed(0)
    h, hp, hn = (torch.randn(2, 30, 1, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    sums = KeySums(
        count=torch.tensor(30.0, dtype=torch.float64),
        a0=torch.einsum("lmhd,lmhe->lhde", h, h),
        a_pos=torch.einsum("lmhd,lmhe->lhde", h, hp),
        a_neg=torch.einsum("lmhd,lmhe->lhde", h, hn),
        d_pos_neg=(hp - hn).square().sum(dim=(1, 3)),
        d_pos_neutral=(hp - h).square().sum(dim=(1, 3)),
    )
    paths = []
    for name, sign in (("a", 1.0), ("b", -1.0)):
        bank = ProjectionBank.from_statistics(
            sums, layers=[0, 1], min_diff=0.0, metadata={"model_id": "m", "data_fingerprint": "d"}
        )
        bank.u_pos = sign * bank.u_pos  # another decomposition's signs: the same projectors, other bytes
        paths.append(str(bank.save_with_statistics(tmp_path / name / "bank.safetensors", sums, statistics_metadata={})))
    other = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    (tmp_path / "heads.json").write_text("{}")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\xff" * 16)
    (tmp_path / "reference.pt").write_bytes(b"not read")
    not_banks = [str(other), str(stats_path_for(paths[0])), str(tmp_path / "corrupt.safetensors")]
    method = {
        "bank": paths[0],
        "experts": [paths[1], *not_banks],
        "heads": str(tmp_path / "heads.json"),
        "neg": str(tmp_path / "reference.pt"),
    }
    record = run_provenance(pretrained="x", method=method, config={}, data={}, seeds={}, argv=["seka"])
    assert record["method_files"][paths[0]] != record["method_files"][paths[1]]
    stats = file_sha256(stats_path_for(paths[0]))
    assert file_sha256(stats_path_for(paths[1])) == stats
    settings = {key: bank.metadata[key] for key in ("top_pct", "min_diff", "head_filter", "positive_only")}
    expected = {"statistics_sha256": stats, "data_fingerprint": "d", "model_id": "m", **settings}
    assert len(record["method_files"]) == 7  # every file is hashed; only the two banks say what they were built from
    assert record["method_builds"] == {paths[0]: expected, paths[1]: expected}
