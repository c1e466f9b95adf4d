"""The speed and memory benchmarks on a tiny shape (CPU): the files they write, the numbers' definitions, the
prompts, the floor arithmetic and the naive builder's agreement with ``seka fit``'s streaming one. No timing
is asserted: CPU timings on shared cores mean nothing."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from bench.__main__ import main
from bench.building import (
    BuildCost,
    BuildingSettings,
    ddp_records,
    fit_command,
    naive_build,
    run_building,
    steady_rate,
    streaming_build,
    sums_difference,
    utilisation,
)
from bench.generation import (
    RECORD_KEYS,
    Ceilings,
    GenerationSettings,
    ModelCost,
    generation_floor,
    pasta_heads,
    random_bank,
    random_prompts,
    static_compiled_decoding,
)
from bench.report import paired_ratio
from bench.shapes import get_shape, offline_tokenizer, random_model

from seka_lightning.data.triplets import iter_triplets, read_pairs
from seka_lightning.families import resolve_layout
from seka_lightning.methods import HighlightMethod, SekaMethod

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def generation_run(tmp_path_factory: pytest.TempPathFactory, cpu_generation_args: list[str]) -> Path:
    out = tmp_path_factory.mktemp("generation")
    main(
        [
            *cpu_generation_args,  # the fast path included, compiled with dynamo's eager backend
            "--batch-sizes", "1", "2",
            "--new-tokens", "3",
            "--prompt-tokens", "128",
            "--repeats", "1",
            "--warmup", "0",
            "--fast-methods", "none", "seka",
            "--fast-repeats", "1",
            "--fast-warmup", "0",
            "--out", str(out),
        ]
    )  # fmt: skip
    return out


def test_generation_writes_records_with_the_documented_keys(generation_run: Path) -> None:
    records = json.loads((generation_run / "generation.json").read_text())
    details = json.loads((generation_run / "generation.details.json").read_text())
    methods = details["settings"]["methods"]
    for record in records:
        assert set(RECORD_KEYS) <= set(record)
        assert record["status"] in ("ok", "skipped", "failed")
        if record["status"] != "ok":
            assert record["reason"]
    eager = {(r["method"], r["batch_size"]) for r in records if r["path"] == "eager"}
    assert eager == {(m, b) for m in methods for b in (1, 2)}  # every method has a row, run or not
    for path in ("static_compile", "static_loop"):
        fast = {(r["method"], r["batch_size"]) for r in records if r["path"] == path}
        assert fast == {(m, b) for m in ("none", "seka") for b in (1, 2)}, path
    for key in ("torch", "transformers", "gpu_name", "device"):
        assert key in details["environment"]
    assert details["environment"]["device"] == "cpu"
    assert set(details["compile_safety"]) == {
        f"{m} ({p})" for m in ("none", "seka") for p in ("static_compile", "static_loop")
    }
    assert (generation_run / "generation.md").read_text().count("\n| none |") == 6


def test_generation_ratios_are_against_none_of_the_same_path_and_batch(generation_run: Path) -> None:
    records = json.loads((generation_run / "generation.json").read_text())
    ok = [r for r in records if r["status"] == "ok"]
    reference = {(r["path"], r["batch_size"]): r for r in ok if r["method"] == "none"}
    assert len(reference) == 6  # three paths x two batch sizes
    for record in reference.values():
        assert record["ratio_latency"] == 1.0
        assert record["peak_mem_bytes"] is None and record["ratio_mem"] is None  # no allocator counter on CPU
    assert {r["method"] for r in ok} >= {"none", "seka"}
    for record in ok:
        none = reference[(record["path"], record["batch_size"])]
        assert record["ratio_latency"] == pytest.approx(record["latency_s_median"] / none["latency_s_median"])


def test_paired_ratio_is_the_median_of_per_round_ratios(generation_run: Path) -> None:
    assert paired_ratio([2.0, 3.3, 1.0], [2.0, 3.0, 0.5]) == pytest.approx(1.1)  # rounds: 1.0, 1.1, 2.0
    assert paired_ratio([1.0, 2.0], [1.0]) is None and paired_ratio([], []) is None
    assert paired_ratio([1.0], [0.0]) is None
    details = json.loads((generation_run / "generation.details.json").read_text())
    ok = [r for r in details["records"] if r["status"] == "ok"]
    none = {(r["path"], r["batch_size"]): r["latencies_s"] for r in ok if r["method"] == "none"}
    for record in ok:
        rounds = [
            m / n for m, n in zip(record["latencies_s"], none[(record["path"], record["batch_size"])], strict=True)
        ]
        assert record["ratio_latency_paired"] == pytest.approx(statistics.median(rounds))


def test_generation_latency_is_per_sample_and_floor_ratio_consistent(generation_run: Path) -> None:
    details = json.loads((generation_run / "generation.details.json").read_text())
    for record in details["records"]:
        if record["status"] != "ok":
            continue
        batch = record["batch_size"]
        assert record["latency_s_median"] == pytest.approx(record["batch_latency_s_median"] / batch)
        floor = details["floors"][str(record["prompt_tokens"])][str(batch)]["per_sample_s"]
        assert record["latency_over_floor"] == pytest.approx(record["latency_s_median"] / floor)


def _runs(mask: torch.Tensor) -> int:
    """Number of maximal runs of True in a 1-D bool tensor."""
    padded = torch.cat([torch.zeros(1, dtype=torch.bool), mask])
    return int((padded[1:] & ~padded[:-1]).sum())


def test_random_prompts_mark_whole_documents_and_never_padding() -> None:
    enc = random_prompts(4, 1000, documents=30, highlighted=20, vocab_size=500, seed=1)
    ids, attention, highlight = enc["input_ids"], enc["attention_mask"], enc["highlight_mask"]
    assert ids.shape == attention.shape == highlight.shape == (4, 1000)
    assert attention[0].all()  # the longest row fills the width
    for row in range(4):
        real = attention[row].bool()
        assert _runs(highlight[row]) == 20
        assert not highlight[row][~real].any()
        assert not real[: int((~real).sum())].any()  # left padding
        assert 950 <= int(real.sum()) <= 1000
        assert int(ids[row][real].min()) >= 3 and int(ids[row][real].max()) < 500
        assert int(highlight[row].sum()) >= int(real.sum()) * 20 // 30 - 60  # 20 of 30 equal documents
    again = random_prompts(4, 1000, documents=30, highlighted=20, vocab_size=500, seed=1)
    assert all(torch.equal(enc[k], again[k]) for k in enc)  # every method sees the same prompts


def test_generation_floor_matches_a_hand_count() -> None:
    cost = ModelCost(
        matmul_params=100, head_params=10, weight_bytes=1000, kv_bytes_per_token=4, num_layers=1, num_heads=2,
        head_dim=3,
    )  # fmt: skip
    ceilings = Ceilings(copy_bytes_per_s=1000.0, matmul_flops_per_s=1e5, copy_bytes=0, matmul_size=0)
    floor = generation_floor(cost, ceilings, batch=2, prompt_tokens=5, new_tokens=3)
    # prefill: 2*2*5*100 + 2*2*10 + 2*2*(1*2*3)*25 = 2000 + 40 + 600 FLOPs -> 0.0264 s; bytes 1000 + 2*5*4 -> 1.04 s
    assert floor["prefill_s"] == pytest.approx(1.04)
    # decode at contexts 6 and 7: bytes 1000 + 2*c*4 (1.048, 1.056 s) dominate FLOPs 2*2*110 + 4*2*6*c (~0.01 s)
    assert floor["decode_s"] == pytest.approx(1.048 + 1.056)
    assert floor["per_sample_s"] == pytest.approx((1.04 + 1.048 + 1.056) / 2)


def test_model_cost_counts_the_qwen3_weights() -> None:
    shape = get_shape("tiny")
    model = random_model(shape, device=CPU, dtype=torch.float32)
    cost = ModelCost.of(model, shape)
    h, q, kv, i = (
        shape.hidden_size,
        shape.num_heads * shape.head_dim,
        shape.num_kv_heads * shape.head_dim,
        shape.intermediate_size,
    )
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    assert cost.matmul_params == shape.num_layers * per_layer
    assert cost.head_params == shape.vocab_size * h
    norms = shape.num_layers * (2 * h + 2 * shape.head_dim) + h
    assert cost.weight_bytes == 4 * (shape.num_layers * per_layer + shape.vocab_size * h + norms)
    assert cost.kv_bytes_per_token == 2 * shape.num_layers * kv * 4


def test_random_bank_has_projectors_of_the_requested_rank() -> None:
    shape = get_shape("tiny")
    bank = random_bank(shape, rank=4, seed=0)
    assert bank.pos.shape == (shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.head_dim)
    eye = torch.eye(shape.head_dim)
    for pos, neg in zip(bank.pos.flatten(0, 1), bank.neg.flatten(0, 1), strict=True):
        assert torch.allclose(pos @ pos, pos, atol=1e-5) and torch.allclose(neg @ neg, neg, atol=1e-5)
        assert float(torch.trace(pos)) == pytest.approx(4, abs=1e-4)
        assert float(torch.trace(neg)) == pytest.approx(shape.head_dim - 4, abs=1e-4)
        assert not torch.allclose(pos + neg, eye)  # P- comes from its own directions
    expert = random_bank(shape, rank=4, seed=1, positive_only=True)
    assert expert.neg is None and expert.u_pos is not None and expert.s_pos is not None


def test_pasta_heads_are_distinct_pairs_inside_the_model() -> None:
    shape = get_shape("qwen3-8b")
    heads = pasta_heads(shape, count=16, seed=0)
    pairs = [(layer, head) for layer, hs in heads.items() for head in hs]
    assert len(pairs) == len(set(pairs)) == 16
    assert all(0 <= layer < shape.num_layers and 0 <= head < shape.num_heads for layer, head in pairs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": ["seka"]}, "methods must include 'none'"),
        ({"methods": ["none", "nope"]}, r"methods \['nope'\] are unknown"),
        ({"fast_methods": ["seka"]}, "fast_methods must include 'none'"),
        ({"highlighted": 31}, "highlighted=31 exceeds documents=30"),
        ({"shape": "qwen9"}, "shape must be one of"),
    ],
)
def test_generation_settings_name_the_problem(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationSettings(**change)


def test_building_settings_need_two_increasing_sizes() -> None:
    with pytest.raises(ValueError, match="sizes must be two increasing dataset sizes"):
        BuildingSettings(sizes=[64, 32])


def _tiny_builder_inputs(qa_file: Path, dtype: torch.dtype):
    """12 triplets of ``qa_file``, a tokenizer trained on their texts, and a tiny random model with its layout."""
    shape = get_shape("tiny")
    triplets = list(iter_triplets(read_pairs(qa_file)))[:12]
    tokenizer = offline_tokenizer([t for tr in triplets for t in tr.texts()], vocab_size=shape.vocab_size)
    model = random_model(shape, device=CPU, dtype=dtype)
    return triplets, tokenizer, model, resolve_layout(model)


def test_naive_builder_gives_the_streaming_sums(qa_file: Path) -> None:
    triplets, tokenizer, model, layout = _tiny_builder_inputs(qa_file, torch.float32)
    streamed = streaming_build(model, tokenizer, layout, triplets, batch_size=5, device=CPU)
    naive = naive_build(model, tokenizer, layout, triplets, device=CPU)
    assert int(naive.count) == int(streamed.count) > 0
    assert sums_difference(streamed, naive) < 1e-5
    assert naive.a0.abs().sum() > 0


def test_building_writes_records_and_comparisons(tmp_path: Path, qa_file: Path) -> None:
    settings = BuildingSettings(
        shape="tiny", data=str(qa_file), batch_sizes=[4, 8], sizes=[8, 16], naive_sizes=[2, 4], dtype="float32",
        device="cpu", tokenizer_vocab=512,
    )  # fmt: skip
    details = run_building(settings, tmp_path)
    written = json.loads((tmp_path / "building.json").read_text())
    assert json.loads((tmp_path / "building.details.json").read_text())["settings"]["sizes"] == [8, 16]
    records = written["records"]
    assert [(r["builder"], r["batch_size"], r["triplets"]) for r in records] == [
        ("streaming", 4, 8), ("streaming", 4, 16), ("streaming", 8, 8), ("streaming", 8, 16),
        ("naive", 1, 2), ("naive", 1, 4),
    ]  # fmt: skip
    for record in records:
        assert {"devices", "examples_per_s", "peak_mem_bytes"} <= set(record)
        assert record["devices"] == 1 and record["examples_per_s"] > 0
    naive_rate = records[-1]["examples_per_s"]
    assert written["naive_examples_per_s"] == naive_rate
    assert written["speedup_over_naive"]["8"] == pytest.approx(records[3]["examples_per_s"] / naive_rate)
    assert set(written["memory_growth"]) == {"streaming_bs4", "streaming_bs8", "naive"}
    assert details["naive_vs_streaming_max_rel_diff"] < 1e-5
    assert "| naive | ok | 1 | 1 | 4 |" in (tmp_path / "building.md").read_text()
    streaming = [r for r in records if r["builder"] == "streaming"]
    peak = details["matmul_flops_per_s"]
    for record in streaming:
        assert record["peak_flops_per_s"] == peak > 0
        assert record["mfu"] == pytest.approx(record["model_flops"] / record["seconds"] / peak)
        assert record["tokens"] > record["rows"] > 0  # answer tokens are a part of the texts
        assert 0 <= record["padding_fraction"] < 1
    # the same triplets in other batches: the same texts, the same work
    assert records[1]["tokens"] == records[3]["tokens"] and records[1]["model_flops"] == records[3]["model_flops"]
    assert written["mfu"] == {"4": records[1]["mfu"], "8": records[3]["mfu"]}


def test_fit_command_passes_the_length_window_and_packing_only_when_set(tmp_path: Path) -> None:
    def command(window: int | None, pack: int | None = None) -> list[str]:
        settings = BuildingSettings(shape="tiny", length_window=window, pack_tokens=pack)
        return fit_command(settings, checkpoint=tmp_path, pairs=4, devices=1, run_dir=tmp_path, accelerator="cpu")

    assert command(16)[-2:] == ["--data.length_window", "16"]
    assert command(None, 512)[-2:] == ["--model.pack_tokens", "512"]
    assert "--data.length_window" not in command(None) and "--model.pack_tokens" not in command(None)
    with pytest.raises(ValueError, match="length_window must be a number of batches >= 1"):
        BuildingSettings(shape="tiny", length_window=0)
    with pytest.raises(ValueError, match="pack_tokens must be a row width in tokens >= 1"):
        BuildingSettings(shape="tiny", pack_tokens=0)


def test_packed_streaming_build_pads_less_for_the_same_work_and_sums(qa_file: Path) -> None:
    triplets, tokenizer, model, layout = _tiny_builder_inputs(qa_file, torch.float64)
    cost = BuildCost.of(model, list(range(layout.num_layers)))
    usage, sums = [], []
    for pack in (None, 256):
        passes: list = []
        sums.append(streaming_build(model, tokenizer, layout, triplets, batch_size=6, device=CPU, passes=passes,
                                    pack_tokens=pack))  # fmt: skip
        usage.append(utilisation({"seconds": 1.0}, cost, passes, peak_flops_per_s=1.0))
    padded, packed = usage
    assert packed["tokens"] == padded["tokens"] and packed["model_flops"] == padded["model_flops"]
    assert 0 <= packed["padding_fraction"] < padded["padding_fraction"] / 2
    assert sums_difference(sums[1], sums[0]) < 1e-12


def test_build_cost_matches_a_hand_count() -> None:
    """Tiny shape: hidden 64, 4 query heads of 16, 2 KV heads, MLP 128, two layers."""
    model = random_model(get_shape("tiny"), device=CPU, dtype=torch.float32)
    # a full layer's 2-D weights: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate, up, down 3x64x128 = 36864
    everything = BuildCost.of(model, [0, 1])  # stops at layer 1's keys: layer 0 whole, layer 1's k_proj (2048)
    assert everything == BuildCost(matmul_params=36864 + 2048, attention_layers=1, num_heads=4, head_dim=16)
    # texts of 3 and 5 tokens: 8 tokens, 6 + 15 = 21 causal (query, key) pairs
    assert everything.flops([3, 5]) == 2 * 38912 * 8 + 4 * 1 * 4 * 16 * 21 == 627968
    first = BuildCost.of(model, [0])  # no attention runs: only layer 0's key projection
    assert first.flops([3, 5]) == 2 * 2048 * 8


@pytest.mark.slow
def test_building_ddp_mode_runs_seka_fit_and_counts_every_triplet(tmp_path: Path, qa_file: Path) -> None:
    settings = BuildingSettings(
        shape="tiny", data=str(qa_file), batch_sizes=[4], sizes=[4, 8], naive_sizes=[1, 2], dtype="float32",
        device="cpu", tokenizer_vocab=512, ddp_devices=[1], ddp_pairs=[2, 6], ddp_batch_size=4,
        config=str(REPO / "configs" / "build" / "synthetic_qa.yaml"), accelerator="cpu",
    )  # fmt: skip
    run_building(settings, tmp_path, work_dir=tmp_path)
    fit = [r for r in json.loads((tmp_path / "building.json").read_text())["records"] if r["builder"] == "seka fit"]
    assert len(fit) == 1
    assert fit[0]["devices"] == 1 and fit[0]["triplets"] == 12  # 6 pairs, two triplets each, all seen by fit
    assert fit[0]["scaling_vs_1_device"] == 1.0
    (rank,) = fit[0]["ranks"]
    assert rank["batches"] == 3 and rank["steady_triplets"] == 8  # batches of 4 triplets; the first is start-up
    assert 0 < rank["first_batch_s"] < rank["fit_s"] and 0 < rank["steady_s"] < rank["fit_s"]
    assert fit[0]["examples_per_s_steady"] == pytest.approx(8 / rank["steady_s"])
    assert fit[0]["syncs_in_probe_batch"] == [None]  # counted on CUDA only


def test_steady_rate_takes_every_rank_s_triplets_over_the_slowest_span() -> None:
    ranks = [{"steady_s": 10.0, "steady_triplets": 1000}, {"steady_s": 12.5, "steady_triplets": 1500}]
    assert steady_rate(ranks) == pytest.approx(200.0)
    assert steady_rate([{"steady_s": 0.0, "steady_triplets": 0}]) is None


def test_fast_path_generates_what_the_eager_path_generates_with_seka(tmp_path: Path) -> None:
    """The static cache + compiled decode step times the same computation: the prefill edit still applies."""
    shape = get_shape("tiny")
    model = random_model(shape, device=CPU, dtype=torch.float32)
    bank = random_bank(shape, rank=8, seed=0)
    method = SekaMethod(str(bank.save(tmp_path / "bank.safetensors")), gain_pos=4.0)
    method.setup(model, tokenizer=None)
    enc = random_prompts(2, 96, documents=6, highlighted=3, vocab_size=shape.vocab_size, seed=0)
    eager = method.generate(model, enc, max_new_tokens=4, pad_token_id=0)
    plain = HighlightMethod().generate(model, enc, max_new_tokens=4, pad_token_id=0)
    with static_compiled_decoding(model, backend="eager", mode="default"):
        fast = method.generate(model, enc, max_new_tokens=4, pad_token_id=0)
        assert model.generation_config.cache_implementation == "static"
    assert model.generation_config.cache_implementation is None  # restored
    assert torch.equal(fast, eager)
    assert not torch.equal(eager, plain)  # the steering is visible, so equality above is not vacuous


@pytest.mark.slow
def test_a_failing_seka_fit_run_is_recorded_not_raised(tmp_path: Path) -> None:
    settings = BuildingSettings(shape="tiny", ddp_devices=[1], config=str(tmp_path / "missing.yaml"))
    records = ddp_records(settings, tmp_path / "no-model", tmp_path, "cpu")
    assert len(records) == 1
    assert records[0]["status"] == "failed" and records[0]["devices"] == 1
    assert "seka fit exited with" in records[0]["reason"]
    assert records[0]["scaling_vs_1_device"] is None
