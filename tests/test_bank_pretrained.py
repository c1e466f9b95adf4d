"""ProjectionBank.save_pretrained / from_pretrained / push_to_hub, the model card and the compact repr."""

from __future__ import annotations

import builtins
import os
import re

import pytest
import torch

from seka_lightning import ProjectionBank, pretrained
from seka_lightning.bank import derive_bank
from seka_lightning.projections import top_rank
from seka_lightning.stats import KeySums


def random_sums(layers: int = 3, heads: int = 2, d: int = 8, rows: int = 40, seed: int = 0) -> KeySums:
    """Sums of random keys (positive keys pulled towards a few directions), as KeyStatistics would hold them."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(layers, rows, heads, d, generator=gen, dtype=torch.float64)
    hp = h + torch.randn(layers, rows, heads, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        2, d, generator=gen, dtype=torch.float64
    )
    hn = torch.randn(layers, rows, heads, d, generator=gen, dtype=torch.float64)
    hn[:, :, 0] = hp[:, :, 0]  # head 0 never moves between H+ and H-: filtered out by min_diff
    return KeySums(
        count=torch.tensor(float(rows), dtype=torch.float64),
        a0=torch.einsum("lmhd,lmhe->lhde", h, h),
        a_pos=torch.einsum("lmhd,lmhe->lhde", h, hp),
        a_neg=torch.einsum("lmhd,lmhe->lhde", h, hn),
        d_pos_neg=(hp - hn).square().sum(dim=(1, 3)),
        d_pos_neutral=(hp - h).square().sum(dim=(1, 3)),
    )


def make_bank(*, with_stats: bool = True) -> ProjectionBank:
    sums = random_sums()
    metadata = {"model_id": "org/tiny-model", "num_layers": 4, "data_fingerprint": "abc123", "model_revision": "r1"}
    bank = ProjectionBank.from_statistics(sums, layers=[1, 2, 3], top_pct=0.8, min_diff=0.01, metadata=metadata)
    bank.statistics = sums if with_stats else None
    return bank


def test_round_trip_keeps_tensors_metadata_and_statistics(tmp_path):
    bank = make_bank()
    folder = bank.save_pretrained(tmp_path / "bank")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "bank.safetensors", "bank.stats.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["bank"], "no staging folder left behind"
    loaded = ProjectionBank.from_pretrained(folder)
    for name in ("pos", "neg", "u_pos", "s_pos", "u_neg", "s_neg", "diff"):
        assert torch.equal(getattr(loaded, name), getattr(bank, name)), name
    assert loaded.layers == [1, 2, 3] and loaded.metadata == bank.metadata
    for name, tensor in bank.statistics.tensors().items():
        assert torch.equal(loaded.statistics.tensors()[name], tensor), name


def test_saved_statistics_derive_banks_with_seka_derive(tmp_path):
    """The statistics file has seka fit's layout: `seka derive` gives what from_statistics gives."""
    bank = make_bank()
    folder = bank.save_pretrained(tmp_path / "bank")
    derived = ProjectionBank.load(
        derive_bank(stats=str(folder / "bank.stats.safetensors"), output=str(tmp_path / "d.safetensors"), top_pct=0.5)
    )
    direct = ProjectionBank.from_statistics(bank.statistics, layers=[1, 2, 3], top_pct=0.5, min_diff=0.2)
    assert torch.equal(derived.pos, direct.pos) and derived.layers == [1, 2, 3]
    assert derived.metadata["model_id"] == "org/tiny-model"


def test_bank_without_statistics_writes_the_bank_only(tmp_path):
    folder = make_bank(with_stats=False).save_pretrained(tmp_path / "bank")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "bank.safetensors"]
    assert ProjectionBank.from_pretrained(folder).statistics is None
    assert "Statistics included: no" in (folder / "README.md").read_text()


def test_existing_folder_is_refused_unless_overwrite_and_kept_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "bank"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    bank = make_bank()
    with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite=True to replace it"):
        bank.save_pretrained(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

    def broken_card(_bank):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pretrained, "model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        bank.save_pretrained(target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["notes.txt"], "a failed write destroys nothing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"], "no staging folder left behind"
    monkeypatch.undo()

    bank.save_pretrained(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "bank.safetensors", "bank.stats.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (bank.save_pretrained(empty) / "bank.safetensors").is_file(), "an empty folder is filled without asking"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        bank.save_pretrained(tmp_path / "file", overwrite=True)


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass a folder written by bank.save_pretrained"):
        ProjectionBank.from_pretrained(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no bank.safetensors"):
        ProjectionBank.from_pretrained(tmp_path / "other")
    folder = make_bank().save_pretrained(tmp_path / "bank")
    random_sums(layers=2).save(folder / "bank.stats.safetensors", metadata={"layers": [1, 2]})
    with pytest.raises(ValueError, match="the folder mixes two builds"):
        ProjectionBank.from_pretrained(folder)


def test_model_card_states_the_build(tmp_path):
    bank = make_bank()
    card = (bank.save_pretrained(tmp_path / "bank") / "README.md").read_text()
    assert (bank.pos[:, 0] == 0).all() and (bank.pos[:, 1] != 0).any(-1).any(-1).all(), "head 0 skipped"
    ranks = top_rank(bank.s_pos, 0.8)  # [3 layers, 2 heads]: the rank the top_pct cut chose
    assert (ranks[:, 1] < bank.head_dim).all(), "the cut must be active for the test to mean something"
    assert "base_model: org/tiny-model" in card and "(weights: `r1`)" in card
    assert "- Layers: 3 (1..3), KV heads 2, head dim 8" in card
    assert "- Heads kept: 3/6" in card and "- Data fingerprint: `abc123`" in card
    for layer, rank in zip([1, 2, 3], ranks[:, 1].tolist(), strict=True):
        assert f"| {layer} | 1/2 | {rank:.1f} |" in card
    assert '"top_pct": 0.8' in card and '"min_diff": 0.01' in card
    assert "ProjectionBank.from_pretrained(" in card and "generate_highlighted(model, bank, enc" in card


def test_repr_is_one_line_without_tensors():
    bank = make_bank()
    text = repr(bank)
    assert text == (
        "ProjectionBank(model='org/tiny-model', layers=3 [1..3], kv_heads=2, head_dim=8, heads_kept=3/6, "
        "top_pct=0.8, negative=True)"
    )
    gappy = ProjectionBank(layers=[0, 2, 5], pos=torch.zeros(3, 1, 4, 4))
    assert repr(gappy) == (
        "ProjectionBank(model='unknown', layers=3 [0, 2, 5], kv_heads=1, head_dim=4, heads_kept=0/3, negative=False)"
    )


def _hide_huggingface_hub(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "huggingface_hub" or name.startswith("huggingface_hub."):
            raise ImportError("No module named 'huggingface_hub'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_push_to_hub_without_huggingface_hub_says_how_to_install(tmp_path, monkeypatch):
    _hide_huggingface_hub(monkeypatch)
    message = re.escape(
        "push_to_hub needs the huggingface_hub package, which is not installed; install it with "
        "`pip install huggingface_hub`"
    )
    with pytest.raises(ImportError, match=message):
        make_bank().push_to_hub("org/bank")
    with pytest.raises(ImportError, match="loading 'org/bank' from the Hugging Face Hub needs the huggingface_hub"):
        ProjectionBank.from_pretrained("org/bank")


def test_push_to_hub_uploads_the_save_pretrained_folder(tmp_path, monkeypatch):
    """A stand-in HfApi records what would be uploaded (no hub is contacted)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    uploaded = {}

    class RecordingApi:
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, *, private=None, exist_ok=False):
            uploaded["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, *, repo_id, folder_path, commit_message, revision=None):
            uploaded["files"] = sorted(os.listdir(folder_path))
            uploaded["bank"] = ProjectionBank.from_pretrained(folder_path)
            return f"https://hub.example/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    bank = make_bank()
    assert bank.push_to_hub("org/bank", private=True, token="t") == "https://hub.example/org/bank/commit/1"
    assert uploaded["repo"] == ("org/bank", True, True) and uploaded["token"] == "t"
    assert uploaded["files"] == ["README.md", "bank.safetensors", "bank.stats.safetensors"]
    assert torch.equal(uploaded["bank"].pos, bank.pos)


def test_from_pretrained_downloads_a_hub_id_through_snapshot_download(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    folder = make_bank().save_pretrained(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(*, repo_id, revision=None):
        calls.append((repo_id, revision))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    loaded = ProjectionBank.from_pretrained("org/bank", revision="v1")
    assert calls == [("org/bank", "v1")] and loaded.statistics is not None

    def offline(*, repo_id, revision=None):
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="'banks/typo' is neither a local folder nor a hub repo that could be"):
        ProjectionBank.from_pretrained("banks/typo")
