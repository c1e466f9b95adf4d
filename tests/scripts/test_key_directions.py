"""scripts/research/key_directions.py: the avenue helpers (the reference's key feature maps φ and their inverses,
the φ-space edit, the per-head gain rule from the spectra) against independent float64 computations."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seka_lightning

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("key_directions", REPO / "scripts" / "research" / "key_directions.py")
kd = importlib.util.module_from_spec(spec)
sys.modules["key_directions"] = kd
spec.loader.exec_module(kd)


def reference_phi(x: float, name: str) -> float:
    """SEKA's ``src/utils.py`` φ, one scalar at a time with the math module."""
    if name == "tanh":
        return math.tanh(x)
    if name == "elu":
        return x if x >= 0 else math.exp(x) - 1
    return math.exp(-(x**2) / 2)


# the domain where the reference's clamps (1e-4) leave φ invertible
DOMAINS = {
    "tanh": math.atanh(1 - 1e-4) - 1e-6,
    "elu": -math.log(1e-4) - 1e-6,  # the lower end: eˣ >= 1e-4
    "squared-exponential": math.sqrt(-2 * math.log(1e-4)) - 1e-6,
}


def domain_points(name: str) -> torch.Tensor:
    bound = DOMAINS[name]
    low, high = (-bound, 50.0) if name == "elu" else (-bound, bound)
    generator = torch.Generator().manual_seed(0)
    return low + (high - low) * torch.rand(4000, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("name", ["tanh", "elu", "squared-exponential"])
def test_phi_matches_the_reference_formula(name: str) -> None:
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    expected = torch.tensor([reference_phi(float(v), name) for v in x], dtype=torch.float64)
    torch.testing.assert_close(kd.phi(x, name), expected, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("name", ["tanh", "elu", "squared-exponential"])
def test_phi_inv_inverts_phi_on_its_domain(name: str) -> None:
    x = domain_points(name)
    back = kd.phi_inv(kd.phi(x, name), name, sign=torch.sign(x))
    # squared exponential: sqrt(-2 log y) loses digits where y is near 1 (x near 0): compare with an absolute bound
    atol = 1e-7 if name == "squared-exponential" else 1e-12
    torch.testing.assert_close(back, x, rtol=1e-10, atol=atol)


def test_phi_inv_clamps_outside_the_range_as_the_reference_does() -> None:
    y = torch.tensor([1.5, -3.0], dtype=torch.float64)
    assert kd.phi_inv(y, "tanh", sign=torch.ones(2)).tolist() == pytest.approx(
        [math.atanh(1 - 1e-4), -math.atanh(1 - 1e-4)], rel=1e-12
    )
    assert kd.phi_inv(torch.tensor([-2.0], dtype=torch.float64), "elu", sign=torch.ones(1)).item() == pytest.approx(
        math.log(1e-4), rel=1e-12
    )
    # above 1 the squared exponential has no preimage: it maps to 0, the preimage of 1
    sq = kd.phi_inv(torch.tensor([1.2, 1e-9], dtype=torch.float64), "squared-exponential", sign=-torch.ones(2))
    assert sq.tolist() == pytest.approx([0.0, -math.sqrt(-2 * math.log(1e-4))], rel=1e-12)


def test_unknown_phi_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown feature map 'relu'; choose from \['elu', 'squared-exponential'"):
        kd.phi(torch.zeros(1), "relu")


@pytest.mark.parametrize("name", ["tanh", "elu", "squared-exponential"])
def test_phi_edit_matches_a_per_row_float64_reference(name: str) -> None:
    generator = torch.Generator().manual_seed(1)
    keys = 0.8 * torch.randn(7, 2, 5, dtype=torch.float64, generator=generator)
    basis = torch.linalg.qr(torch.randn(2, 5, 5, dtype=torch.float64, generator=generator)).Q
    projector = basis[..., :2] @ basis[..., :2].transpose(-1, -2)
    gain = 0.3
    got = kd.phi_edit(keys, projector, gain, name)
    for m in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            f = [reference_phi(float(v), name) for v in keys[m, h]]
            edited = [f[e] + gain * sum(f[d] * float(projector[h, d, e]) for d in range(5)) for e in range(5)]
            for e, y in enumerate(edited):
                if name == "tanh":
                    want = math.atanh(min(max(y, -1 + 1e-4), 1 - 1e-4))
                elif name == "elu":
                    want = y if y >= 0 else math.log(max(1 + y, 1e-4))
                else:
                    want = math.copysign(math.sqrt(-2 * math.log(min(max(y, 1e-4), 1.0))), float(keys[m, h, e]))
                assert float(got[m, h, e]) == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_phi_edit_with_zero_gain_keeps_keys_inside_the_domain() -> None:
    keys = torch.linspace(-2, 2, 40, dtype=torch.float64).reshape(8, 1, 5)
    projector = torch.eye(5, dtype=torch.float64)[None]
    for name in ("tanh", "elu"):
        torch.testing.assert_close(kd.phi_edit(keys, projector, 0.0, name), keys, rtol=1e-12, atol=1e-12)


def test_spectral_head_weights_follow_the_stated_rule() -> None:
    generator = torch.Generator().manual_seed(2)
    s_pos = torch.rand(4, 3, 6, dtype=torch.float64, generator=generator).sort(-1, descending=True).values
    s_neg = torch.rand(4, 3, 6, dtype=torch.float64, generator=generator).sort(-1, descending=True).values
    layers = [2, 3]
    got = kd.spectral_head_weights(s_pos, s_neg, layers)
    delta = [
        [
            sum(abs(float(s_pos[i, h, j] - s_neg[i, h, j])) for j in range(6)) / float(s_pos[i, h].sum())
            for h in range(3)
        ]
        for i in range(4)
    ]
    mean = sum(delta[i][h] for i in layers for h in range(3)) / (len(layers) * 3)
    expected = torch.tensor([[d / mean for d in row] for row in delta], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)
    assert float(got[layers].mean()) == pytest.approx(1.0, rel=1e-13)  # the steered heads' mean gain is g


def test_grid_keys_group_seeds_and_negative_ratios() -> None:
    names = ["random_s0", kd.neg_name(-0.5), kd.neg_name(0.5), "seka_phi_tanh", "seka"]
    assert [kd.grid_key(n) for n in names] == ["random", "seka_neg", "seka_neg", "seka_phi_tanh", "seka"]
    assert kd.neg_name(-0.5) != kd.neg_name(0.5)


def test_grid_without_an_avenue_flag_names_the_flags() -> None:
    variants = {"key_scaling": torch.eye(2), "seka": torch.eye(2)}
    with pytest.raises(ValueError, match=r"unknown variants \['seka_chat'\].*need their flag: --phi"):
        kd.select_variants(variants, {"key_scaling": [1.0], "seka_chat": [8.0]})


def test_recorded_commit_is_the_provenance_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEKA_SOURCE_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    assert kd.git_commit() == "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.delenv("SEKA_SOURCE_COMMIT")
    package = Path(seka_lightning.__file__).parent  # git_state reads the checkout holding the package's sources
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    assert kd.git_commit() == head.stdout.strip()
