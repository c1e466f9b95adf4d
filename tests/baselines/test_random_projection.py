"""Random-projection ablation: same ranks as the real bank, true projectors, seeded, and steering with SEKA's formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import capture_keys

from seka_lightning import ProjectionBank, encode_highlighted
from seka_lightning.baselines.random_projection import RandomProjectionMethod, projector_ranks

PROMPTS = [
    "Previously the keepers carried **silver lanterns** across the north harbor. What do they carry?",
    "The **golden tower** stands in the valley.",
]
POS_RANKS = torch.tensor([[3, 0], [5, 16], [1, 7]])  # [layer, KV head]; 0 = a skipped head
NEG_RANKS = torch.tensor([[13, 0], [11, 0], [15, 9]])


def projectors_of_rank(ranks: torch.Tensor, seed: int, d: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(*ranks.shape, d, d, generator=gen, dtype=torch.float64))
    u = q * (torch.arange(d) < ranks[..., None])[..., None, :]
    return (u @ u.transpose(-1, -2)).float()


@pytest.fixture
def bank_file(tmp_path: Path) -> Path:
    bank = ProjectionBank(
        layers=[0, 1, 2],
        pos=projectors_of_rank(POS_RANKS, seed=100),
        neg=projectors_of_rank(NEG_RANKS, seed=101),
        metadata={"num_layers": 3},
    )
    return bank.save(tmp_path / "bank.safetensors")


def loaded(bank_file: Path, **kwargs) -> RandomProjectionMethod:
    method = RandomProjectionMethod(str(bank_file), **kwargs)
    method.setup(None, None)
    return method


def test_ranks_match_the_real_bank_head_by_head(bank_file):
    bank = loaded(bank_file).bank
    for random, ranks in ((bank.pos, POS_RANKS), (bank.neg, NEG_RANKS)):
        assert torch.equal(projector_ranks(random), ranks)
        assert torch.equal(torch.linalg.matrix_rank(random.double(), atol=1e-4), ranks)


def test_random_projectors_are_symmetric_idempotent_and_new(bank_file):
    bank = loaded(bank_file).bank
    real = ProjectionBank.load(bank_file)
    for random, original in ((bank.pos, real.pos), (bank.neg, real.neg)):
        p = random.double()
        torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-5)
        torch.testing.assert_close(p, p.transpose(-1, -2), rtol=0, atol=1e-6)
        partial = (projector_ranks(original) > 0) & (projector_ranks(original) < 16)
        assert (random - original).flatten(2).norm(dim=-1)[partial].min() > 0.5  # a different subspace
    assert bank.u_pos is None and bank.metadata["random_seed"] == 0


def test_zero_heads_stay_zero(bank_file):
    bank = loaded(bank_file).bank
    assert torch.equal(bank.pos[POS_RANKS == 0], torch.zeros(1, 16, 16))
    assert torch.equal(bank.neg[NEG_RANKS == 0], torch.zeros(2, 16, 16))


def test_seeds(bank_file):
    a, b, c = loaded(bank_file, seed=3).bank, loaded(bank_file, seed=3).bank, loaded(bank_file, seed=4).bank
    assert torch.equal(a.pos, b.pos) and torch.equal(a.neg, b.neg)
    partial = (POS_RANKS > 0) & (POS_RANKS < 16)  # a full-rank projector is the identity for every seed
    assert (a.pos - c.pos)[partial].abs().amax(dim=(-1, -2)).min() > 1e-2
    assert not torch.allclose(a.neg, c.neg)


@pytest.mark.parametrize("gain_neg", [None, 0.5])
def test_steering_uses_the_random_projectors(tiny_model, tokenizer, bank_file, gain_neg):
    gain_pos = 2.0
    enc = encode_highlighted(tokenizer, PROMPTS)
    mask = enc["highlight_mask"]
    base = capture_keys(tiny_model, enc)
    for layer in range(3):  # one layer at a time, so the layer's input keys are the unsteered ones
        method = loaded(bank_file, gain_pos=gain_pos, gain_neg=gain_neg, layers=str(layer), seed=7)
        with method.active(tiny_model, enc):
            edited = capture_keys(tiny_model, enc)[layer]
        k = base[layer].double()  # [B, T, H, d]
        edit = gain_pos * torch.einsum("bthd,hde->bthe", k, method.bank.pos[layer].double())
        if gain_neg is not None:
            edit = (edit + gain_neg * torch.einsum("bthd,hde->bthe", k, method.bank.neg[layer].double())) / 2
        torch.testing.assert_close(edited[mask].double(), (k + edit)[mask], rtol=1e-5, atol=1e-5)
        assert torch.equal(edited[~mask], base[layer][~mask])
        assert (edited[mask] - base[layer][mask]).abs().max() > 1e-2


def test_describe_and_seed_validation(bank_file):
    described = RandomProjectionMethod(str(bank_file), gain_pos=1.5, seed=11).describe()
    assert described["method"] == "random" and described["seed"] == 11 and described["gain_pos"] == 1.5
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        RandomProjectionMethod(str(bank_file), seed=-1)
