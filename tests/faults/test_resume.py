"""A resumed `seka fit` takes its settings from the command line, never from the checkpoint, and refuses a
checkpoint whose statistics were built with other settings; checkpoint temp files never collide."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from seka_lightning.bank import ProjectionBank
from seka_lightning.cli import run_lightning
from seka_lightning.lit.callbacks import BatchCheckpoint

REPO = Path(__file__).resolve().parents[2]
BUILD_CONFIG = REPO / "configs" / "build" / "synthetic_qa.yaml"


def fit(model_dir: Path, qa_path: Path, out: Path, ckpt_dir: Path, *extra: str) -> None:
    """12 pairs = 24 triplets in 5 batches of 5; a checkpoint after batches 2 and 4, so last.ckpt is mid-build."""
    callbacks = [
        {
            "class_path": "seka_lightning.lit.callbacks.BatchCheckpoint",
            "init_args": {"dirpath": str(ckpt_dir), "every_n_batches": 2},
        }
    ]
    run_lightning(
        [
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
            "5",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks",
            json.dumps(callbacks),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory) -> Path:
    """One finished build for the module (12 shipped QA pairs); its last.ckpt was written after batch 4 of 5."""
    folder = tmp_path_factory.mktemp("first-build")
    pairs = (REPO / "data" / "synthetic_qa.jsonl").read_text().splitlines(keepends=True)[:12]
    (folder / "qa.jsonl").write_text("".join(pairs))
    fit(tiny_model_dir, folder / "qa.jsonl", folder / "first.safetensors", folder / "ck")
    assert torch.load(folder / "ck" / "last.ckpt", weights_only=True)["SyntheticQADataModule"]["batches_consumed"] == 4
    return folder


@pytest.fixture
def qa_file(built) -> Path:
    """The first build's data (the same path, so a resume sees the same settings)."""
    return built / "qa.jsonl"


@pytest.fixture
def first_build(built) -> Path:
    return built / "ck" / "last.ckpt"


def test_resume_writes_where_the_command_line_says_and_leaves_the_first_bank_alone(
    tiny_model_dir, qa_file, tmp_path, first_build
):
    first = first_build.parents[1] / "first.safetensors"
    before = first.read_bytes()
    fit(
        tiny_model_dir,
        qa_file,
        tmp_path / "other.safetensors",
        tmp_path / "ck2",
        "--model.top_pct",
        "0.5",
        "--ckpt_path",
        str(first_build),
    )
    assert first.read_bytes() == before, "the resume overwrote the checkpoint's bank"
    other = ProjectionBank.load(tmp_path / "other.safetensors")
    assert other.metadata["top_pct"] == 0.5  # an SVD setting may change on resume
    # the same statistics as the first build: 4 batches from the checkpoint plus the last one
    assert other.metadata["triplets_used"] == ProjectionBank.load(first).metadata["triplets_used"] > 0
    assert other.metadata["num_rows"] == ProjectionBank.load(first).metadata["num_rows"]


def test_resume_with_other_statistics_settings_is_refused_naming_each(tiny_model_dir, qa_file, tmp_path, first_build):
    out = tmp_path / "other.safetensors"
    with pytest.raises(ValueError) as error:
        fit(
            tiny_model_dir,
            qa_file,
            out,
            tmp_path / "ck2",
            "--data.batch_size",
            "3",
            "--model.layers",
            "0,1",
            "--data.length_window",
            "2",
            "--model.pack_tokens",
            "256",
            "--ckpt_path",
            str(first_build),
        )
    message = str(error.value)
    assert f"cannot resume from {first_build}" in message
    assert "data.batch_size: checkpoint 5, command line 3" in message
    assert "model.layers: checkpoint [0, 1, 2], command line [0, 1]" in message
    assert "data.length_window: checkpoint None, command line 2" in message
    assert "model.pack_tokens: checkpoint None, command line 256" in message
    assert "model.dtype" not in message and "data.fingerprint" not in message
    assert "start a new build without --ckpt_path" in message
    assert not out.exists()


def test_resume_on_changed_data_is_refused(tiny_model_dir, qa_file, tmp_path, first_build):
    changed = tmp_path / "qa.jsonl"
    changed.write_text(qa_file.read_text().replace("The ", "A "))
    with pytest.raises(ValueError, match=r"data\.fingerprint: checkpoint '[0-9a-f]{64}', command line '[0-9a-f]{64}'"):
        fit(tiny_model_dir, changed, tmp_path / "o.safetensors", tmp_path / "ck2", "--ckpt_path", str(first_build))


def test_an_old_checkpoint_without_the_build_record_is_refused(tiny_model_dir, qa_file, tmp_path, first_build):
    old = torch.load(first_build, weights_only=True)
    del old["seka_build"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="has no 'seka_build' record .* start the build again without --ckpt_path"):
        fit(
            tiny_model_dir,
            qa_file,
            tmp_path / "o.safetensors",
            tmp_path / "ck2",
            "--ckpt_path",
            str(tmp_path / "old.ckpt"),
        )


def test_resume_with_chat_building_texts_on_a_plain_build_is_refused(tiny_model_dir, qa_file, tmp_path, first_build):
    out = tmp_path / "other.safetensors"
    with pytest.raises(ValueError) as error:
        fit(tiny_model_dir, qa_file, out, tmp_path / "ck2", "--model.chat", "true", "--ckpt_path", str(first_build))
    message = str(error.value)
    assert f"cannot resume from {first_build}" in message
    assert "model.chat: checkpoint False, command line True" in message
    assert "data.batch_size" not in message and "model.layers" not in message
    assert not out.exists()


def test_a_record_from_before_the_chat_setting_resumes_as_plain_text(tiny_model_dir, qa_file, tmp_path, first_build):
    """A record written before ``model.chat`` and ``model.pack_tokens`` existed was a plain-text build with padded
    rows: it resumes without chat and packing, not with."""
    old = torch.load(first_build, weights_only=True)
    del old["seka_build"]["model.chat"], old["seka_build"]["model.pack_tokens"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="model.chat: checkpoint False, command line True"):
        fit(
            tiny_model_dir,
            qa_file,
            tmp_path / "c.safetensors",
            tmp_path / "ck3",
            "--model.chat",
            "true",
            "--ckpt_path",
            str(tmp_path / "old.ckpt"),
        )
    fit(
        tiny_model_dir, qa_file, tmp_path / "o.safetensors", tmp_path / "ck2", "--ckpt_path", str(tmp_path / "old.ckpt")
    )
    first = ProjectionBank.load(first_build.parents[1] / "first.safetensors")
    resumed = ProjectionBank.load(tmp_path / "o.safetensors")
    assert resumed.metadata["chat"] is False
    assert resumed.metadata["triplets_used"] == first.metadata["triplets_used"] > 0
    assert torch.equal(resumed.pos, first.pos)


def test_resume_on_other_package_code_is_refused_and_a_checkpoint_from_before_the_code_hash_resumes(
    tiny_model_dir, qa_file, tmp_path, first_build, monkeypatch
):
    """The sums depend on the capture code: a checkpoint written by other code (its Python files' hash) is refused;
    one from before the hash was recorded is not checked for it, as it was not then."""
    from seka_lightning.lit import builder

    recorded = torch.load(first_build, weights_only=True)["seka_build"]["code.source_sha256"]
    assert recorded == builder.SOURCE_SHA256_AT_IMPORT
    monkeypatch.setattr(builder, "SOURCE_SHA256_AT_IMPORT", "0" * 64)
    out = tmp_path / "edited.safetensors"
    with pytest.raises(ValueError) as error:
        fit(tiny_model_dir, qa_file, out, tmp_path / "ck2", "--ckpt_path", str(first_build))
    message = str(error.value)
    assert f"code.source_sha256: checkpoint '{recorded}', command line '{'0' * 64}'" in message
    assert "the package's code changed since the checkpoint: resume with that code" in message
    assert "data.batch_size" not in message and not out.exists()
    monkeypatch.setattr(builder, "SOURCE_SHA256_AT_IMPORT", None)  # code that cannot be hashed: unknown, not checked
    fit(tiny_model_dir, qa_file, tmp_path / "unknown.safetensors", tmp_path / "ck4", "--ckpt_path", str(first_build))
    monkeypatch.undo()

    old = torch.load(first_build, weights_only=True)
    del old["seka_build"]["code.source_sha256"]
    torch.save(old, tmp_path / "old.ckpt")
    fit(
        tiny_model_dir, qa_file, tmp_path / "o.safetensors", tmp_path / "ck3", "--ckpt_path", str(tmp_path / "old.ckpt")
    )
    first = ProjectionBank.load(first_build.parents[1] / "first.safetensors")
    resumed = ProjectionBank.load(tmp_path / "o.safetensors")
    assert resumed.metadata["triplets_used"] == first.metadata["triplets_used"] > 0
    assert torch.equal(resumed.pos, first.pos)


def test_checkpoint_hyperparameters_import_nothing_and_redirect_nothing(
    tiny_model_dir, qa_file, tmp_path, first_build, monkeypatch
):
    marker = tmp_path / "imported"
    (tmp_path / "planted_module.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\nclass Planted:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "planted_module", raising=False)
    checkpoint = torch.load(first_build, weights_only=True)
    checkpoint["hyper_parameters"] = {
        "_class_path": "planted_module.Planted",
        "output": str(tmp_path / "x.safetensors"),
    }
    torch.save(checkpoint, tmp_path / "planted.ckpt")
    fit(
        tiny_model_dir,
        qa_file,
        tmp_path / "mine.safetensors",
        tmp_path / "ck2",
        "--ckpt_path",
        str(tmp_path / "planted.ckpt"),
    )
    assert not marker.exists() and "planted_module" not in sys.modules
    assert (tmp_path / "mine.safetensors").is_file() and not (tmp_path / "x.safetensors").exists()


class _Trainer(SimpleNamespace):
    """What BatchCheckpoint touches of a Trainer: one rank that writes ``name`` as the checkpoint's bytes."""

    def __init__(self, name: str, during_write=None) -> None:
        progress = SimpleNamespace(current=SimpleNamespace(processed=2))
        super().__init__(
            is_global_zero=True,
            strategy=SimpleNamespace(barrier=lambda name: None),
            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
        )
        self.name, self.during_write = name, during_write

    def save_checkpoint(self, path: Path) -> None:
        Path(path).write_text(self.name)
        if self.during_write is not None:
            self.during_write()


def test_two_runs_saving_into_one_folder_do_not_clash(tmp_path):
    a, b = BatchCheckpoint(str(tmp_path), every_n_batches=1), BatchCheckpoint(str(tmp_path), every_n_batches=1)
    # run B saves while run A is between writing its temp file and renaming it
    a.on_train_batch_end(
        _Trainer("a", during_write=lambda: b.on_train_batch_end(_Trainer("b"), None, None, [], 0)), None, None, [], 0
    )
    assert (tmp_path / "last.ckpt").read_text() == "a"  # the later rename wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_failed_save_leaves_no_temp_file_and_the_old_checkpoint(tmp_path):
    (tmp_path / "last.ckpt").write_text("old")

    def fail() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        BatchCheckpoint(str(tmp_path), every_n_batches=1).on_train_batch_end(_Trainer("new", fail), None, None, [], 0)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert (tmp_path / "last.ckpt").read_text() == "old"
