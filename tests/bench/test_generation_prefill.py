"""The generation benchmark's prompt-pass timing and its prompt lengths (CPU, tiny shape): the prefill fields and
their floor, several prompt lengths in one run, and prompts up to the 8B's context. No timing is asserted beyond
being positive: CPU timings on shared cores mean nothing."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from bench.__main__ import main
from bench.generation import (
    RECORD_KEYS,
    Ceilings,
    GenerationSettings,
    ModelCost,
    generation_floor,
    measure_block,
    on_decoder,
    random_bank,
    random_prompts,
)
from bench.shapes import get_shape, random_model

from seka_lightning.fast_decode import StaticGreedyDecoder
from seka_lightning.methods import Encoded, HighlightMethod, SekaMethod

CPU = torch.device("cpu")
PROMPTS, BATCHES, REPEATS = (128, 192), (1, 2), 2
BLOCKS = {(128, 1), (128, 2), (192, 1)}  # 192 x 2 = 384 tokens is over --max-batch-tokens 256


def _run(cpu_args: list[str], out: Path, *extra: str) -> None:
    main(
        [
            *cpu_args,
            "--new-tokens", "3",
            "--repeats", str(REPEATS),
            "--warmup", "0",
            "--fast-repeats", str(REPEATS),
            "--fast-warmup", "0",
            "--dtype", "float32",
            "--out", str(out),
            *extra,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def prefill_run(tmp_path_factory: pytest.TempPathFactory, cpu_generation_args: list[str]) -> Path:
    out = tmp_path_factory.mktemp("prefill")
    _run(
        cpu_generation_args,
        out,
        "--batch-sizes", *map(str, BATCHES),
        "--prompt-tokens", *map(str, PROMPTS),
        "--max-batch-tokens", "256",
        "--methods", "none", "seka", "adaseka",
        "--fast-methods", "none", "seka", "adaseka",
        "--paths", "eager", "static_loop",
    )  # fmt: skip
    return out


def test_every_block_is_timed_once_per_prompt_length_within_the_token_budget(prefill_run: Path) -> None:
    records = json.loads((prefill_run / "generation.json").read_text())
    for path in ("eager", "static_loop"):
        for method in ("none", "seka", "adaseka"):
            rows = [r for r in records if r["path"] == path and r["method"] == method]
            assert sorted((r["prompt_tokens"], r["batch_size"]) for r in rows) == sorted(BLOCKS), (path, method)
            assert all(r["status"] == "ok" for r in rows), rows
    details = json.loads((prefill_run / "generation.details.json").read_text())
    assert {(int(p), int(b)) for p, floors in details["floors"].items() for b in floors} == BLOCKS
    assert details["settings"]["prompt_tokens"] == list(PROMPTS)


def test_prefill_fields_are_the_median_pass_over_the_floor_of_that_block(prefill_run: Path) -> None:
    records = json.loads((prefill_run / "generation.json").read_text())
    details = json.loads((prefill_run / "generation.details.json").read_text())
    cost, ceilings = ModelCost(**details["cost"]), Ceilings(**details["ceilings"])
    new_tokens = details["settings"]["new_tokens"]
    for record, full in zip(records, details["records"], strict=True):
        assert set(RECORD_KEYS) | {"path", "latency_over_floor"} <= set(record)
        prompt, batch = record["prompt_tokens"], record["batch_size"]
        floor = generation_floor(cost, ceilings, batch=batch, prompt_tokens=prompt, new_tokens=new_tokens)
        assert record["prefill_floor_s"] == pytest.approx(floor["prefill_s"], rel=1e-12)
        assert len(full["prefill_latencies_s"]) == REPEATS
        assert record["prefill_s_median"] == pytest.approx(statistics.median(full["prefill_latencies_s"]))
        assert record["prefill_s_median"] > 0
        assert record["prefill_over_floor"] == pytest.approx(record["prefill_s_median"] / record["prefill_floor_s"])
        assert record["latency_over_floor"] == pytest.approx(record["latency_s_median"] / floor["per_sample_s"])


def test_the_table_shows_prompt_length_and_prefill(prefill_run: Path) -> None:
    table = (prefill_run / "generation.md").read_text()
    assert "128, 192-token prompts" in table
    assert "| prompt |" in table and "| prefill s / batch | prefill x floor |" in table
    assert table.count("\n| adaseka | static_loop | 1 | 192 |") == 1


class _Spy(HighlightMethod):
    """No edit; counts how often its effect is switched on."""

    name = "spy"

    def __init__(self) -> None:
        self.entered = 0

    def active(self, model: torch.nn.Module, enc: Encoded):
        self.entered += 1
        return super().active(model, enc)


def test_the_prompt_pass_runs_the_method_s_edit_and_no_decode_step() -> None:
    """On the static loop, each round generates (one prompt pass, new_tokens - 1 decode steps) and then runs the
    prompt pass alone: the method is active twice per round and the decode step runs only for the generation."""
    shape = get_shape("tiny")
    model = random_model(shape, device=CPU, dtype=torch.float32)
    enc = random_prompts(2, 96, documents=6, highlighted=3, vocab_size=shape.vocab_size, seed=0)
    spy = _Spy()
    decoder = StaticGreedyDecoder(model, batch_size=2, max_cache_len=96 + 4, compile=False)
    steps: list[int] = []
    step = decoder.step

    def counted_step(*args: torch.Tensor) -> torch.Tensor:
        steps.append(1)
        return step(*args)

    decoder.step = counted_step

    class OnSpyDecoder(HighlightMethod):
        name = "spy"

        def generate(self, model, enc, *, max_new_tokens: int, pad_token_id: int) -> torch.Tensor:
            return decoder.generate(spy, enc, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)

    samples = measure_block(model, {"spy": OnSpyDecoder()}, enc, new_tokens=4, warmup=1, repeats=2, device=CPU)
    rounds = 1 + 2  # warm-up and timed
    assert spy.entered == 2 * rounds
    assert len(steps) == (4 - 1) * rounds
    assert len(samples["spy"].prefill) == len(samples["spy"].latencies) == 2
    assert all(s > 0 for s in samples["spy"].prefill)


def test_the_static_loop_prompt_pass_is_the_first_token_of_the_steered_generation(tmp_path: Path) -> None:
    """The timed prompt pass is generation's own: one token through the shared decoder with SEKA's edit."""
    shape = get_shape("tiny")
    model = random_model(shape, device=CPU, dtype=torch.float32)
    seka = SekaMethod(str(random_bank(shape, rank=8, seed=0).save(tmp_path / "bank.safetensors")), gain_pos=4.0)
    seka.setup(model, tokenizer=None)
    enc = random_prompts(2, 96, documents=6, highlighted=3, vocab_size=shape.vocab_size, seed=0)
    settings = GenerationSettings(shape="tiny", new_tokens=4, compile_backend="eager", compile_mode="default")
    methods = on_decoder({"none": HighlightMethod(), "seka": seka}, model, enc, settings)
    full = {name: m.generate(model, enc, max_new_tokens=4, pad_token_id=0) for name, m in methods.items()}
    first = {name: m.generate(model, enc, max_new_tokens=1, pad_token_id=0) for name, m in methods.items()}
    assert torch.equal(first["seka"], seka.generate(model, enc, max_new_tokens=1, pad_token_id=0))
    for name in methods:
        assert torch.equal(first[name], full[name][:, :1]), name
    assert not torch.equal(first["seka"], first["none"])  # the edit shows in the prompt pass alone


def test_a_prompt_longer_than_the_old_tiny_context_runs(tmp_path: Path, cpu_generation_args: list[str]) -> None:
    """4,200 tokens: past the 4,096 positions the tiny shape used to have (the 32k runs use the same code)."""
    _run(
        cpu_generation_args,
        tmp_path,
        "--batch-sizes", "1",
        "--prompt-tokens", "4200",
        "--methods", "none", "seka",
        "--fast-methods", "none", "seka",
        "--paths", "static_loop",
        "--fast-repeats", "1",
    )  # fmt: skip
    records = json.loads((tmp_path / "generation.json").read_text())
    assert {(r["method"], r["prompt_tokens"], r["status"]) for r in records} == {
        ("none", 4200, "ok"),
        ("seka", 4200, "ok"),
    }
    assert all(r["prefill_s_median"] > 0 for r in records)


@pytest.mark.parametrize("name", ["tiny", "qwen3-8b"])
def test_the_shapes_hold_a_32k_prompt_and_its_new_tokens(name: str) -> None:
    assert get_shape(name).config().max_position_embeddings >= 32768 + 60
    settings = GenerationSettings(
        shape=name, prompt_tokens=[4096, 32768], batch_sizes=[1, 10], new_tokens=60, max_batch_tokens=40960
    )
    assert settings.blocks() == [(4096, 1), (4096, 10), (32768, 1)]  # the issue-13 set in one run


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"prompt_tokens": [4096, 40960]},
            r"prompt_tokens=40960 \+ new_tokens=60 exceeds the 40960 positions of shape 'tiny'; "
            "use at most 40900 prompt tokens",
        ),
        ({"prompt_tokens": 4096}, "prompt_tokens must be a non-empty list of lengths, got 4096"),
        ({"prompt_tokens": []}, "prompt_tokens must be a non-empty list of lengths"),
        ({"prompt_tokens": [100]}, "prompt_tokens=100 is too short for 30 documents; use at least 120 tokens"),
        (
            {"prompt_tokens": [4096], "batch_sizes": [2], "max_batch_tokens": 4096},
            r"max_batch_tokens=4096 leaves no \(prompt tokens, batch size\) pair to time of \[4096\] x \[2\]; "
            "raise it to at least 8192",
        ),
    ],
)
def test_prompt_length_settings_name_the_problem(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationSettings(shape="tiny", **change)
