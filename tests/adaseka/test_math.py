"""AdaSEKA routing math against a direct float64 computation of SPEC §5."""

from __future__ import annotations

import json
import math

import pytest
import torch

from seka_lightning.adaseka.experts import (
    ExpertSet,
    LayerExperts,
    coefficient_entropy,
    kv_head_queries,
    read_expert_config,
)

from .conftest import random_expert


def spec_formula(q_heads: torch.Tensor, u: torch.Tensor, s: torch.Tensor, top_k: int, num_kv: int):
    """SPEC §5 written out with Python loops in float64: coefficients [B, H, M] and P [B, H, d, d]."""
    batch, num_q, d = q_heads.shape
    group = num_q // num_kv
    num_experts = u.shape[0]
    coefficients = torch.zeros(batch, num_kv, num_experts, dtype=torch.float64)
    projection = torch.zeros(batch, num_kv, d, d, dtype=torch.float64)
    for b in range(batch):
        for h in range(num_kv):
            q = q_heads[b, h * group : (h + 1) * group].double().mean(0)
            q = q / q.norm()
            valid = [m for m in range(num_experts) if not torch.isnan(u[m, h]).any()]
            raw = {m: sum(float(q @ u[m, h, :, j].double()) * float(s[m, h, j]) for j in range(top_k)) for m in valid}
            scale = max(abs(v) for v in raw.values())
            for m in valid:
                coefficients[b, h, m] = raw[m] / scale
                uk = u[m, h, :, :top_k].double()
                projection[b, h] += coefficients[b, h, m] * (uk @ uk.T)
    return coefficients, projection


def test_coefficients_and_projection_match_float64_spec(expert_banks):
    experts = ExpertSet.from_banks(expert_banks)
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))
    for layer in range(3):
        u, s = experts.factors[layer]
        layer_experts = experts.layer(layer, top_k=5)
        c = layer_experts.coefficients(kv_head_queries(q, 2))
        expected_c, expected_p = spec_formula(q, u, s, 5, 2)
        torch.testing.assert_close(c.double(), expected_c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer_experts.projection(c).double(), expected_p, rtol=1e-5, atol=1e-5)
        assert (c.abs().amax(-1) - 1).abs().max() < 1e-6  # normalised by the largest |c_m|


def test_nan_experts_are_left_out_without_changing_the_others(expert_banks):
    with_nan = ExpertSet.from_banks(expert_banks).layer(0, top_k=5)  # alpha is NaN on head 1 of layer 0
    without = ExpertSet.from_banks({k: v for k, v in expert_banks.items() if k != "alpha"}).layer(0, top_k=5)
    q = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(1))
    c_all, c_rest = with_nan.coefficients(q), without.coefficients(q)
    assert (c_all[:, 1, 0] == 0).all() and (c_all[:, 0, 0] != 0).all()
    torch.testing.assert_close(c_all[:, 1, 1:], c_rest[:, 1])
    torch.testing.assert_close(with_nan.projection(c_all)[:, 1], without.projection(c_rest)[:, 1])


def test_uniform_fallback_when_not_finite(experts):
    c = experts.layer(1, top_k=5).coefficients(torch.zeros(1, 2, 16))  # a zero query: 0/0
    torch.testing.assert_close(c, torch.full((1, 2, 3), 1 / 3))


def test_reference_coefficients_keep_epsilons_and_uniform_fallback_on_nan_heads(experts):
    layer = experts.layer(0, top_k=5)
    q = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(2))
    c = layer.coefficients(q, reference=True)
    torch.testing.assert_close(c[:, 1], torch.full((2, 3), 1 / 3))  # head 1: alpha is NaN -> -inf -> NaN -> uniform
    q_hat = q / (q.norm(dim=-1, keepdim=True) + 1e-8)
    raw = torch.einsum("bhd,mhd->bhm", q_hat, layer.weighted)
    torch.testing.assert_close(c[:, 0], raw[:, 0] / (raw[:, 0].abs().amax(-1, keepdim=True) + 1e-8))


def test_top_k_is_clamped_and_validated(experts):
    u, s = experts.factors[1]
    assert LayerExperts.from_factors(u, s, top_k=99).bases.shape == (2, 16, 3, 16)  # [H, d, M, k = d]
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        LayerExperts.from_factors(u, s, top_k=0)


def test_edit_is_the_keys_times_the_mixed_projector(experts):
    """``edit`` (two skinny matmuls through the experts' bases) equals ``k @ P`` with ``P`` written out in float64
    from the truncated singular vectors, per row with its own coefficients; a left-out expert adds nothing."""
    u, s = (t.double() for t in experts.factors[1])
    layer = LayerExperts.from_factors(u, s, top_k=3)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(5, 2, 16, dtype=torch.float64, generator=generator)
    weights = torch.randn(5, 2, 3, dtype=torch.float64, generator=generator)
    valid = torch.isfinite(u).flatten(-2).all(-1)  # [M, H]
    u_k = torch.where(valid[..., None, None], u[..., :3], 0.0)  # [M, H, d, 3]
    expected = torch.stack(
        [
            torch.stack(
                [keys[r, h] @ sum(weights[r, h, m] * u_k[m, h] @ u_k[m, h].T for m in range(3)) for h in range(2)]
            )
            for r in range(5)
        ]
    )
    torch.testing.assert_close(layer.edit(keys, weights), expected, rtol=1e-12, atol=1e-12)
    per_row = torch.stack([keys[r, :, None] @ layer.projection(weights[r : r + 1])[0] for r in range(5)])[:, :, 0]
    torch.testing.assert_close(layer.edit(keys, weights), per_row, rtol=1e-12, atol=1e-12)


def test_gqa_query_mean_groups_consecutive_heads():
    q = torch.arange(4.0)[None, :, None].expand(1, 4, 3)  # heads 0..3
    torch.testing.assert_close(kv_head_queries(q, 2)[0, :, 0], torch.tensor([0.5, 2.5]))


def test_coefficient_entropy_bounds():
    assert coefficient_entropy(torch.tensor([0.0, -1.0, 0.0])).item() == 0.0
    assert math.isclose(coefficient_entropy(torch.tensor([0.5, -0.5, 0.5])).item(), math.log(3), rel_tol=1e-6)


def test_expert_config_json_and_yaml(tmp_path, expert_banks):
    for name, bank in expert_banks.items():
        bank.save(tmp_path / f"{name}.safetensors")
    (tmp_path / "adaseka.json").write_text(json.dumps({n: f"{n}.safetensors" for n in expert_banks}))
    (tmp_path / "experts.yaml").write_text("experts:\n  gamma: gamma.safetensors\n  alpha: alpha.safetensors\n")
    from_json = ExpertSet.load(str(tmp_path / "adaseka.json"))
    assert from_json.names == ("alpha", "beta", "gamma")
    u = from_json.factors[0][0]
    assert torch.isnan(u[0, 1]).all() and torch.equal(u[2], expert_banks["gamma"].u_pos[0])
    assert read_expert_config(tmp_path / "experts.yaml") == {
        "gamma": str(tmp_path / "gamma.safetensors"),
        "alpha": str(tmp_path / "alpha.safetensors"),
    }
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"must hold a non-empty mapping \{expert name: bank path\}"):
        read_expert_config(tmp_path / "bad.json")


def test_experts_must_share_layers():
    with pytest.raises(ValueError, match="build all experts for the same model and layers"):
        ExpertSet.from_banks({"a": random_expert(0), "b": random_expert(1, layers=2)})


def test_projector_only_banks_are_decomposed():
    bank = random_expert(4)
    bank.u_pos = bank.s_pos = None
    bank.pos[1, 0] = 0.0
    u = ExpertSet.from_banks({"x": bank}).factors[1][0]
    assert torch.isnan(u[0, 0]).all()
    uk = u[0, 1, :, :4]
    torch.testing.assert_close(uk @ uk.T, bank.pos[1, 1], atol=1e-5, rtol=1e-5)


def test_expert_banks_store_canonical_signs_so_routing_does_not_depend_on_the_svd():
    """An SVD leaves each singular vector's sign arbitrary (LAPACK and cuSOLVER differ); AdaSEKA routes linearly in
    them. Expert banks store each vector with its largest-magnitude entry positive: any sign pattern of the same vectors
    maps to the same U, hence the same coefficients; the projectors do not change. SEKA banks keep the SVD's own U."""
    from tests.test_bank_pretrained import random_sums

    from seka_lightning.bank import ProjectionBank
    from seka_lightning.projections import canonical_signs

    sums = random_sums()
    expert = ProjectionBank.from_statistics(sums, layers=[0, 1, 2], top_pct=0.8, min_diff=0.0, positive_only=True)
    assert expert.metadata["u_signs"].startswith("canonical")
    u = expert.u_pos.double()
    peak = u.abs().argmax(dim=-2, keepdim=True)
    assert (torch.gather(u, -2, peak) > 0).all()
    raw = torch.linalg.svd((sums.a_pos / sums.count).float(), full_matrices=False)[0]
    assert torch.equal(canonical_signs(raw), expert.u_pos)
    seka = ProjectionBank.from_statistics(sums, layers=[0, 1, 2], top_pct=0.8, min_diff=0.0)
    assert torch.equal(seka.u_pos, raw) and "u_signs" not in seka.metadata
    flips = torch.where(
        torch.rand((*raw.shape[:-2], 1, raw.shape[-1]), generator=torch.Generator().manual_seed(0)) < 0.5, -1.0, 1.0
    )
    assert not torch.equal(raw * flips, raw)
    assert torch.equal(canonical_signs(raw * flips), canonical_signs(raw))  # the sign pattern is gone
    torch.testing.assert_close(expert.pos, seka.pos, rtol=0, atol=0)  # projectors unchanged

    def banks(u_factor):
        bank = ProjectionBank(
            layers=[0, 1, 2],
            pos=expert.pos,
            u_pos=u_factor,
            s_pos=expert.s_pos,
            metadata={"positive_only": True, "num_layers": 3},
        )
        return ExpertSet.from_banks({"a": bank, "b": random_expert(5, d=8)})

    q = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    layer = lambda experts: experts.layer(0, top_k=3)  # noqa: E731
    raw_flipped = banks(raw * flips)
    canonical = banks(canonical_signs(raw * flips))
    assert not torch.allclose(layer(raw_flipped).coefficients(q), layer(banks(raw)).coefficients(q))  # raw U: varies
    torch.testing.assert_close(
        layer(canonical).coefficients(q), layer(banks(expert.u_pos)).coefficients(q), rtol=0, atol=0
    )
