"""The decode-step profiler on the tiny shape (CPU): the file it writes and the arithmetic of its ratios. No timing
is asserted."""

from __future__ import annotations

import json

import pytest
from bench.decode_profile import kind_of, main, parse_inductor


def test_decode_profile_writes_its_ratios(tmp_path) -> None:
    result = main([
        "--out", str(tmp_path), "--shape", "tiny", "--device", "cpu", "--backend", "eager", "--mode", "default",
        "--prompt-tokens", "48", "--new-tokens", "4", "--repeats", "1",
        "--inductor", "coordinate_descent_tuning=true",
    ])  # fmt: skip
    written = json.loads((tmp_path / "decode_profile.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["settings"]["inductor"] == {"coordinate_descent_tuning": True}
    assert written["decode_step_over_floor"] == pytest.approx(written["decode_step_s"] / written["decode_step_floor_s"])
    assert written["decode_step_s"] == pytest.approx(
        (written["call_s_median"] - written["prompt_only_call_s_median"]) / 3
    )
    shares = [entry["share"] for entry in written["kernels_by_kind"].values()]
    assert sum(shares) == pytest.approx(1.0)
    assert not list(tmp_path.glob("*.tmp"))


def test_kinds_and_inductor_settings() -> None:
    assert kind_of("nvjet_tst_64x8_64x16_4x1_v_bz_TNT") == "matmul"
    assert kind_of("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "fused"
    assert kind_of("void at::native::vectorized_elementwise_kernel") == "other"
    assert parse_inductor(["max_autotune=true", "max_autotune_gemm_backends=TRITON"]) == {
        "max_autotune": True,
        "max_autotune_gemm_backends": "TRITON",
    }
    with pytest.raises(ValueError, match="has no field 'no_such_field'"):
        parse_inductor(["no_such_field=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_inductor(["max_autotune"])
