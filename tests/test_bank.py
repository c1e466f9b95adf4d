"""ProjectionBank formats: own safetensors (atomic), the reference .pt files, and clear errors for bad files."""

from __future__ import annotations

import re

import pytest
import torch

from seka_lightning import ProjectionBank
from seka_lightning.projections import top_rank


def projectors(
    layers: int = 2, heads: int = 2, d: int = 8, rank: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(layers, heads, d, d, generator=gen))
    return u, u[..., :rank] @ u[..., :rank].transpose(-1, -2)


def test_own_format_round_trip(tmp_path):
    u, pos = projectors()
    bank = ProjectionBank(
        layers=[3, 5],
        pos=pos,
        neg=pos.flip(0),
        u_pos=u,
        s_pos=torch.rand(2, 2, 8),
        metadata={"model_id": "m", "num_layers": 6},
    )
    path = bank.save(tmp_path / "bank.safetensors")
    loaded = ProjectionBank.load(path)
    assert loaded.layers == [3, 5] and loaded.metadata["model_id"] == "m" and loaded.metadata["num_layers"] == 6
    assert torch.equal(loaded.pos, pos) and torch.equal(loaded.neg, pos.flip(0)) and torch.equal(loaded.u_pos, u)
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"], "no temp file left behind"


def test_reference_pos_and_neg_files(tmp_path):
    _, pos = projectors()
    torch.save({"layers": [1, 2], "proj": pos}, tmp_path / "m_pos_proj.pt")
    torch.save({"layers": [1, 2], "proj": pos * 0.5}, tmp_path / "m_neg_proj.pt")
    bank = ProjectionBank.load(tmp_path / "m_pos_proj.pt", neg=tmp_path / "m_neg_proj.pt")
    assert bank.layers == [1, 2] and torch.equal(bank.pos, pos) and torch.equal(bank.neg, pos * 0.5)
    torch.save({"layers": [0, 2], "proj": pos}, tmp_path / "other_neg.pt")
    with pytest.raises(ValueError, match=r"covers layers \[0, 2\] but .* covers \[1, 2\]; pass a matching pair"):
        ProjectionBank.load(tmp_path / "m_pos_proj.pt", neg=tmp_path / "other_neg.pt")


def test_reference_svd_file_rebuilds_projectors_and_ignores_skipped_heads(tmp_path):
    u, _ = projectors(layers=1, heads=2)
    s = torch.tensor([[[4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.2, 0.05], [float("nan")] * 8]])
    torch.save({"layers": [7], "U_matrices": u, "singular_values": s}, tmp_path / "m_pos_svd.pt")
    bank = ProjectionBank.load(tmp_path / "m_pos_svd.pt", top_pct=0.8)
    k = int(top_rank(s[0, 0], 0.8))
    # float64 reference: cumsum / sum < 0.8 -> k = count + 1
    cum = s[0, 0].double().cumsum(0) / s[0, 0].double().sum()
    assert k == int((cum < 0.8).sum()) + 1 == 3
    torch.testing.assert_close(bank.pos[0, 0], u[0, 0, :, :k] @ u[0, 0, :, :k].T)
    assert torch.equal(bank.pos[0, 1], torch.zeros(8, 8))


def test_bad_files_get_clear_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=re.escape("junk.safetensors is corrupt or not a safetensors file")):
        ProjectionBank.load(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match=re.escape("junk.pt could not be read as a torch file")):
        ProjectionBank.load(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="a reference projection file needs 'proj'"):
        ProjectionBank.load(tmp_path / "wrong.pt")
    with pytest.raises(FileNotFoundError, match="build one with `seka fit`"):
        ProjectionBank.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=re.escape("unknown bank file type '.npy'")):
        (tmp_path / "x.npy").write_bytes(b"")
        ProjectionBank.load(tmp_path / "x.npy")


def test_truncated_and_nan_banks_are_rejected(tmp_path):
    _, pos = projectors()
    path = ProjectionBank(layers=[0, 1], pos=pos).save(tmp_path / "bank.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape("cut.safetensors is corrupt")):
        ProjectionBank.load(tmp_path / "cut.safetensors")
    bad = pos.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="bank tensor 'pos' holds NaN or inf"):
        ProjectionBank(layers=[0, 1], pos=bad)


def test_shape_validation():
    _, pos = projectors()
    with pytest.raises(ValueError, match="bank lists 3 layer ids but holds 2 layers"):
        ProjectionBank(layers=[0, 1, 2], pos=pos)
    with pytest.raises(ValueError, match="pos must be \\[n_layers, n_kv, d, d\\]"):
        ProjectionBank(layers=[0], pos=torch.zeros(1, 8, 8))
