"""KeyStatistics: float64 sums of SPEC §3, and NaN/inf keys caught when the sums are read (not per batch)."""

from __future__ import annotations

import pytest
import torch

from seka_lightning import stats as stats_module
from seka_lightning.stats import KeyStatistics, KeySums

L, M, H, D = 2, 5, 3, 4


def _keys(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(L, M, H, D, generator=generator, dtype=torch.float32) for _ in range(3)]


def assert_sums_equal_a_float64_reference(sums: KeySums, batches: list[list[torch.Tensor]]) -> None:
    h, hp, hn = (torch.cat([b[i] for b in batches], dim=1).cpu().double() for i in range(3))
    assert sums.count.item() == 2 * M
    for got, (x, y) in ((sums.a0, (h, h)), (sums.a_pos, (h, hp)), (sums.a_neg, (h, hn))):
        reference = torch.stack(
            [torch.stack([x[layer, :, head].T @ y[layer, :, head] for head in range(H)]) for layer in range(L)]
        )
        torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sums.d_pos_neg, (hp - hn).square().sum(dim=(1, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sums.d_pos_neutral, (hp - h).square().sum(dim=(1, 3)), rtol=1e-12, atol=1e-12)


def test_sums_equal_a_float64_reference():
    stats = KeyStatistics(L, H, D)
    batches = [_keys(0), _keys(1)]
    for batch in batches:
        stats.update(*batch)
    assert_sums_equal_a_float64_reference(stats.compute(), batches)


def test_devices_without_float64_are_known():
    assert not stats_module.supports_float64(torch.device("mps"))
    assert stats_module.supports_float64(torch.device("cpu")) and stats_module.supports_float64(torch.device("cuda"))


def test_sums_stay_on_the_cpu_for_a_device_without_float64(monkeypatch):
    """Simulates MPS with the meta device: moving the module there leaves the float64 sums on the CPU."""
    monkeypatch.setattr(stats_module, "supports_float64", lambda device: device.type != "meta")
    stats = KeyStatistics(L, H, D).to("meta")
    assert stats.device.type == "meta"
    assert all(stats.metric_state[name].device.type == "cpu" for name in ("count", "a0", "a_pos", "d_pos_neg"))
    batches = [_keys(0), _keys(1)]
    for batch in batches:
        stats.update(*batch)
    assert_sums_equal_a_float64_reference(stats.compute(), batches)
    stats.reset()
    assert stats.a0.device.type == "cpu" and stats.count.item() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_keys_are_added_on_the_cpu_when_the_device_lacks_float64(monkeypatch):
    """The MPS path on a real accelerator: CUDA keys (float32) go to CPU float64 sums."""
    monkeypatch.setattr(stats_module, "supports_float64", lambda device: device.type != "cuda")
    stats = KeyStatistics(L, H, D).to("cuda")
    batches = [[key.cuda() for key in _keys(0)], [key.cuda() for key in _keys(1)]]
    for batch in batches:
        stats.update(*batch)
    sums = stats.compute()
    assert sums.a0.device.type == "cpu"
    assert_sums_equal_a_float64_reference(sums, batches)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["neutral", "positive", "negative"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("zero_neutral_row", [False, True])
def test_any_non_finite_key_fails_compute(which, bad, zero_neutral_row):
    """update() does not look at the values (that would wait for the GPU every batch); every NaN or inf entry of any
    text still leaves a non-finite sum, also when it meets zeros of the neutral key, and later finite batches do not
    wash it out."""
    stats = KeyStatistics(L, H, D)
    keys = _keys(2)
    if zero_neutral_row:
        keys[0][1, 3, 2] = 0.0
    keys[which][1, 3, 2, 1] = bad
    stats.update(*keys)
    stats.update(*_keys(3))
    with pytest.raises(ValueError, match=r"non-finite keys \(NaN or inf\) reached the statistics"):
        stats.compute()


def test_opposite_infinities_do_not_cancel():
    stats = KeyStatistics(L, H, D)
    keys = _keys(4)
    keys[1][0, 0, 0, 0] = float("inf")
    keys[2][0, 0, 0, 0] = float("inf")  # h+ - h- is NaN there; the cross sums are inf
    stats.update(*keys)
    keys = _keys(5)
    keys[1][0, 0, 0, 0] = float("-inf")
    stats.update(*keys)
    with pytest.raises(ValueError, match="non-finite keys"):
        stats.compute()


def test_loading_statistics_with_inf_is_refused(tmp_path):
    stats = KeyStatistics(L, H, D)
    stats.update(*_keys(6))
    sums = stats.compute()
    sums.a_pos[0, 0, 0, 0] = float("inf")  # NaN is refused by the file reader already; inf must be too
    path = tmp_path / "bank.stats.safetensors"
    sums.save(path)
    with pytest.raises(ValueError, match="bank.stats.safetensors: the statistics hold NaN or inf; the file is corrupt"):
        KeySums.load(path)


def test_statistics_are_tagged_and_recognised_also_without_the_tag(tmp_path):
    from seka_lightning.files import STATISTICS, file_kind
    from seka_lightning.stats import atomic_save_safetensors, load_safetensors

    stats = KeyStatistics(L, H, D)
    stats.update(*_keys(7))
    sums = stats.compute()
    tagged = tmp_path / "new.stats.safetensors"
    sums.save(tagged, metadata={"layers": [0, 1]})
    assert load_safetensors(tagged)[1] == {"layers": [0, 1], "format": "seka-lightning-statistics"}
    loaded, metadata = KeySums.load(tagged)
    assert metadata == {"layers": [0, 1]} and torch.equal(loaded.a0, sums.a0)
    untagged = tmp_path / "old.stats.safetensors"  # written before the tag existed
    atomic_save_safetensors(sums.tensors(), untagged, metadata={"layers": [0, 1]})
    assert file_kind(tagged) == file_kind(untagged) == STATISTICS
