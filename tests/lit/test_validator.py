"""`seka validate`: attention on the highlight and answer log-likelihood, without and with steering, equal to a
direct float64 computation; the probes, their encoding, the diagnostics math and the DDP-exact means."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from seka_lightning.bank import ProjectionBank
from seka_lightning.cli import run_lightning
from seka_lightning.data.synthetic_qa import RankBatches, SyntheticQADataModule, highlighted_questions
from seka_lightning.data.triplets import read_pairs
from seka_lightning.diagnostics import answer_log_likelihood, attention_mass
from seka_lightning.lit.validator import (
    BankValidator,
    ExampleMean,
    attention_figure,
    edited_layers,
    encode_questions,
)
from seka_lightning.methods import SekaMethod
from seka_lightning.models import load_model
from seka_lightning.steering import steer

PAIR = {
    "context_1": "The keepers carry silver lanterns.",
    "question_1": "What do the keepers carry?",
    "answer_1": "silver lanterns",
    "context_2": "The tower stands in the valley.",
    "question_2": "Where does the tower stand?",
    "answer_2": "the valley",
}
GAIN = 2.0


def random_bank(path: Path, *, rank: int = 4, seed: int = 0) -> ProjectionBank:
    """Random rank-``rank`` projectors for the 3-layer, 2-KV-head, head-dim-16 tiny Llama."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 2, 16, 16, generator=gen))
    bank = ProjectionBank(
        layers=[0, 1, 2], pos=q[..., :rank] @ q[..., :rank].transpose(-1, -2), metadata={"num_layers": 3}
    )
    bank.save(path)
    return bank


def run_validate(model_dir: Path, bank: Path, qa_path: Path, output: Path, *extra: str):
    return run_lightning(
        [
            "validate",
            "--model",
            "seka_lightning.lit.validator.BankValidator",
            "--model.pretrained",
            str(model_dir),
            "--model.method",
            "seka_lightning.methods.SekaMethod",
            "--model.method.bank",
            str(bank),
            "--model.output",
            str(output),
            "--data",
            "seka_lightning.data.synthetic_qa.SyntheticQADataModule",
            "--data.path",
            str(output.parent / "no-training-file.jsonl"),  # validating must not need it
            "--data.val_path",
            str(qa_path),
            "--data.val_max_samples",
            "3",
            "--data.batch_size",
            "5",
            "--trainer.accelerator",
            "cpu",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            *extra,
        ]
    )


def layer0_steered_attention(model, ids: torch.Tensor, highlight: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """Layer 0's attention weights ``[H, T, T]`` written out from the embeddings, with ``k' = k + k G`` on the
    highlighted keys before rotary embedding (SPEC §4): independent of the steering hooks."""
    config = model.config
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layer = model.model.layers[0]
    hidden = model.model.embed_tokens(ids[None])  # [1, T, D]
    x = layer.input_layernorm(hidden)
    seq = ids.shape[0]
    q = layer.self_attn.q_proj(x).view(1, seq, heads, d).transpose(1, 2)
    k = layer.self_attn.k_proj(x).view(seq, kv_heads, d)
    k = torch.where(highlight[:, None, None], k + torch.einsum("thd,hde->the", k, gains.double()), k)
    k = k.view(1, seq, kv_heads, d).transpose(1, 2)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(seq)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [1, H, T, T]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)[0]


def direct_metrics(model_dir: Path, bank: ProjectionBank, qa_path: Path, *, gain: float, max_samples: int):
    """The validator's numbers written out: one unpadded float64 pass per probe, highlight by the SPEC §2 rule."""
    model, tokenizer = load_model(str(model_dir), dtype="float64", attn_implementation="eager")
    probes = [p for pair in read_pairs(qa_path, max_samples=max_samples) for p in highlighted_questions(pair)]
    rows = {"unsteered": [], "steered": []}
    layer0 = []
    for probe in probes:
        enc = tokenizer(probe.prompt, add_special_tokens=False, return_offsets_mapping=True)
        start, end = probe.span
        highlight = [s >= start - 1 and e <= end for s, e in enc["offset_mapping"]]
        answer = tokenizer(" " + probe.answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(enc["input_ids"] + answer)
        mask = torch.tensor(highlight + [False] * len(answer))
        last = len(enc["input_ids"]) - 1
        for condition in rows:
            with torch.no_grad(), steer(model, bank, mask[None], gain_pos=gain if condition == "steered" else 0.0):
                out = model(input_ids=ids[None], output_attentions=True, use_cache=False)
            mass = [a[0, :, last, mask].sum(-1).mean().item() for a in out.attentions]
            log_probs = out.logits[0].double().log_softmax(-1)
            token_lp = [log_probs[last + i, token].item() for i, token in enumerate(answer)]
            rows[condition].append([*mass, sum(token_lp), sum(token_lp) / len(token_lp)])
            if condition == "steered":
                with torch.no_grad():
                    by_hand = layer0_steered_attention(model, ids, mask, gain * bank.pos[0])
                # eager attention softmaxes in float32 and the hooks edit keys in float32
                torch.testing.assert_close(out.attentions[0][0], by_hand, rtol=0, atol=1e-6)
                layer0.append(by_hand[:, last, mask].sum(-1).mean().item())
    means = {c: torch.tensor(r, dtype=torch.float64).mean(0) for c, r in rows.items()}
    return means, torch.tensor(layer0, dtype=torch.float64).mean(), len(probes)


def test_validate_matches_a_direct_float64_computation(tiny_model_dir, qa_file, tmp_path):
    bank = random_bank(tmp_path / "bank.safetensors")
    output = tmp_path / "report.json"
    cli = run_validate(
        tiny_model_dir, tmp_path / "bank.safetensors", qa_file, output, "--model.method.gain_pos", str(GAIN)
    )
    cli_metrics = dict(cli.trainer.callback_metrics)
    report = json.loads(output.read_text())
    expected, layer0_steered, probes = direct_metrics(tiny_model_dir, bank, qa_file, gain=GAIN, max_samples=3)

    assert report["examples"] == probes == 12 and report["steered_layers"] == [0, 1, 2]
    for condition in ("unsteered", "steered"):
        curve = torch.tensor(report["attention_mass_per_layer"][condition], dtype=torch.float64)
        # a float32 batched run against a float64 unpadded one: float32 rounding only
        torch.testing.assert_close(curve, expected[condition][:3], rtol=0, atol=1e-6)
        summary = report["summary"][condition]
        assert summary["attn_mass"] == pytest.approx(expected[condition][:3].mean().item(), abs=1e-6)
        assert summary["answer_logprob"] == pytest.approx(expected[condition][3].item(), abs=2e-5)
        assert summary["answer_logprob_per_token"] == pytest.approx(expected[condition][4].item(), abs=2e-6)
        for name, value in summary.items():  # the validate table shows the report's numbers
            assert cli_metrics[f"{condition}/{name}"].item() == pytest.approx(value, rel=1e-6)
    assert report["attention_mass_per_layer"]["steered"][0] == pytest.approx(layer0_steered.item(), abs=1e-6)
    delta = expected["steered"] - expected["unsteered"]
    assert report["summary"]["delta"]["answer_logprob"] == pytest.approx(delta[3].item(), abs=4e-5)
    torch.testing.assert_close(
        torch.tensor(report["attention_mass_per_layer"]["delta"], dtype=torch.float64), delta[:3], rtol=0, atol=2e-6
    )
    assert delta[:3].abs().min() > 1e-3  # steering really moved attention, so the comparison is not vacuous
    assert report["settings"]["gain_pos"] == GAIN and report["data"] == str(qa_file)


def validate(model_dir: Path, bank_path: Path, qa_path: Path, *, val_max_samples: int = 2, **kwargs) -> dict:
    output = bank_path.with_suffix(".json")
    validator = BankValidator(str(model_dir), SekaMethod(str(bank_path), **kwargs), output=str(output))
    data = SyntheticQADataModule(val_path=str(qa_path), val_max_samples=val_max_samples, batch_size=3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(validator, datamodule=data, verbose=False)
    return json.loads(output.read_text())


def test_zero_gain_gives_exactly_zero_deltas(tiny_model_dir, qa_file, tmp_path):
    random_bank(tmp_path / "bank.safetensors")
    report = validate(tiny_model_dir, tmp_path / "bank.safetensors", qa_file, gain_pos=0.0, layers="0,2")
    assert report["steered_layers"] == [0, 2]
    assert all(value == 0.0 for value in report["summary"]["delta"].values())
    assert report["attention_mass_per_layer"]["delta"] == [0.0, 0.0, 0.0]
    assert report["summary"]["steered"] == report["summary"]["unsteered"]
    assert 0.0 < report["summary"]["unsteered"]["attn_mass"] < 1.0


def test_steering_only_later_layers_leaves_earlier_attention_unchanged(tiny_model_dir, qa_file, tmp_path):
    random_bank(tmp_path / "bank.safetensors")
    report = validate(tiny_model_dir, tmp_path / "bank.safetensors", qa_file, gain_pos=GAIN, layers="last1")
    delta = report["attention_mass_per_layer"]["delta"]
    assert delta[:2] == [0.0, 0.0] and abs(delta[2]) > 1e-4  # causal in depth: keys of layers 0-1 are untouched
    steered = report["summary"]["delta"]["attn_mass_steered_layers"]
    assert steered == pytest.approx(delta[2], abs=1e-12)
    assert report["summary"]["delta"]["attn_mass"] == pytest.approx(delta[2] / 3, abs=1e-12)


def test_validate_writes_the_before_after_figure_beside_its_json(tiny_model_dir, qa_file, tmp_path):
    from matplotlib.image import imread

    random_bank(tmp_path / "bank.safetensors")
    report = validate(tiny_model_dir, tmp_path / "bank.safetensors", qa_file, gain_pos=GAIN, layers="0,2")
    image = imread(tmp_path / "bank.png")
    assert image.shape[:2] == (420, 840)  # 7 x 3.5 inches at 120 dpi
    assert not list(tmp_path.glob(".bank.png.*"))  # written atomically: no temp file left
    curves = report["attention_mass_per_layer"]
    figure = attention_figure(curves, report["steered_layers"], title="t")
    axes = figure.axes[0]
    plotted = {line.get_label(): [float(y) for y in line.get_ydata()] for line in axes.lines}
    assert plotted == {"unsteered": curves["unsteered"], "steered": curves["steered"]}
    assert sorted(patch.get_x() + 0.5 for patch in axes.patches) == [0.0, 2.0]  # the edited layers are shaded


def test_default_output_is_named_after_the_bank(tiny_model_dir, tmp_path):
    random_bank(tmp_path / "my-bank.safetensors")
    validator = BankValidator(str(tiny_model_dir), SekaMethod(str(tmp_path / "my-bank.safetensors")))
    assert validator.output == Path("outputs/validate/my-bank.json")
    with pytest.raises(ValueError, match=r"layers='5': ids \[5\] are outside 0..2"):  # checked before any data
        BankValidator(str(tiny_model_dir), SekaMethod(str(tmp_path / "my-bank.safetensors"), layers="5"))
    with pytest.raises(ValueError, match="dtype='float64' is not supported"):
        BankValidator(str(tiny_model_dir), SekaMethod(str(tmp_path / "my-bank.safetensors")), dtype="float64")


def test_four_probes_per_pair_with_the_answering_context_highlighted():
    probes = highlighted_questions(PAIR)
    c1, c2 = PAIR["context_1"], PAIR["context_2"]
    assert [p.prompt for p in probes] == [
        f"Context: {c1} {c2}\nQuestion: {PAIR['question_1']}\nAnswer:",
        f"Context: {c2} {c1}\nQuestion: {PAIR['question_1']}\nAnswer:",
        f"Context: {c2} {c1}\nQuestion: {PAIR['question_2']}\nAnswer:",
        f"Context: {c1} {c2}\nQuestion: {PAIR['question_2']}\nAnswer:",
    ]
    assert [p.prompt[slice(*p.span)] for p in probes] == [c1, c1, c2, c2]
    assert [p.answer for p in probes] == ["silver lanterns"] * 2 + ["the valley"] * 2


@pytest.mark.parametrize("chat", [False, True])
def test_encoding_aligns_prompts_and_masks_only_the_context(tokenizer, chat):
    probes = highlighted_questions(PAIR)
    enc, prompt_length = encode_questions(tokenizer, probes, chat=chat)
    width = enc["input_ids"].shape[1]
    assert {k: tuple(v.shape) for k, v in enc.items()} == dict.fromkeys(
        ("input_ids", "attention_mask", "highlight_mask", "labels"), (4, width)
    )
    last = "assistant\n" if chat else "Answer:"
    for row, probe in enumerate(probes):
        ids, real = enc["input_ids"][row], enc["attention_mask"][row].bool()
        prompt_text = tokenizer.decode(ids[:prompt_length][real[:prompt_length]])
        assert prompt_text.endswith(last)
        prompt_real = real[:prompt_length].long()
        assert torch.equal(prompt_real, prompt_real.sort().values)  # prompts are left-padded
        assert tokenizer.decode(ids[enc["highlight_mask"][row]]).strip() == probe.prompt[slice(*probe.span)]
        assert not enc["highlight_mask"][row, prompt_length:].any()
        scored = enc["labels"][row] != -100
        assert not scored[:prompt_length].any()
        assert tokenizer.decode(enc["labels"][row][scored]) == ("" if chat else " ") + probe.answer
        assert torch.equal(scored[prompt_length:], real[prompt_length:])  # answers are right-padded
    assert enc["attention_mask"][:, prompt_length - 1].all()  # the last prompt token is real in every row


def test_attention_mass_and_log_likelihood_against_loops():
    gen = torch.Generator().manual_seed(0)
    attentions = [torch.rand(2, 3, 5, 5, generator=gen).softmax(-1) for _ in range(4)]
    key_mask = torch.tensor([[False, True, True, False, False], [True, False, False, False, True]])
    mass = attention_mass(attentions, key_mask, query_index=3)
    assert mass.dtype == torch.float64 and mass.shape == (2, 4)
    for b in range(2):
        for layer, weights in enumerate(attentions):
            by_hand = sum(
                float(weights[b, h, 3, k]) for h in range(3) for k in range(5) if key_mask[b, k]
            ) / 3  # fmt: skip
            assert mass[b, layer].item() == pytest.approx(by_hand, abs=1e-7)

    logits = torch.randn(2, 4, 7, generator=gen)
    labels = torch.tensor([[-100, 3, 5, -100], [-100, -100, 6, 0]])
    total, count = answer_log_likelihood(logits, labels)
    assert count.tolist() == [2, 2]
    lp = logits.double().log_softmax(-1)
    assert total[0].item() == pytest.approx(lp[0, 0, 3].item() + lp[0, 1, 5].item(), abs=1e-12)
    assert total[1].item() == pytest.approx(lp[1, 1, 6].item() + lp[1, 2, 0].item(), abs=1e-12)


def test_diagnostics_errors():
    attentions = [torch.rand(1, 2, 4, 4)]
    with pytest.raises(ValueError, match="attn_implementation='eager' and output_attentions=True"):
        attention_mass((), torch.zeros(1, 4, dtype=torch.bool), query_index=-1)
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        attention_mass(attentions, torch.zeros(1, 4), query_index=-1)
    with pytest.raises(ValueError, match=r"attentions\[0\] has shape \(1, 2, 4, 4\); expected \[1, heads, 5, 5\]"):
        attention_mass(attentions, torch.zeros(1, 5, dtype=torch.bool), query_index=-1)
    with pytest.raises(ValueError, match="query_index=4 is outside a sequence of 4 tokens"):
        attention_mass(attentions, torch.zeros(1, 4, dtype=torch.bool), query_index=4)
    with pytest.raises(ValueError, match=r"logits \[B, T, V\] and labels \[B, T\] must agree"):
        answer_log_likelihood(torch.zeros(1, 4, 3), torch.zeros(1, 3, dtype=torch.long))


def test_means_are_exact_across_ranks():
    """Each rank sees each probe once (empty batches keep ranks in step); summed states give the global mean."""
    values = torch.randn(11, 3, dtype=torch.float64)
    shards = [list(RankBatches(list(range(11)), batch_size=2, rank=r, world_size=4)) for r in range(4)]
    assert sorted(i for shard in shards for batch in shard for i in batch) == list(range(11))
    metrics = []
    for shard in shards:
        metric = ExampleMean(3)
        for batch in shard:
            if batch:
                metric.update(values[batch])
        metrics.append(metric)
    for other in metrics[1:]:
        metrics[0].merge_state(other)
    torch.testing.assert_close(metrics[0].compute(), values.mean(0), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="no examples were measured"):
        ExampleMean(3).compute()


def test_validation_needs_a_held_out_file(tmp_path, qa_file):
    data = SyntheticQADataModule(path=str(tmp_path / "absent.jsonl"), val_path=None)
    with pytest.raises(ValueError, match="data.val_path is None; set it to a held-out QA JSONL"):
        data.setup("validate")
    data = SyntheticQADataModule(path=str(tmp_path / "absent.jsonl"), val_path=str(qa_file), val_max_samples=5)
    data.setup("validate")
    assert len(data.val_questions) == 20 and len(data.val_dataloader()) == 2  # batch_size 16
    with pytest.raises(ValueError, match="val_max_samples must be >= 1 or None, got 0"):
        SyntheticQADataModule(val_max_samples=0)


def test_layers_whose_heads_were_all_skipped_are_not_counted_as_steered():
    pos = torch.eye(16).expand(3, 2, 16, 16).clone()
    pos[1] = 0.0
    bank = ProjectionBank(layers=[0, 1, 2], pos=pos, neg=torch.eye(16).expand(3, 2, 16, 16), metadata={"num_layers": 3})
    assert edited_layers(bank, {0: 0, 1: 1, 2: 2}, neg=False) == [0, 2]
    assert edited_layers(bank, {1: 1}, neg=True) == [1]  # the negative projector of layer 1 is not zero
    with pytest.raises(ValueError, match=r"the bank's projectors are zero on every selected layer \[1\]"):
        edited_layers(bank, {1: 1}, neg=False)


def test_two_process_ddp_validation_equals_one_device(tiny_model_dir, qa_file, tmp_path):
    """12 probes in batches of 5 over 2 ranks: rank 1 gets one batch and one empty one; the means stay exact."""
    random_bank(tmp_path / "bank.safetensors")
    one = validate(tiny_model_dir, tmp_path / "bank.safetensors", qa_file, gain_pos=GAIN, val_max_samples=3)
    cmd = [
        sys.executable, "-m", "seka_lightning.cli", "validate",
        "--model", "seka_lightning.lit.validator.BankValidator",
        "--model.pretrained", str(tiny_model_dir),
        "--model.method", "seka_lightning.methods.SekaMethod",
        "--model.method.bank", str(tmp_path / "bank.safetensors"),
        "--model.method.gain_pos", str(GAIN),
        "--model.output", str(tmp_path / "two.json"),
        "--data", "seka_lightning.data.synthetic_qa.SyntheticQADataModule",
        "--data.val_path", str(qa_file),
        "--data.val_max_samples", "3",
        "--data.batch_size", "5",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "2",
        "--trainer.strategy", "ddp",
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["examples"] == one["examples"] == 12
    for condition in ("unsteered", "steered", "delta"):
        for name, value in one["summary"][condition].items():
            assert two["summary"][condition][name] == pytest.approx(value, abs=1e-12)
        torch.testing.assert_close(
            torch.tensor(two["attention_mass_per_layer"][condition]),
            torch.tensor(one["attention_mass_per_layer"][condition]),
            rtol=0,
            atol=1e-12,
        )
