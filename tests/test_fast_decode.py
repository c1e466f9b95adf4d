"""StaticGreedyDecoder: the static-cache, compiled-step greedy loop generates exactly what `generate` does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seka_lightning.bench.generation import random_bank, random_prompts
from seka_lightning.bench.shapes import get_shape, random_model
from seka_lightning.fast_decode import StaticDecoding, StaticGreedyDecoder
from seka_lightning.methods import HighlightMethod, SekaMethod

CPU = torch.device("cpu")
NEW = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    shape = get_shape("tiny")
    model = random_model(shape, device=CPU, dtype=torch.float32)
    bank = random_bank(shape, rank=8, seed=0).save(tmp_path_factory.mktemp("bank") / "bank.safetensors")
    seka = SekaMethod(str(bank), gain_pos=4.0)
    seka.setup(model, tokenizer=None)
    enc = random_prompts(2, 96, documents=6, highlighted=3, vocab_size=shape.vocab_size, seed=0)
    assert (enc["attention_mask"][1] == 0).any()  # row 1 is left-padded
    return model, seka, enc


@pytest.mark.parametrize("compile", [False, True])
def test_decoder_matches_generate_for_none_and_seka(setup, compile: bool) -> None:
    model, seka, enc = setup
    decoder = StaticGreedyDecoder(model, batch_size=2, max_cache_len=96 + NEW, compile=compile, backend="eager")
    plain = HighlightMethod().generate(model, enc, max_new_tokens=NEW, pad_token_id=0)
    steered = seka.generate(model, enc, max_new_tokens=NEW, pad_token_id=0)
    assert not torch.equal(plain, steered)  # the steering shows, so the equalities below are not vacuous
    for _ in range(2):  # the second call reuses the reset cache
        assert torch.equal(decoder.generate(HighlightMethod(), enc, max_new_tokens=NEW, pad_token_id=0), plain)
        assert torch.equal(decoder.generate(seka, enc, max_new_tokens=NEW, pad_token_id=0), steered)


def test_decoder_matches_generate_for_adaseka(setup, tmp_path: Path) -> None:
    from seka_lightning.lit.selector import AdaSekaSelector

    model, _, enc = setup
    shape = get_shape("tiny")
    experts = {
        f"e{i}": str(random_bank(shape, rank=8, seed=1 + i, positive_only=True).save(tmp_path / f"e{i}.safetensors"))
        for i in range(3)
    }
    adaseka = AdaSekaSelector(experts, gain=4.0)
    adaseka.setup(model, None)
    decoder = StaticGreedyDecoder(model, batch_size=2, max_cache_len=96 + NEW, compile=True, backend="eager")
    reference = adaseka.generate(model, enc, max_new_tokens=NEW, pad_token_id=0)
    assert not torch.equal(reference, HighlightMethod().generate(model, enc, max_new_tokens=NEW, pad_token_id=0))
    assert torch.equal(decoder.generate(adaseka, enc, max_new_tokens=NEW, pad_token_id=0), reference)


def test_rows_that_emit_eos_continue_with_padding_as_generate_does(setup) -> None:
    model, _, enc = setup
    plain = HighlightMethod().generate(model, enc, max_new_tokens=NEW, pad_token_id=0)
    decoder = StaticGreedyDecoder(model, batch_size=2, max_cache_len=96 + NEW, compile=False)
    before = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = int(plain[0, 2])  # row 0 stops after its third token (set after building)
    try:
        reference = HighlightMethod().generate(model, enc, max_new_tokens=NEW, pad_token_id=0)
        got = decoder.generate(HighlightMethod(), enc, max_new_tokens=NEW, pad_token_id=0)
    finally:
        model.generation_config.eos_token_id = before
    assert (reference[0, 3:] == 0).all()
    assert torch.equal(got, reference)


def test_bad_calls_are_refused(setup, tmp_path: Path) -> None:
    model, _, enc = setup

    class EveryStep(HighlightMethod):
        name = "every_step"
        edits_decode_steps = True

    decoder = StaticGreedyDecoder(model, batch_size=2, max_cache_len=100, compile=False)
    with pytest.raises(ValueError, match="'every_step' also acts on decode steps.*use method.generate"):
        decoder.generate(EveryStep(), enc, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="cache for 2 rows, got a batch of 1"):
        decoder.generate(HighlightMethod(), {k: v[:1] for k, v in enc.items()}, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match=r"prompt \(96\) \+ max_new_tokens \(5\) exceeds max_cache_len=100"):
        decoder.generate(HighlightMethod(), enc, max_new_tokens=5, pad_token_id=0)
    model.generation_config.repetition_penalty = 1.3
    try:
        with pytest.raises(ValueError, match=r"generation_config sets repetition_penalty=1.3.*use method.generate"):
            decoder.generate(HighlightMethod(), enc, max_new_tokens=2, pad_token_id=0)
    finally:
        model.generation_config.repetition_penalty = None
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        StaticGreedyDecoder(model, batch_size=0, max_cache_len=100)


def test_static_decoding_wraps_a_method_with_one_decoder_per_batch_size(setup) -> None:
    model, seka, enc = setup
    wrapped = StaticDecoding(seka, max_length=128, compile=False)
    for rows in (2, 1, 2):
        part = {key: value[:rows] for key, value in enc.items()}
        reference = seka.generate(model, part, max_new_tokens=NEW, pad_token_id=0)
        assert torch.equal(wrapped.generate(model, part, max_new_tokens=NEW, pad_token_id=0), reference)
    assert len(wrapped._decoders) == 2
    assert torch.equal(wrapped.prompt_logits(model, enc), seka.prompt_logits(model, enc))
    assert wrapped.describe()["gain_pos"] == 4.0 and wrapped.describe()["static_decoding"]["max_length"] == 128

    class EveryStep(HighlightMethod):
        name = "every_step"
        edits_decode_steps = True

    with pytest.raises(ValueError, match="'every_step' also acts on decode steps.*drop static_decoding"):
        StaticDecoding(EveryStep(), max_length=128)


def test_static_decoding_in_predict_gives_the_generate_results(tiny_model_dir, tmp_path: Path) -> None:
    """`seka predict --model.static_decoding N` on a generation benchmark: the same predictions and metrics."""
    import gzip
    import json

    from seka_lightning.cli import run_lightning

    records = [
        {
            "question": f"question {i}",
            "answers": [f"answer{i}"],
            "ctxs": [{"title": f"T{i}", "text": f"Passage {i} says answer{i}.", "hasanswer": True, "isgold": True}],
            "nq_annotated_gold": {"title": f"T{i}"},
        }
        for i in range(12)
    ]
    oracle = tmp_path / "oracle.jsonl.gz"
    oracle.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in records).encode()))

    def predict(out: str, *extra: str) -> dict:
        run_lightning(
            [
                "predict",
                "--model", "seka_lightning.lit.evaluator.BenchmarkEvaluator",
                "--model.pretrained", str(tiny_model_dir),
                "--model.method", "seka_lightning.methods.HighlightMethod",
                *extra,
                "--data", "seka_lightning.data.benchmark_modules.LostInTheMiddleDataModule",
                "--data.path", str(oracle),
                "--data.num_documents", "4",
                "--data.gold_positions", "[0, 3]",
                "--data.example_subset", "0:3",
                "--data.max_new_tokens", "5",
                "--data.batch_size", "4",  # 6 prompts: batches of 4 and 2, two decoders
                "--trainer.accelerator", "cpu",
                "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false",
                "--trainer.callbacks+", "seka_lightning.lit.writers.BenchmarkWriter",
                "--trainer.callbacks.output_dir", str(tmp_path / out),
            ]
        )  # fmt: skip
        return json.loads((tmp_path / out / "metric_result.json").read_text())

    plain = predict("generate")
    static = predict("static", "--model.static_decoding", "512", "--model.static_decoding_backend", "eager")
    assert static["metrics"] == plain["metrics"] and static["counts"]["examples"] == 6
    assert static["method"]["static_decoding"]["max_length"] == 512
    read = lambda name: (tmp_path / name / "predictions.jsonl").read_text()  # noqa: E731
    assert read("static") == read("generate")
