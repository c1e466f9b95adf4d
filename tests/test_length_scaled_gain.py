"""Length-scaled key steering: with ``length_reference`` a row with ``n`` highlighted tokens gets
``k + min(1, (length_reference / n) ** length_power) k G`` (float64 reference), rows with short highlights and the
default (None) are bit-identical to plain SEKA, bad values are refused, and the ablations take the option too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tests.conftest import capture_keys, printed_predict_config

from seka_lightning import ProjectionBank, encode_highlighted
from seka_lightning.baselines.key_scaling import KeyScalingMethod
from seka_lightning.baselines.random_projection import RandomProjectionMethod
from seka_lightning.methods import SekaMethod
from seka_lightning.steering import RowScales, scaled_edit, split_gains

GAIN_POS, GAIN_NEG = 1.5, 0.7
SEQ_LEN = 20
COUNTS = (3, 12)  # highlighted tokens of the two rows
PROMPTS = [
    "Previously the keepers carried **silver lanterns** across the north harbor. What do they carry?",
    "The **golden tower** stands in the valley.",
    "Answer **in one word**: where is the **old castle** now?",
]


@pytest.fixture
def bank(tmp_path: Path) -> tuple[ProjectionBank, Path]:
    generator = torch.Generator().manual_seed(7)

    def projectors() -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(3, 2, 16, 16, generator=generator, dtype=torch.float64))
        return (q[..., :5] @ q[..., :5].transpose(-1, -2)).float()

    bank = ProjectionBank(layers=[0, 1, 2], pos=projectors(), neg=projectors(), metadata={"num_layers": 3})
    return bank, bank.save(tmp_path / "bank.safetensors")


def two_rows(vocab_size: int) -> dict[str, torch.Tensor]:
    """Two unpadded rows of SEQ_LEN random tokens with 3 and 12 highlighted tokens."""
    generator = torch.Generator().manual_seed(3)
    mask = torch.zeros(2, SEQ_LEN, dtype=torch.bool)
    mask[0, 5:8] = True
    mask[1, 2:14] = True
    assert tuple(mask.sum(1).tolist()) == COUNTS
    return {
        "input_ids": torch.randint(3, vocab_size, (2, SEQ_LEN), generator=generator),
        "attention_mask": torch.ones(2, SEQ_LEN, dtype=torch.long),
        "highlight_mask": mask,
    }


def keys_under(method, model, enc) -> list[torch.Tensor]:
    """Every layer's keys with ``method`` active (``None``: the plain model)."""
    if method is None:
        return capture_keys(model, enc)
    with method.active(model, enc):
        return capture_keys(model, enc)


def ready(cls, *args, model, **kwargs):
    method = cls(*args, **kwargs)
    method.setup(model, None)
    return method


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_long_rows_get_the_scaled_edit_and_short_rows_todays(tiny_model, tokenizer, bank, power):
    bank, path = bank
    enc = two_rows(len(tokenizer))
    mask = enc["highlight_mask"]
    settings = {"neg": None, "gain_pos": GAIN_POS, "gain_neg": GAIN_NEG, "layers": "1"}  # one layer: input unsteered
    plain = ready(SekaMethod, str(path), model=tiny_model, **settings)
    scaled = ready(SekaMethod, str(path), model=tiny_model, length_reference=4, length_power=power, **settings)
    base = keys_under(None, tiny_model, enc)[1]
    today = keys_under(plain, tiny_model, enc)[1]
    edited = keys_under(scaled, tiny_model, enc)[1]

    k = base.double()
    gains = (GAIN_POS * bank.pos[1].double() + GAIN_NEG * bank.neg[1].double()) / 2
    step = torch.einsum("bthd,hde->bthe", k, gains)  # k G
    strength = torch.tensor([1.0, (4 / 12) ** power], dtype=torch.float64)[:, None, None, None]
    expected = k + strength * step
    torch.testing.assert_close(edited[mask].double(), expected[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(edited[0], today[0])  # 3 <= 4 highlighted tokens: exactly today's edit
    assert torch.equal(edited[~mask], base[~mask])
    # the second row really is weaker than today's edit, by the expected factor
    shrink = (edited[1][mask[1]] - base[1][mask[1]]).double().norm() / (today[1][mask[1]] - base[1][mask[1]]).norm()
    assert abs(shrink.item() - (4 / 12) ** power) < 1e-4


def test_bf16_keys_short_rows_bit_identical_long_rows_within_half_an_ulp(tiny_model, tokenizer, bank):
    """On the split half-precision path full-strength rows keep today's product; scaled rows round once from float32."""
    bank, path = bank
    model = tiny_model.to(torch.bfloat16)
    enc = two_rows(len(tokenizer))
    mask = enc["highlight_mask"]
    settings = {"gain_pos": GAIN_POS, "gain_neg": GAIN_NEG, "layers": "1"}
    base = keys_under(None, model, enc)[1]
    today = keys_under(ready(SekaMethod, str(path), model=model, **settings), model, enc)[1]
    edited = keys_under(ready(SekaMethod, str(path), model=model, length_reference=4, **settings), model, enc)[1]
    assert torch.equal(edited[0], today[0]) and torch.equal(edited[~mask], base[~mask])
    k = base[1][mask[1]].double()
    gains = ((GAIN_POS * bank.pos[1].float() + GAIN_NEG * bank.neg[1].float()) / 2).double()
    exact = k + (4 / 12) * torch.einsum("mhd,hde->mhe", k, gains)
    magnitude = k.abs() + (4 / 12) * torch.einsum("mhd,hde->mhe", k.abs(), gains.abs())
    assert ((edited[1][mask[1]].double() - exact).abs() <= magnitude * torch.finfo(torch.bfloat16).eps / 2).all()


def test_split_path_keeps_todays_product_on_full_rows_on_many_random_keys():
    """``scaled_edit`` on 400 rows of random bf16 keys: full-strength rows are today's split product bit for bit
    (the float32 product differs from it in a few elements), scaled rows within half an ulp of the exact edit."""
    generator = torch.Generator().manual_seed(0)
    heads, rows, d = 2, 400, 32
    q, _ = torch.linalg.qr(torch.randn(heads, d, d, generator=generator))
    gains = 3.0 * (q[..., :8] @ q[..., :8].transpose(-1, -2))
    keys = torch.randn(heads, rows, d, generator=generator).to(torch.bfloat16)
    split = split_gains(gains, torch.bfloat16)
    full = torch.arange(rows) % 2 == 0
    scale = torch.where(full, 1.0, 0.3)
    got = scaled_edit(keys, gains, RowScales(scale=scale, full=full), split=split)
    today = torch.baddbmm(keys, torch.cat([keys, keys], dim=-1), split)
    assert torch.equal(got[:, full], today[:, full])
    assert not torch.equal(torch.baddbmm(keys.float(), keys.float(), gains).to(torch.bfloat16), today)
    k = keys[:, ~full].double()
    exact = k + 0.3 * k @ gains.double()
    magnitude = k.abs() + 0.3 * k.abs() @ gains.double().abs()
    assert ((got[:, ~full].double() - exact).abs() <= magnitude * torch.finfo(torch.bfloat16).eps / 2).all()


def test_default_is_todays_edit_bit_for_bit(tiny_model, tokenizer, bank):
    """length_reference None: the keys equal today's expression ``baddbmm(k, k, G)`` on the selected rows exactly."""
    bank, path = bank
    enc = encode_highlighted(tokenizer, PROMPTS)
    mask = enc["highlight_mask"]
    method = ready(SekaMethod, str(path), model=tiny_model, gain_pos=GAIN_POS, gain_neg=GAIN_NEG, layers="1")
    assert method.length_reference is None and "length_reference" not in method.describe()
    base = keys_under(None, tiny_model, enc)[1]
    edited = keys_under(method, tiny_model, enc)[1]
    b, t, heads, d = base.shape
    rows = mask.reshape(-1).nonzero().squeeze(1)
    picked = base.reshape(b * t, heads, d).index_select(0, rows).transpose(0, 1)
    gains = (GAIN_POS * bank.pos[1].float() + GAIN_NEG * bank.neg[1].float()) / 2
    expected = base.reshape(b * t, heads, d).index_copy(0, rows, torch.baddbmm(picked, picked, gains).transpose(0, 1))
    assert torch.equal(edited, expected.view(base.shape))
    assert not torch.equal(edited, base)


def test_a_reference_above_every_highlight_gives_the_plain_logits(tiny_model, tokenizer, bank):
    _, path = bank
    enc = encode_highlighted(tokenizer, PROMPTS)
    longest = int(enc["highlight_mask"].sum(1).max())
    settings = {"gain_pos": GAIN_POS, "gain_neg": GAIN_NEG}
    plain = ready(SekaMethod, str(path), model=tiny_model, **settings).prompt_logits(tiny_model, enc)
    for reference in (longest, longest + 50):
        scaled = ready(SekaMethod, str(path), model=tiny_model, length_reference=reference, **settings)
        assert torch.equal(scaled.prompt_logits(tiny_model, enc), plain)
    shorter = ready(SekaMethod, str(path), model=tiny_model, length_reference=1, **settings)
    assert not torch.equal(shorter.prompt_logits(tiny_model, enc), plain)  # the option does act


REFERENCE_MESSAGE = (
    "length_reference must be an integer >= 1 (the highlight length, in tokens, up to which the edit keeps its full "
    "strength), got {!r}; pass e.g. 8, or None to edit every row at full strength"
)
POWER_MESSAGE = (
    "length_power must be a finite number > 0, got {!r}; pass e.g. 1 (the edit of a row with n > length_reference "
    "highlighted tokens is scaled by length_reference / n) or 0.5 (its square root)"
)


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8"])
def test_bad_length_reference_is_refused(value):
    for cls in (SekaMethod, KeyScalingMethod):
        with pytest.raises(ValueError, match=f"^{re.escape(REFERENCE_MESSAGE.format(value))}$"):
            cls("bank.safetensors", length_reference=value)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True])
def test_bad_length_power_is_refused(value):
    with pytest.raises(ValueError, match=f"^{re.escape(POWER_MESSAGE.format(value))}$"):
        SekaMethod("bank.safetensors", length_reference=4, length_power=value)


def test_key_scaling_takes_the_length_scaling(tiny_model, tokenizer):
    enc = two_rows(len(tokenizer))
    mask = enc["highlight_mask"]
    method = ready(KeyScalingMethod, model=tiny_model, gain_pos=0.75, layers="1", length_reference=4, length_power=0.5)
    base = keys_under(None, tiny_model, enc)[1].double()
    edited = keys_under(method, tiny_model, enc)[1]
    factor = 1 + 0.75 * torch.tensor([1.0, (4 / 12) ** 0.5], dtype=torch.float64)[:, None, None, None]
    expected = torch.where(mask[..., None, None], factor * base, base)
    torch.testing.assert_close(edited.double(), expected, rtol=1e-6, atol=1e-6)
    assert method.describe()["length_reference"] == 4 and method.describe()["length_power"] == 0.5


def test_random_ablation_takes_the_length_scaling(tiny_model, tokenizer, bank):
    _, path = bank
    enc = two_rows(len(tokenizer))
    mask = enc["highlight_mask"]
    method = ready(RandomProjectionMethod, str(path), model=tiny_model, seed=5, layers="1", length_reference=6)
    base = keys_under(None, tiny_model, enc)[1].double()
    edited = keys_under(method, tiny_model, enc)[1]
    random_pos = method.bank.pos[1].double()  # g+ = 1, no g-: G = P_random
    strength = torch.tensor([1.0, 6 / 12], dtype=torch.float64)[:, None, None, None]
    expected = base + strength * torch.einsum("bthd,hde->bthe", base, random_pos)
    torch.testing.assert_close(edited[mask].double(), expected[mask], rtol=1e-5, atol=1e-5)
    described = method.describe()
    assert (described["seed"], described["length_reference"], described["length_power"]) == (5, 6, 1.0)


def test_the_cli_takes_both_options():
    """``--model.method.length_reference`` / ``length_power`` reach the method's init args (jsonargparse)."""
    config = printed_predict_config(
        "--model.method", "SekaMethod", "--model.method.bank", "b.safetensors",
        "--model.method.length_reference", "8", "--model.method.length_power", "0.5",
    )  # fmt: skip
    init_args = config["model"]["init_args"]["method"]["init_args"]
    assert (init_args["length_reference"], init_args["length_power"]) == (8, 0.5)
