"""The decode-step profiler on the tiny shape (CPU): the file it writes, its floor against the benchmark's floor
arithmetic, that its compile settings do not outlive the run, and its refusals. No timing is asserted."""

from __future__ import annotations

import json

import pytest
import torch
import torch._inductor.config as inductor_config
from bench.decode_profile import kind_of, main, parse_inductor
from bench.generation import Ceilings, ModelCost, generation_floor
from bench.shapes import get_shape, random_model


def test_decode_profile_writes_its_ratios_and_restores_the_compile_settings(tmp_path) -> None:
    before = inductor_config.coordinate_descent_tuning
    result = main([
        "--out", str(tmp_path), "--shape", "tiny", "--device", "cpu", "--backend", "eager", "--mode", "default",
        "--prompt-tokens", "48", "--new-tokens", "4", "--repeats", "2",
        "--inductor", f"coordinate_descent_tuning={json.dumps(not before)}",
    ])  # fmt: skip
    assert inductor_config.coordinate_descent_tuning == before
    written = json.loads((tmp_path / "decode_profile.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["settings"]["inductor"] == {"coordinate_descent_tuning": not before}
    # the floor of the 3 decode steps, recomputed from the copy and matmul rates the run measured
    shape = get_shape("tiny")
    cost = ModelCost.of(random_model(shape, device=torch.device("cpu"), dtype=torch.float32), shape)
    rates = {key: written[key] for key in ("copy_bytes_per_s", "matmul_flops_per_s")}
    ceilings = Ceilings(**rates, copy_bytes=1, matmul_size=1)
    floor = generation_floor(cost, ceilings, batch=1, prompt_tokens=48, new_tokens=4)
    assert floor["decode_s"] > 0
    assert written["decode_step_floor_s"] == pytest.approx(floor["decode_s"] / 3, rel=1e-9)
    assert written["weight_bytes_per_step"] == cost.weight_bytes
    assert written["decode_step_over_floor"] == pytest.approx(written["decode_step_s"] / written["decode_step_floor_s"])
    shares = [entry["share"] for entry in written["kernels_by_kind"].values()]
    assert sum(shares) == pytest.approx(1.0)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--new-tokens", "1"], "--new-tokens must be >= 2"),
        (["--inductor", "no_such_field=1"], "torch._inductor.config has no field 'no_such_field'"),
    ],
)
def test_bad_options_are_refused(argv, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_kinds_and_inductor_settings() -> None:
    assert kind_of("nvjet_tst_64x8_64x16_4x1_v_bz_TNT") == "matmul"
    assert kind_of("fmha_cutlassF_f32_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)") == "attention"
    assert kind_of("aten::bmm") == "matmul"
    assert kind_of("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "fused"
    assert kind_of("void at::native::vectorized_elementwise_kernel") == "other"
    assert parse_inductor(["max_autotune=true", "max_autotune_gemm_backends=TRITON"]) == {
        "max_autotune": True,
        "max_autotune_gemm_backends": "TRITON",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_inductor(["max_autotune"])
