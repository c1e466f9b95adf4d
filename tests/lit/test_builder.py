"""`seka fit` builds exactly the projections of SPEC §3, on one or two processes, interrupted or not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from seka_lightning.bank import ProjectionBank, derive_bank
from seka_lightning.cli import run_lightning
from seka_lightning.data.synthetic_qa import SyntheticQADataModule
from seka_lightning.lit.builder import ProjectionBuilder, stats_path_for
from seka_lightning.lit.callbacks import BatchCheckpoint
from seka_lightning.models import load_model

REPO = Path(__file__).resolve().parents[2]
BUILD_CONFIG = REPO / "configs" / "build" / "synthetic_qa.yaml"


def reference_projections(model_dir: Path, qa_path: Path, *, top_pct: float, min_diff: float, max_samples: int):
    """SPEC §3 written out directly: one unpadded float64 pass per text, keys recomputed from hidden states."""
    model, tokenizer = load_model(str(model_dir), dtype="float64", attn_implementation="eager")
    n_layers = model.config.num_hidden_layers
    n_kv, d = model.config.num_key_value_heads, model.config.head_dim
    rows = {kind: [[[] for _ in range(n_kv)] for _ in range(n_layers)] for kind in ("h", "p", "n")}

    def answer_tokens(text: str, answer: str) -> list[int]:
        start = text.lower().find(answer.lower())
        if start < 0:
            return []
        end = start + len(answer)
        offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        for lo, hi in ((start, end), (start - 1, end), (start, end + 1)):
            found = [i for i, (s, e) in enumerate(offsets) if s >= lo and e <= hi]
            if found:
                return found
        return []

    def keys(text: str, idx: list[int]) -> list[torch.Tensor]:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        out = []
        for layer in range(n_layers):
            block = model.model.layers[layer]
            k = block.self_attn.k_proj(block.input_layernorm(hidden[layer]))[0].view(-1, n_kv, d)
            out.append(k[idx])
        return out

    pairs = [json.loads(line) for line in qa_path.read_text().splitlines()][:max_samples]
    for pair in pairs:
        for c, q, a, q_other in (
            (pair["context_1"], pair["question_1"], pair["answer_1"], pair["question_2"]),
            (pair["context_2"], pair["question_2"], pair["answer_2"], pair["question_1"]),
        ):
            texts = (f"Context: {c} ", f"Question: {q}\nContext: {c}", f"Question: {q_other}\nContext: {c}")
            idx = [answer_tokens(t, a) for t in texts]
            if not all(idx):
                continue
            for kind, text, i in zip("hpn", texts, idx, strict=True):
                for layer, k in enumerate(keys(text, i)):
                    for h in range(n_kv):
                        rows[kind][layer][h].append(k[:, h])
    pos = torch.zeros(n_layers, n_kv, d, d)
    neg = torch.zeros(n_layers, n_kv, d, d)
    diffs = torch.zeros(n_layers, n_kv)
    for layer in range(n_layers):
        for h in range(n_kv):
            H, Hp, Hn = (torch.cat(rows[kind][layer][h]).double() for kind in "hpn")
            N = H.shape[0]
            Up, Sp, _ = torch.linalg.svd((H.T @ Hp / N).float())
            Un, Sn, _ = torch.linalg.svd((H.T @ Hn / N).float())
            kp = int((Sp.cumsum(0) / Sp.sum() < top_pct).sum()) + 1
            kn = int((Sn.cumsum(0) / Sn.sum() < top_pct).sum()) + 1
            diffs[layer, h] = torch.norm(Hp - Hn) / N
            if diffs[layer, h] >= min_diff:
                pos[layer, h] = Up[:, :kp] @ Up[:, :kp].T
                neg[layer, h] = Un[:, kn:] @ Un[:, kn:].T
    return pos, neg, diffs


def build(
    model_dir: Path, qa_path: Path, out: Path, *extra: str, max_samples: int = 12, min_diff: float = 0.0
) -> ProjectionBank:
    run_lightning(
        [
            "fit",
            "-c",
            str(BUILD_CONFIG),
            "--model.pretrained",
            str(model_dir),
            "--model.dtype",
            "float64",
            "--data.path",
            str(qa_path),
            "--data.max_samples",
            str(max_samples),
            "--data.batch_size",
            "5",
            "--model.top_pct",
            "0.7",
            "--model.min_diff",
            str(min_diff),
            "--model.head_filter",
            "reference",
            "--model.output",
            str(out),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks",
            "[]",
            "--trainer.logger",
            "false",
            *extra,
        ]
    )
    return ProjectionBank.load(out)


def test_build_matches_float64_reference_with_skipped_heads(tiny_model_dir, qa_file, tmp_path):
    _, _, diffs = reference_projections(tiny_model_dir, qa_file, top_pct=0.7, min_diff=0.0, max_samples=12)
    min_diff = float(diffs.flatten().median())  # about half the heads fall below it
    pos, neg, _ = reference_projections(tiny_model_dir, qa_file, top_pct=0.7, min_diff=min_diff, max_samples=12)
    bank = build(tiny_model_dir, qa_file, tmp_path / "bank.safetensors", min_diff=min_diff)

    skipped = pos.flatten(2).abs().sum(-1) == 0
    assert skipped.any() and not skipped.all(), "the test must exercise both kept and skipped heads"
    assert bank.layers == [0, 1, 2]
    assert (bank.pos - pos).abs().max() < 1e-5
    assert (bank.neg - neg).abs().max() < 1e-5
    torch.testing.assert_close(bank.diff, diffs.float(), rtol=1e-6, atol=1e-7)
    # the top_pct cut is active: P+ has rank below d on kept heads
    kept_rank = torch.linalg.matrix_rank(bank.pos[~skipped])
    assert (kept_rank < bank.head_dim).all() and (kept_rank > 0).all()
    assert bank.metadata["heads_kept"] == int((~skipped).sum())
    assert bank.metadata["num_layers"] == 3 and bank.metadata["top_pct"] == 0.7


def test_derive_from_saved_statistics_equals_a_fresh_build(tiny_model_dir, qa_file, tmp_path):
    build(tiny_model_dir, qa_file, tmp_path / "a.safetensors", min_diff=0.0)
    derived = derive_bank(
        stats=str(stats_path_for(tmp_path / "a.safetensors")),
        output=str(tmp_path / "b.safetensors"),
        top_pct=0.5,
        min_diff=0.05,
        head_filter="reference",
    )
    fresh = build(tiny_model_dir, qa_file, tmp_path / "c.safetensors", "--model.top_pct", "0.5", min_diff=0.05)
    bank = ProjectionBank.load(derived)
    assert torch.equal(bank.pos, fresh.pos) and torch.equal(bank.neg, fresh.neg)
    assert bank.metadata["min_diff"] == 0.05 and bank.metadata["top_pct"] == 0.5


def _datamodule(qa_path: Path) -> SyntheticQADataModule:
    return SyntheticQADataModule(str(qa_path), batch_size=3, max_samples=12)


class _Interrupt(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 4:
            raise RuntimeError("simulated crash")


def _trainer(*callbacks: L.Callback) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def test_resumed_build_equals_uninterrupted(tiny_model_dir, qa_file, tmp_path):
    def builder(name: str) -> ProjectionBuilder:
        return ProjectionBuilder(str(tiny_model_dir), dtype="float64", min_diff=0.0, output=str(tmp_path / name))

    _trainer().fit(builder("full.safetensors"), datamodule=_datamodule(qa_file))
    checkpoint = BatchCheckpoint(str(tmp_path / "ckpt"), every_n_batches=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(checkpoint, _Interrupt()).fit(builder("resumed.safetensors"), datamodule=_datamodule(qa_file))
    assert checkpoint.last_path.is_file() and not (tmp_path / "resumed.safetensors").exists()
    saved = torch.load(checkpoint.last_path, map_location="cpu", weights_only=False)
    assert saved["SyntheticQADataModule"] == {"batches_consumed": 4, "world_size": 1}
    assert not any(key.startswith("model.") for key in saved["state_dict"]), "checkpoints must not hold the weights"

    _trainer().fit(builder("resumed.safetensors"), datamodule=_datamodule(qa_file), ckpt_path=checkpoint.last_path)
    full, resumed = (stats_path_for(tmp_path / n) for n in ("full.safetensors", "resumed.safetensors"))
    from seka_lightning.stats import KeySums

    a, _ = KeySums.load(full)
    b, _ = KeySums.load(resumed)
    for name, tensor in a.tensors().items():
        assert torch.equal(tensor, b.tensors()[name]), name
    full_bank, resumed_bank = (
        ProjectionBank.load(tmp_path / "full.safetensors"),
        ProjectionBank.load(tmp_path / "resumed.safetensors"),
    )
    assert torch.equal(full_bank.pos, resumed_bank.pos)
    # the triplet counters resume with the sums, so the metadata matches too
    assert resumed_bank.metadata["triplets_used"] == full_bank.metadata["triplets_used"] == 24
    assert resumed_bank.metadata["num_rows"] == full_bank.metadata["num_rows"]

    # a different device count would deal batches differently: refused, naming the fix
    datamodule = _datamodule(qa_file)
    datamodule.load_state_dict({"batches_consumed": 4, "world_size": 2})
    datamodule.setup("fit")
    with pytest.raises(
        ValueError, match="written by a build on 2 device\\(s\\) but this run has 1; resume with --trainer.devices 2"
    ):
        datamodule.train_dataloader()


def test_two_process_ddp_build_equals_one_device(tiny_model_dir, qa_file, tmp_path):
    one = build(tiny_model_dir, qa_file, tmp_path / "one.safetensors", max_samples=11)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "seka_lightning.cli",
        "fit",
        "-c",
        str(BUILD_CONFIG),
        "--model.pretrained",
        str(tiny_model_dir),
        "--model.dtype",
        "float64",
        "--data.path",
        str(qa_file),
        "--data.max_samples",
        "11",
        "--data.batch_size",
        "5",
        "--model.top_pct",
        "0.7",
        "--model.min_diff",
        "0.0",
        "--model.output",
        str(tmp_path / "two.safetensors"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks",
        "[]",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = ProjectionBank.load(tmp_path / "two.safetensors")
    assert (two.pos - one.pos).abs().max() < 1e-6
    assert (two.neg - one.neg).abs().max() < 1e-6
    assert two.metadata["num_rows"] == one.metadata["num_rows"]
    assert two.metadata["triplets_used"] == one.metadata["triplets_used"] == 22


def test_sharded_model_is_left_where_it_was_placed_and_builds_the_same_bank(tiny_model_dir, qa_file, tmp_path):
    """A model loaded with device_map stays out of the module tree: Lightning's device/dtype moves of the module
    leave it alone, its weights are not module parameters, and the build is bitwise the one of a placed model."""
    module = ProjectionBuilder(
        str(tiny_model_dir), dtype="float64", device_map={"": "cpu"}, output="unused.safetensors"
    )
    assert module.sharded
    assert list(module.parameters()) == [] and not any(key.startswith("model.") for key in module.state_dict())
    module.to(torch.float32)
    assert {p.dtype for p in module.model.parameters()} == {torch.float64}
    assert module.input_device == torch.device("cpu")

    placed = build(tiny_model_dir, qa_file, tmp_path / "placed.safetensors")
    sharded = build(tiny_model_dir, qa_file, tmp_path / "sharded.safetensors", "--model.device_map", '{"": "cpu"}')
    assert torch.equal(placed.pos, sharded.pos) and torch.equal(placed.neg, sharded.neg)


def test_sharded_model_with_ddp_is_refused(tiny_model_dir, monkeypatch):
    module = ProjectionBuilder(str(tiny_model_dir), device_map={"": "cpu"}, output="unused.safetensors")
    module._trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match=r"device_map=\{'': 'cpu'\}.*2 processes.*--trainer.devices 1"):
        module.setup("fit")
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched by torchrun or SLURM: refused before the model is loaded
    with pytest.raises(ValueError, match="2 processes"):
        ProjectionBuilder(str(tiny_model_dir), device_map={"": "cpu"}, output="unused.safetensors")


def test_sharded_model_whose_inputs_are_off_the_trainer_device_is_refused(tiny_model_dir):
    module = ProjectionBuilder(str(tiny_model_dir), device_map={"": "cpu"}, output="unused.safetensors")
    module._trainer = SimpleNamespace(world_size=1)
    module._device = torch.device("meta")  # Lightning's device differs from the inputs' (cpu)
    with pytest.raises(ValueError, match="takes its inputs on cpu but Lightning runs on meta; start the device_map"):
        module.setup("fit")
    module.model.get_input_embeddings().to("meta")  # as an offloaded embedding table looks
    with pytest.raises(ValueError, match="offloads the input embeddings"):
        module.setup("fit")


def test_nan_keys_stop_the_build_before_any_checkpoint_or_bank_is_written(tiny_model_dir, qa_file, tmp_path):
    builder = ProjectionBuilder(
        str(tiny_model_dir), dtype="float64", min_diff=0.0, output=str(tmp_path / "b.safetensors")
    )
    with torch.no_grad():
        builder.model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    checkpoint = BatchCheckpoint(str(tmp_path / "ckpt"), every_n_batches=2)
    with pytest.raises(ValueError, match=r"non-finite keys \(NaN or inf\) reached the statistics"):
        _trainer(checkpoint).fit(builder, datamodule=_datamodule(qa_file))
    assert not checkpoint.dirpath.exists() or not any(checkpoint.dirpath.iterdir())
    # without checkpoints the sums are read once, at the end: still no bank and no statistics file
    builder.stats.reset()
    with pytest.raises(ValueError, match="non-finite keys"):
        _trainer().fit(builder, datamodule=_datamodule(qa_file))
    assert not (tmp_path / "b.safetensors").exists() and not stats_path_for(tmp_path / "b.safetensors").exists()


def test_counters_resume_from_sum_metric_checkpoints():
    """The triplet counters took SumMetric's state name, so builds checkpointed with SumMetric counters resume."""
    from torchmetrics import SumMetric

    from seka_lightning.lit.builder import Count

    old = SumMetric()
    old.persistent(True)
    old.update(7)
    counter = Count()
    counter.load_state_dict(old.state_dict())
    counter.update(3)
    assert int(counter.compute()) == 10
