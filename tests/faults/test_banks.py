"""Banks that must fail clearly, the bank + statistics pair under a kill, and the head filter."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch

from seka_lightning import ProjectionBank
from seka_lightning.bank import derive_bank, stats_path_for
from seka_lightning.files import file_sha256
from seka_lightning.projections import head_filter_values, projections_from_sums
from seka_lightning.stats import KeyStatistics, KeySums, atomic_save_safetensors


def random_sums(seed: int = 0, *, layers: int = 2, heads: int = 2, d: int = 4, rows: int = 40) -> tuple:
    """Sums of random keys, and the keys themselves (float64) for independent references."""
    gen = torch.Generator().manual_seed(seed)
    h, hp, hn = (torch.randn(layers, rows, heads, d, generator=gen, dtype=torch.float64) for _ in range(3))
    hp = h + 0.3 * hp  # the positive keys move a little, the negative ones a lot
    stats = KeyStatistics(layers, heads, d)
    stats.update(h, hp, hn)
    return stats.compute(), (h, hp, hn)


def bank_file(tmp_path, **tensors) -> str:
    base = {"pos": torch.eye(4).expand(1, 1, 4, 4).contiguous()}
    path = tmp_path / "bank.safetensors"
    atomic_save_safetensors({**base, **tensors}, path, metadata={"format": "seka-lightning-bank", "layers": [0]})
    return str(path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_and_bool_banks_are_refused(tmp_path, dtype):
    path = bank_file(tmp_path, pos=torch.ones(1, 1, 4, 4, dtype=dtype))
    with pytest.raises(ValueError) as err:
        ProjectionBank.load(path)
    assert str(err.value) == (
        f"{path}: 'pos' holds {dtype} values, expected floating point; the file is corrupt or not a bank: rebuild or "
        "re-export it"
    )


@pytest.mark.parametrize("name", ["pos", "neg", "u_pos", "s_pos", "diff"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_inf_anywhere_in_a_bank_is_refused(tmp_path, name, sign):
    shapes = {"pos": (1, 1, 4, 4), "neg": (1, 1, 4, 4), "u_pos": (1, 1, 4, 4), "s_pos": (1, 1, 4), "diff": (1, 1)}
    tensor = torch.zeros(shapes[name])
    tensor.view(-1)[0] = sign * math.inf
    path = bank_file(tmp_path, **{name: tensor})
    with pytest.raises(ValueError, match=re.escape(f"{path}: tensor {name!r} holds inf; the bank is corrupt")):
        ProjectionBank.load(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"proj": [[1.0, 0.0], [0.0, 1.0]], "layers": [0]}, "'proj' is a list, expected a floating-point tensor"),
        ({"proj": torch.zeros(2, 4, 4), "layers": ["a", "b"]}, "'layers' must be a list of integer layer ids, got"),
        ({"proj": torch.zeros(2, 4, 4)}, "has no 'layers' entry; a reference bank file lists the layer id"),
        ({"proj": torch.zeros(1, 4, 4, dtype=torch.int64), "layers": [0]}, "'proj' holds torch.int64 values"),
        ({"U_matrices": "u", "singular_values": torch.ones(1, 1, 4), "layers": [0]}, "'U_matrices' is a str"),
        ({"proj": torch.full((1, 4, 4), math.inf), "layers": [0]}, "'proj' holds inf"),
    ],
)
def test_malformed_reference_files_name_the_file_and_key(tmp_path, content, message):
    path = tmp_path / "ref_pos_proj.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}") + ".*" + re.escape(message)):
        ProjectionBank.load(path)


def test_a_bank_for_another_model_of_the_same_shape_warns_or_fails(caplog):
    bank = ProjectionBank(layers=[0], pos=torch.zeros(1, 2, 4, 4), metadata={"model_id": "org/model-a"})
    shape = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4}
    message = (
        "projection bank built for org/model-a is used with org/model-b: the shapes match, but its projectors "
        "describe the other model's keys; build a bank for org/model-b with `seka fit`"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        bank.check_compatible(**shape, model_id="org/model-b", strict=True)
    with caplog.at_level(logging.WARNING, logger="seka_lightning.bank"):
        bank.check_compatible(**shape, model_id="org/model-b")
    assert [r.getMessage() for r in caplog.records] == [message]
    # the same model under another name (a local copy, the embedded cache folder) is not another model
    bank.check_compatible(**shape, model_id="/models/model-a", strict=True)
    embedded = ProjectionBank(layers=[0], pos=torch.zeros(1, 2, 4, 4), metadata={"model_id": "embedded:smollm2-135m"})
    embedded.check_compatible(**shape, model_id="/cache/smollm2-135m-0123456789abcdef", strict=True)


def test_relative_head_filter_matches_float64_and_does_not_depend_on_n():
    sums, (h, hp, hn) = random_sums()
    # float64 reference from the keys: RMS ||h+ - h-|| over RMS ||h||, per layer and head
    expected = ((hp - hn).square().sum((1, 3)) / h.square().sum((1, 3))).sqrt()
    torch.testing.assert_close(head_filter_values(sums, head_filter="relative"), expected, rtol=1e-12, atol=0)
    expected_pos = ((hp - h).square().sum((1, 3)) / h.square().sum((1, 3))).sqrt()
    got_pos = head_filter_values(sums, head_filter="relative", positive_only=True)
    torch.testing.assert_close(got_pos, expected_pos, rtol=1e-12, atol=0)
    # four copies of the data: the relative value stays, the reference's sqrt(D) / N halves
    doubled = KeySums(**{name: 4 * value for name, value in sums.tensors().items()})
    torch.testing.assert_close(head_filter_values(doubled, head_filter="relative"), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        head_filter_values(doubled, head_filter="reference"),
        head_filter_values(sums, head_filter="reference") / 2,
        rtol=1e-12,
        atol=0,
    )


def test_reference_filter_keeps_the_old_numbers():
    sums, (h, hp, hn) = random_sums()
    diff = (hp - hn).square().sum((1, 3)).sqrt() / h.shape[1]
    threshold = float(diff.flatten().median())
    projections = projections_from_sums(sums, top_pct=0.7, min_diff=threshold, head_filter="reference")
    assert torch.equal(projections.kept, diff >= threshold)
    torch.testing.assert_close(projections.diff, diff.float())


@pytest.mark.parametrize(
    ("head_filter", "positive_only"), [("relative", False), ("reference", False), ("relative", True)]
)
def test_a_min_diff_that_keeps_no_head_names_the_largest_value(head_filter, positive_only):
    sums, _ = random_sums()
    largest = float(head_filter_values(sums, head_filter=head_filter, positive_only=positive_only).max())
    with pytest.raises(ValueError) as err:
        ProjectionBank.from_statistics(
            sums, layers=[0, 1], min_diff=5.0, head_filter=head_filter, positive_only=positive_only
        )
    message = str(err.value)
    assert message.startswith(
        f"min_diff=5.0 keeps none of the 4 heads: the largest {head_filter!r} head-filter value is {largest:.6g}; "
        "set min_diff to at most "
    )
    assert message.endswith(" (min_diff=0 keeps every head)")
    suggested = float(message.split("at most ")[1].split(" ")[0])
    assert 0.99 * largest <= suggested <= largest, "the largest value rounded down to 3 significant digits"
    bank = ProjectionBank.from_statistics(
        sums, layers=[0, 1], min_diff=suggested, head_filter=head_filter, positive_only=positive_only
    )
    assert bank.metadata["heads_kept"] >= 1 and bank.metadata["head_filter"] == head_filter


def test_unknown_head_filter_is_refused():
    sums, _ = random_sums()
    with pytest.raises(ValueError, match=re.escape("head_filter must be one of ('relative', 'reference'), got 'rms'")):
        ProjectionBank.from_statistics(sums, layers=[0, 1], head_filter="rms")


def write_pair(path, seed: int) -> KeySums:
    sums, _ = random_sums(seed)
    bank = ProjectionBank.from_statistics(sums, layers=[0, 1], min_diff=0.0, metadata={"model_id": "m"})
    bank.save_with_statistics(path, sums, statistics_metadata={"layers": [0, 1], "head_dim": 4})
    return sums


def test_the_pair_records_the_statistics_digest(tmp_path):
    path = tmp_path / "bank.safetensors"
    write_pair(path, seed=0)
    loaded = ProjectionBank.load(path)
    assert loaded.metadata["statistics_sha256"] == file_sha256(stats_path_for(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors", "bank.stats.safetensors"]


def test_a_kill_between_the_two_writes_is_detected_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "bank.safetensors"
    write_pair(path, seed=0)
    old_bank = path.read_bytes()

    def killed(self, target):
        raise KeyboardInterrupt("killed between the statistics and the bank")

    monkeypatch.setattr(ProjectionBank, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        write_pair(path, seed=1)
    monkeypatch.undo()
    assert path.read_bytes() == old_bank, "the old bank is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors", "bank.stats.safetensors"]
    stats = stats_path_for(path)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{path} and {stats} are not one pair: the bank was derived from other statistics (a build was "
            f"interrupted between writing the two, or one was replaced); re-derive the bank with `seka derive --stats "
            f"{stats} --output {path} --overwrite`"
        ),
    ):
        ProjectionBank.load(path)
    # the fix the error names works: the new statistics survived, the bank is derived from them again
    derive_bank(stats=str(stats), output=str(path), min_diff=0.0, overwrite=True)
    assert ProjectionBank.load(path).metadata["statistics_sha256"] == file_sha256(stats)


def test_a_failed_statistics_write_keeps_the_old_pair(tmp_path, monkeypatch):
    path = tmp_path / "bank.safetensors"
    write_pair(path, seed=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing(tensors, target, *, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr("seka_lightning.stats.save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        write_pair(path, seed=1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    ProjectionBank.load(path)
