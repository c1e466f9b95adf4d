"""Key-scaling ablation: highlighted keys become (1 + g) k on the selected layers (float64 reference), the logits
equal a forward pass with a hand-written scaling hook, and layer selection follows SEKA's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import capture_keys

from seka_lightning import ProjectionBank, encode_highlighted
from seka_lightning.baselines.key_scaling import KeyScalingMethod
from seka_lightning.methods import HighlightMethod

PROMPTS = [
    "Previously the keepers carried **silver lanterns** across the north harbor. What do they carry?",
    "The **golden tower** stands in the valley.",
]
GAIN = 0.75
REPO = Path(__file__).resolve().parents[2]


def ready(model, tokenizer, **kwargs) -> KeyScalingMethod:
    method = KeyScalingMethod(**kwargs)
    method.setup(model, tokenizer)
    return method


def test_highlighted_keys_are_scaled_by_one_plus_gain(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    mask = enc["highlight_mask"]
    base = capture_keys(tiny_model, enc)
    for layer in range(3):  # one layer at a time: the layer's input is the unsteered one
        method = ready(tiny_model, tokenizer, gain_pos=GAIN, layers=str(layer))
        with method.active(tiny_model, enc):
            edited = capture_keys(tiny_model, enc)[layer]
        reference = (1 + GAIN) * base[layer].double()  # [B, T, H, d]
        torch.testing.assert_close(edited[mask].double(), reference[mask], rtol=1e-6, atol=1e-7)
        assert torch.equal(edited[~mask], base[layer][~mask])
        assert mask.any() and (~mask).any()


def scale_hook(mask: torch.Tensor, factor: float):
    """Scale the k_proj output ``[B, T, H * d]`` on highlighted rows, written independently of the steering code."""
    scale = torch.where(mask, factor, 1.0)[..., None]  # [B, T, 1]
    return lambda module, args, out: out * scale


def test_logits_equal_a_hand_written_scaling(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    method = ready(tiny_model, tokenizer, gain_pos=GAIN, layers="1,2")
    steered = method.prompt_logits(tiny_model, enc)
    handles = [
        tiny_model.model.layers[i].self_attn.k_proj.register_forward_hook(scale_hook(enc["highlight_mask"], 1 + GAIN))
        for i in (1, 2)
    ]
    try:
        manual = HighlightMethod().prompt_logits(tiny_model, enc)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(steered, manual, rtol=1e-5, atol=1e-5)
    assert (steered - HighlightMethod().prompt_logits(tiny_model, enc)).abs().max() > 1e-3


def test_all_means_the_sekas_bank_layers(tiny_model, tokenizer, tmp_path):
    eye = torch.eye(16).expand(2, 2, 16, 16).clone() * 0.5
    bank = ProjectionBank(layers=[0, 2], pos=eye, metadata={"num_layers": 3}).save(tmp_path / "b.safetensors")
    enc = encode_highlighted(tokenizer, PROMPTS)
    method = ready(tiny_model, tokenizer, bank=str(bank), gain_pos=GAIN)
    assert method.bank.layers == [0, 2] and torch.equal(method.bank.pos, torch.eye(16).expand(2, 2, 16, 16))
    with method.active(tiny_model, enc):
        edited = capture_keys(tiny_model, enc)
    base = capture_keys(tiny_model, enc)
    torch.testing.assert_close(
        edited[0].double(), torch.where(enc["highlight_mask"][..., None, None], 1 + GAIN, 1.0) * base[0].double()
    )
    assert not torch.equal(edited[2], base[2])  # steered (its input also changed, so no closed form here)
    assert ready(tiny_model, tokenizer).bank.layers == [0, 1, 2]


def test_describe_and_reused_checks(tiny_model, tokenizer):
    assert KeyScalingMethod(gain_pos=2.0, layers="last2").describe() == {
        "method": "key_scaling",
        "projectors": "identity",
        "bank": None,
        "gain_pos": 2.0,
        "layers": "last2",
        "layer_mapping": "by_id",
    }
    method = ready(tiny_model, tokenizer, layers="last4")
    with pytest.raises(ValueError, match="N must be between 1 and 3"):
        with method.active(tiny_model, encode_highlighted(tokenizer, PROMPTS)):
            pass


@pytest.mark.parametrize(
    ("method", "extra", "expected"),
    [
        (
            "seka_lightning.baselines.key_scaling.KeyScalingMethod",
            ["--model.method.gain_pos", "1.5"],
            ("key_scaling", 1.5),
        ),
        (
            "seka_lightning.baselines.random_projection.RandomProjectionMethod",
            ["--model.method.seed", "2"],
            ("random", 2),
        ),
    ],
)
def test_ablations_run_from_the_shipped_eval_config(tiny_model_dir, tmp_path, method, extra, expected):
    from seka_lightning.cli import run_lightning

    bank = ProjectionBank(layers=[0, 1, 2], pos=torch.eye(16).expand(3, 2, 16, 16).clone(), metadata={"num_layers": 3})
    args = ["--model.method", method, "--model.method.bank", str(bank.save(tmp_path / "b.safetensors")), *extra]
    config = str(REPO / "configs" / "eval" / "counterfact.yaml")
    cli = run_lightning(["-c", config, "--model.pretrained", str(tiny_model_dir), *args], run=False)
    described = cli.model.method.describe()
    assert (described["method"], described.get("seed", described["gain_pos"])) == expected
