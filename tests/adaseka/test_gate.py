"""The learned routing gate: identity at initialisation, gradients only into the gate, training lowers the loss,
save/load, clear errors, and the selector's ``gate`` argument."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from seka_lightning.adaseka.experts import ExpertSet
from seka_lightning.adaseka.gate import AdaSekaGateTrainer, GateQADataModule, RoutingGate
from seka_lightning.adaseka.hooks import AdaptiveSteerer, RoutingRecord
from seka_lightning.adaseka.method import AdaSekaMethod
from seka_lightning.data.synthetic_qa import highlighted_questions
from seka_lightning.data.triplets import read_pairs
from seka_lightning.highlight import encode_spans
from seka_lightning.lit.validator import encode_questions
from seka_lightning.methods import position_ids_for

NAMES = ("alpha", "beta", "gamma")


def save_experts(expert_banks, folder: Path) -> Path:
    for name, bank in expert_banks.items():
        bank.save(folder / f"{name}.safetensors")
    config = folder / "experts.json"
    config.write_text(json.dumps({name: str(folder / f"{name}.safetensors") for name in expert_banks}))
    return config


def questions(qa_file: Path, pairs: int = 2):
    return [q for pair in read_pairs(qa_file, max_samples=pairs) for q in highlighted_questions(pair)]


def routed_logits(model, experts, enc, prompt_length, *, gate=None, record=None) -> torch.Tensor:
    steerer = AdaptiveSteerer.attach(
        model, experts, enc, gain=3.0, top_k=4, gate=gate, query_index=prompt_length - 1, record=record
    )
    try:
        return model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            position_ids=position_ids_for(enc["attention_mask"]),
            use_cache=False,
        ).logits
    finally:
        steerer.remove()


@pytest.fixture
def trainer_module(tiny_model_dir, expert_banks, tmp_path) -> AdaSekaGateTrainer:
    config = save_experts(expert_banks, tmp_path)
    torch.manual_seed(0)
    return AdaSekaGateTrainer(
        str(tiny_model_dir), str(config), gain=3.0, top_k=4, lr=0.1, output=str(tmp_path / "gate.safetensors")
    )


def test_identity_gate_is_bitwise_the_training_free_router(tiny_model, tokenizer, experts, qa_file):
    enc, prompt_length = encode_questions(tokenizer, questions(qa_file))
    gate = RoutingGate(experts.layers, experts.names)
    with torch.no_grad():
        plain = routed_logits(tiny_model, experts, enc, prompt_length)
        gated = routed_logits(tiny_model, experts, enc, prompt_length, gate=gate)
        unsteered = routed_logits(tiny_model, experts, {**enc, "highlight_mask": enc["highlight_mask"] & False}, 1)
    assert (plain - unsteered).abs().max() > 1e-3, "the test needs a visible edit"
    assert torch.equal(gated, plain)


def test_gate_maps_coefficients_as_documented(tiny_model, tokenizer, experts, qa_file):
    enc, prompt_length = encode_questions(tokenizer, questions(qa_file))
    gate = RoutingGate(experts.layers, experts.names)
    with torch.no_grad():
        gate.log_scale.copy_(torch.tensor([[0.5, -1.0, 0.2], [0.0, 0.3, -0.4], [1.0, 0.0, 0.0]]))
        gate.bias.copy_(torch.tensor([[0.1, 0.0, -0.2], [0.0, 0.05, 0.0], [0.3, -0.1, 0.0]]))
        plain, gated = RoutingRecord(), RoutingRecord()
        routed_logits(tiny_model, experts, enc, prompt_length, record=plain)
        routed_logits(tiny_model, experts, enc, prompt_length, gate=gate, record=gated)
    # layer 0's query does not depend on any edit, so its gated coefficients are exactly c * exp(s) + b
    c = plain.coefficients[0].double()
    expected = c * gate.log_scale[0].double().exp() + gate.bias[0].double()
    torch.testing.assert_close(gated.coefficients[0].double(), expected, rtol=1e-6, atol=1e-6)


def test_routing_query_at_the_last_prompt_token(tiny_model, tokenizer, experts, qa_file):
    """Teacher forcing routes with the last prompt token: the prompt's logits equal a prompt-only routed pass."""
    probes = questions(qa_file, pairs=1)
    enc, prompt_length = encode_questions(tokenizer, probes)
    with torch.no_grad():
        full = routed_logits(tiny_model.double(), experts, enc, prompt_length)
        prompt_only = {key: value[:, :prompt_length] for key, value in enc.items()}
        alone = routed_logits(tiny_model, experts, prompt_only, prompt_length)
    torch.testing.assert_close(full[:, :prompt_length], alone, rtol=1e-9, atol=1e-9)


def test_gradients_reach_only_the_gate(trainer_module, qa_file):
    loss = trainer_module.answer_nll(questions(qa_file), route="gate")
    loss.backward()
    trainable = {name for name, p in trainer_module.named_parameters() if p.requires_grad}
    assert trainable == {"gate.log_scale", "gate.bias"}
    for param in (trainer_module.gate.log_scale, trainer_module.gate.bias):
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    assert all(p.grad is None for p in trainer_module.model.parameters())


def test_training_steps_lower_the_loss_on_a_fixed_batch(trainer_module, qa_file):
    batch = questions(qa_file)
    optimizer = trainer_module.configure_optimizers()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = trainer_module.answer_nll(batch, route="gate")
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        end = trainer_module.answer_nll(batch, route="gate").item()
        router = trainer_module.answer_nll(batch, route="router").item()
    assert losses[0] == pytest.approx(router, abs=1e-6)  # the identity gate starts as the training-free router
    assert end < losses[0] - 1e-3


def test_lightning_fit_trains_and_saves_the_gate(trainer_module, qa_file, tmp_path):
    data = GateQADataModule(str(qa_file), train_pairs=6, val_pairs=4, batch_size=8)
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    before = trainer.validate(trainer_module, datamodule=data, verbose=False)[0]  # in inference mode, then fit
    assert before["val/nll_gate"] == pytest.approx(before["val/nll_router"], abs=1e-6)
    trainer.fit(trainer_module, datamodule=data)
    assert not trainer_module.model.training, "the frozen model stays in eval mode"
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert {"val/nll_gate", "val/nll_router", "val/nll_unsteered"} <= set(metrics)
    saved = RoutingGate.load(tmp_path / "gate.safetensors", layer_ids=[0, 1, 2], experts=NAMES)
    assert torch.equal(saved.log_scale, trainer_module.gate.log_scale.detach().cpu())
    assert saved.log_scale.abs().sum() > 0, "training moved the gate"


def test_save_load_round_trip(tmp_path):
    gate = RoutingGate([1, 3], NAMES)
    with torch.no_grad():
        gate.log_scale.copy_(torch.randn(2, 3))
        gate.bias.copy_(torch.randn(2, 3))
    path = gate.save(tmp_path / "sub" / "gate.safetensors")
    loaded = RoutingGate.load(path, layer_ids=[1, 3], experts=NAMES)
    assert loaded.layer_ids == (1, 3) and loaded.experts == NAMES
    assert torch.equal(loaded.log_scale, gate.log_scale.detach()) and torch.equal(loaded.bias, gate.bias.detach())
    assert sorted(p.name for p in path.parent.iterdir()) == ["gate.safetensors"]  # no temp file left


def test_bad_gate_files_raise_clear_errors(tmp_path):
    path = RoutingGate([0, 1], NAMES).save(tmp_path / "gate.safetensors")
    with pytest.raises(ValueError, match=r"trained for 2 steered layers \[0, 1\] but the router steers 3 layers"):
        RoutingGate.load(path, layer_ids=[0, 1, 2], experts=NAMES)
    with pytest.raises(ValueError, match=r"trained for experts \['alpha', 'beta', 'gamma'\] but the router has"):
        RoutingGate.load(path, layer_ids=[0, 1], experts=("beta", "alpha", "gamma"))
    with pytest.raises(ValueError, match="the gate covers layers \\[0, 1\\], not layer 2"):
        RoutingGate([0, 1], NAMES)(2, torch.zeros(1, 2, 3))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        RoutingGate.load(junk)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RoutingGate.load(tmp_path / "missing.safetensors")


def test_selector_applies_a_saved_gate(tiny_model, tokenizer, expert_banks, tmp_path):
    config = save_experts(expert_banks, tmp_path)
    text = "The keepers carry silver lanterns every night."
    start = text.index("silver")
    enc = encode_spans(tokenizer, [text], [[(start, start + len("silver lanterns"))]])
    gate = RoutingGate([0, 1, 2], NAMES)
    with torch.no_grad():
        gate.bias.fill_(0.5)
    path = gate.save(tmp_path / "gate.safetensors")
    method = AdaSekaMethod(str(config), gain=3.0, top_k=4, gate=str(path))
    method.setup(tiny_model, tokenizer)
    logits = method.prompt_logits(tiny_model, enc)
    with torch.no_grad():
        expected = routed_logits(tiny_model, ExpertSet.load(str(config)), enc, enc["input_ids"].shape[1], gate=gate)
    torch.testing.assert_close(logits, expected[:, -1])
    plain = AdaSekaMethod(str(config), gain=3.0, top_k=4)
    plain.setup(tiny_model, tokenizer)
    assert (logits - plain.prompt_logits(tiny_model, enc)).abs().max() > 1e-4
    assert method.describe()["gate"] == str(path)
    assert sum(len(m._forward_hooks) for m in tiny_model.modules()) == 0
    wrong = RoutingGate([0, 1], NAMES).save(tmp_path / "wrong.safetensors")
    bad = AdaSekaMethod(str(config), gate=str(wrong))
    with pytest.raises(ValueError, match=r"trained for 2 steered layers"):
        bad.setup(tiny_model, tokenizer)
