"""StaticGreedyDecoder: the static-cache, compiled-step greedy loop generates exactly what `generate` does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bench.generation import GenerationSettings, random_bank, random_prompts
from bench.shapes import get_shape, random_model
from tests.conftest import gqa_attention_reference, tiny_gemma3
from torch import nn

from seka_lightning.decode_attention import gqa_decode_attention, gqa_decoding
from seka_lightning.fast_decode import StaticDecoding, StaticGreedyDecoder
from seka_lightning.methods import HighlightMethod, SekaMethod
from seka_lightning.split_kv import available as split_kv_available

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


def three_expert_adaseka(model: nn.Module, folder: Path) -> HighlightMethod:
    """AdaSEKA over three random tiny-shape experts, set up for ``model``."""
    from seka_lightning.adaseka.method import AdaSekaMethod

    shape = get_shape("tiny")
    experts = {
        f"e{i}": str(random_bank(shape, rank=8, seed=1 + i, positive_only=True).save(folder / f"e{i}.safetensors"))
        for i in range(3)
    }
    adaseka = AdaSekaMethod(experts, gain=4.0)
    adaseka.setup(model, None)
    return adaseka


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
    assert decoder.cache_slots == 128  # 102 rounded up to CACHE_ALIGN; the extra slots stay masked
    assert {layer.keys.shape[2] for layer in decoder.cache.layers} == {128}


def test_decoder_matches_generate_for_adaseka(setup, tmp_path: Path) -> None:
    model, _, enc = setup
    adaseka = three_expert_adaseka(model, tmp_path)
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
    three = {key: torch.cat([value, value[:1]]) for key, value in enc.items()}
    with pytest.raises(ValueError, match=r"cache for 2 rows, got a batch of 3; build one with batch_size >= 3"):
        decoder.generate(HighlightMethod(), three, max_new_tokens=2, pad_token_id=0)
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


@pytest.mark.parametrize("mask_kind", ["per_row", "shared", "none"])
@pytest.mark.parametrize("compiled", [False, True])
def test_gqa_decode_attention_matches_a_float64_reference(mask_kind: str, compiled: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    batch, kv_heads, groups, length, dim = 3, 2, 4, 41, 16
    query = torch.randn(batch, kv_heads * groups, 1, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=generator) for _ in range(2))
    rows = {"per_row": batch, "shared": 1}.get(mask_kind)
    mask = None if rows is None else torch.rand(rows, 1, 1, length, generator=generator) > 0.4
    if mask is not None:
        mask[..., -1] = True  # the step's own position is always visible
    module = nn.Module()
    module.num_key_value_groups = groups
    attend = torch.compile(gqa_decode_attention, backend="eager", fullgraph=True) if compiled else gqa_decode_attention
    out, weights = attend(module, query, key, value, mask, scaling=0.3)
    assert weights is None and out.shape == (batch, 1, kv_heads * groups, dim)
    torch.testing.assert_close(out.double(), gqa_attention_reference(query, key, value, mask, 0.3), atol=1e-6, rtol=0)


def test_gqa_decode_attention_hands_prompt_passes_plain_heads_and_float_masks_to_the_registered_sdpa() -> None:
    """What gqa_decode_attention does not handle goes to the registered "sdpa" function (here a spy around
    transformers' own), not to transformers' function behind a user's override."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen: list[tuple[int, int]] = []

    def spy(module, query, key, value, mask, **kwargs):
        seen.append((query.shape[2], module.num_key_value_groups))
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    generator = torch.Generator().manual_seed(1)
    grouped, plain = nn.Module(), nn.Module()
    grouped.num_key_value_groups, plain.num_key_value_groups = 2, 1
    key, value = (torch.randn(1, 2, 9, 8, generator=generator) for _ in range(2))
    prompt = torch.randn(1, 4, 9, 8, generator=generator)  # nine query tokens: a prompt pass
    causal = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    one = prompt[:, :, -1:]
    additive = torch.zeros(1, 1, 1, 9)  # a float mask is not read as visible/hidden
    ALL_ATTENTION_FUNCTIONS["sdpa"] = spy
    try:
        got = gqa_decode_attention(grouped, prompt, key, value, causal, scaling=0.5)[0]
        assert torch.equal(got, sdpa_attention_forward(grouped, prompt, key, value, causal, scaling=0.5)[0])
        got = gqa_decode_attention(grouped, one, key, value, additive, scaling=0.5)[0]
        assert torch.equal(got, sdpa_attention_forward(grouped, one, key, value, additive, scaling=0.5)[0])
        gqa_decode_attention(plain, one[:, :2], key, value, None, scaling=0.5)  # one query head per KV head
        gqa_decode_attention(grouped, one, key, value, None, scaling=0.5)  # handled here: the spy does not see it
        assert seen == [(9, 2), (1, 2), (1, 1)]
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]


def test_gqa_decoding_switches_only_its_model_and_restores_it(setup) -> None:
    from seka_lightning.decode_attention import GQA_DECODE_ATTENTION

    model, _, _ = setup
    other = random_model(get_shape("tiny"), device=CPU, dtype=torch.float32)
    eager = random_model(get_shape("tiny"), device=CPU, dtype=torch.float32)
    eager.set_attn_implementation("eager")
    with gqa_decoding(model), gqa_decoding(eager):
        assert model.config._attn_implementation == GQA_DECODE_ATTENTION
        assert other.config._attn_implementation == "sdpa"  # another model in the process is left alone
        assert eager.config._attn_implementation == "eager"  # only SDPA models switch
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with gqa_decoding(model):
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"  # restored after an error too


def test_decoder_matches_generate_on_gemma3_sliding_window_layers(tokenizer) -> None:
    """Gemma-3: grouped-query heads, sliding-window layers (window below the prompt length, so the sliding cache
    rolls) next to full ones, left padding; the grouped decode steps give generate's tokens."""
    model = tiny_gemma3(len(tokenizer), sliding_window=8)
    enc = random_prompts(2, 40, documents=4, highlighted=2, vocab_size=len(tokenizer), seed=3)
    assert (enc["attention_mask"][1] == 0).any()
    reference = HighlightMethod().generate(model, enc, max_new_tokens=12, pad_token_id=0)
    decoder = StaticGreedyDecoder(model, batch_size=2, max_cache_len=52, compile=True, backend="eager")
    assert decoder.grouped_decode
    assert torch.equal(decoder.generate(HighlightMethod(), enc, max_new_tokens=12, pad_token_id=0), reference)


@pytest.mark.parametrize("grouped_decode", [False, True])
def test_grouped_decode_steps_and_the_plainly_causal_unpadded_prompt_pass(setup, grouped_decode: bool) -> None:
    """Spy on the "sdpa" attention function: an unpadded prompt pass gets no mask (SDPA's causal kernel on the
    prompt's own keys), a padded one keeps its mask, and the decode steps of a grouped_decode decoder bypass it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, _, enc = setup
    calls: list[tuple[int, bool]] = []  # (query length, has a mask) on layer 0

    def spy(module, query, key, value, mask, **kwargs):
        if module.layer_idx == 0:
            calls.append((query.shape[2], mask is not None))
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = spy
    try:
        for rows, padded in ((1, False), (2, True)):
            part = {key: value[:rows] for key, value in enc.items()}
            decoder = StaticGreedyDecoder(
                model, batch_size=rows, max_cache_len=96 + NEW, compile=False, grouped_decode=grouped_decode
            )
            calls.clear()
            got = decoder.generate(HighlightMethod(), part, max_new_tokens=NEW, pad_token_id=0)
            assert calls == [(96, padded)] + ([] if grouped_decode else [(1, True)] * (NEW - 1))
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is spy and model.config._attn_implementation == "sdpa"
            assert torch.equal(got, HighlightMethod().generate(model, part, max_new_tokens=NEW, pad_token_id=0))
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]


@pytest.mark.parametrize("compile", [False, True])
def test_row_prompt_passes_give_the_batch_pass_cache_and_generate_tokens(setup, tmp_path: Path, compile: bool) -> None:
    """prompt_pass="rows" on a left-padded batch: each row's prompt alone, unpadded. Its prompt keys and values in
    the cache equal the batch pass's at the real positions (float32 rounding of another kernel), its padding slots
    are zero, and none, SEKA and AdaSEKA generate generate's tokens."""
    model, seka, enc = setup
    adaseka = three_expert_adaseka(model, tmp_path)
    options = {"batch_size": 2, "max_cache_len": 96 + NEW, "compile": compile, "backend": "eager"}
    batch = StaticGreedyDecoder(model, **options)
    rows = StaticGreedyDecoder(model, prompt_pass="rows", **options)
    real = enc["attention_mask"].bool()  # [2, 96]; row 1 left-padded
    for method in (HighlightMethod(), seka, adaseka):
        reference = method.generate(model, enc, max_new_tokens=NEW, pad_token_id=0)
        assert torch.equal(batch.generate(method, enc, max_new_tokens=NEW, pad_token_id=0), reference)
        assert torch.equal(rows.generate(method, enc, max_new_tokens=NEW, pad_token_id=0), reference)
        for ours, theirs in zip(rows.cache.layers, batch.cache.layers, strict=True):
            for got, want in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
                prompt, wanted = got[:, :, :96].transpose(1, 2), want[:, :, :96].transpose(1, 2)  # [B, T, H, d]
                torch.testing.assert_close(prompt[real], wanted[real], atol=2e-5, rtol=1e-5)
                assert not prompt[~real].any()  # the padding slots were never written
            assert int(ours.cumulative_length) == 96 + NEW - 1  # the prompt, then every decode step but the last


def test_row_prompt_passes_fill_the_copies_that_pad_a_short_batch(setup) -> None:
    """A batch of 2 on a decoder of 3 rows: the third row (a copy of the second) takes the second's cache, and the
    real rows' tokens are generate's."""
    model, seka, enc = setup
    decoder = StaticGreedyDecoder(model, batch_size=3, max_cache_len=96 + NEW, compile=False, prompt_pass="rows")
    got = decoder.generate(seka, enc, max_new_tokens=NEW, pad_token_id=0)
    assert torch.equal(got, seka.generate(model, enc, max_new_tokens=NEW, pad_token_id=0))
    for layer in decoder.cache.layers:
        assert torch.equal(layer.keys[2], layer.keys[1]) and torch.equal(layer.values[2], layer.values[1])


def test_row_prompt_passes_only_for_padded_left_padded_batches_of_full_attention_models(setup, tokenizer) -> None:
    """An unpadded batch keeps the one batch pass; a mask that is not left padding, a sliding-window model and an
    unknown prompt_pass are refused with the way out."""
    model, _, enc = setup
    decoder = StaticGreedyDecoder(model, batch_size=1, max_cache_len=96 + NEW, compile=False, prompt_pass="rows")

    def refuse(*args, **kwargs):
        raise AssertionError("an unpadded batch went row by row")

    decoder._row_prompt_passes = refuse
    first = {key: value[:1] for key, value in enc.items()}
    assert torch.equal(
        decoder.generate(HighlightMethod(), first, max_new_tokens=NEW, pad_token_id=0),
        HighlightMethod().generate(model, first, max_new_tokens=NEW, pad_token_id=0),
    )
    holed = {key: value.clone() for key, value in enc.items()}
    holed["attention_mask"][0, 50] = 0  # a hole, not left padding
    rows = StaticGreedyDecoder(model, batch_size=2, max_cache_len=96 + NEW, compile=False, prompt_pass="rows")
    with pytest.raises(
        ValueError,
        match=r"left-padded prompts with at least one token; row 0 has 95 tokens, and its mask is 0 at positions "
        r"\[50\] after its first token; pad on the left",
    ):
        rows.generate(HighlightMethod(), holed, max_new_tokens=NEW, pad_token_id=0)
    empty = {key: value.clone() for key, value in enc.items()}
    empty["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"at least one token; row 1 has 0 tokens; pad on the left"):
        rows.generate(HighlightMethod(), empty, max_new_tokens=NEW, pad_token_id=0)
    with pytest.raises(
        ValueError, match=r"cache also has \['StaticSlidingWindowLayer'\] layers .*; use prompt_pass='batch'$"
    ):
        StaticGreedyDecoder(tiny_gemma3(len(tokenizer), sliding_window=8), batch_size=1, max_cache_len=64,
                            compile=False, prompt_pass="rows")  # fmt: skip
    with pytest.raises(ValueError, match=r"^prompt_pass must be one of \('batch', 'rows'\), got 'row'$"):
        GenerationSettings(shape="tiny", prompt_pass="row")
    for build in (StaticGreedyDecoder, StaticDecoding):
        first_arg = model if build is StaticGreedyDecoder else HighlightMethod()
        size = {"batch_size": 1, "max_cache_len": 64} if build is StaticGreedyDecoder else {"max_length": 64}
        with pytest.raises(ValueError, match=r"^prompt_pass must be one of \('batch', 'rows'\), got 'row'$"):
            build(first_arg, prompt_pass="row", **size)


def test_row_prompt_passes_refuse_adaseka_compat_modes_that_route_across_rows(setup, tmp_path: Path) -> None:
    """AdaSEKA's reference-compat routing (row 0's query for every row, an extra pass over the padded batch) makes a
    row's edit depend on the others: rows one at a time would change it, so prompt_pass="rows" refuses it."""
    from seka_lightning.adaseka.method import AdaSekaMethod

    model, _, enc = setup
    expert = str(random_bank(get_shape("tiny"), rank=8, seed=1, positive_only=True).save(tmp_path / "e.safetensors"))
    assert AdaSekaMethod({"e": expert}, compat=["reference_coefficients"]).row_dependence is None
    message = r"^method 'adaseka' edits a row using the other rows of its batch \(compat \[.*use prompt_pass='batch'$"
    for compat in (["row0"], ["output_hidden_state"]):
        adaseka = AdaSekaMethod({"e": expert}, gain=4.0, compat=compat)
        adaseka.setup(model, None)
        decoder = StaticGreedyDecoder(model, batch_size=2, max_cache_len=96 + NEW, compile=False, prompt_pass="rows")
        with pytest.raises(ValueError, match=message):
            decoder.generate(adaseka, enc, max_new_tokens=NEW, pad_token_id=0)
        with pytest.raises(ValueError, match=message):
            StaticDecoding(adaseka, max_length=128, prompt_pass="rows")


def test_static_decoding_wraps_a_method(setup) -> None:
    model, seka, enc = setup
    wrapped = StaticDecoding(seka, max_length=128, compile=False)
    assert torch.equal(wrapped.generate(model, enc, max_new_tokens=NEW, pad_token_id=0),
                       seka.generate(model, enc, max_new_tokens=NEW, pad_token_id=0))  # fmt: skip
    assert torch.equal(wrapped.prompt_logits(model, enc), seka.prompt_logits(model, enc))
    assert wrapped.describe()["gain_pos"] == 4.0 and wrapped.describe()["static_decoding"]["max_length"] == 128

    class EveryStep(HighlightMethod):
        name = "every_step"
        edits_decode_steps = True

    with pytest.raises(ValueError, match="'every_step' also acts on decode steps.*drop static_decoding"):
        StaticDecoding(EveryStep(), max_length=128)


def test_one_decoder_serves_a_dataset_with_a_smaller_last_batch(setup) -> None:
    """Batches of 3, 3 and 1 prompts (7 = 2x3 + 1): the last batch is padded up to the decoder's 3 rows, each real
    row gets the tokens of its batch decoded alone by `generate`, and one decoder with one cache (never reallocated)
    serves them all."""
    model, seka, _ = setup
    prompts = random_prompts(7, 80, documents=5, highlighted=2, vocab_size=get_shape("tiny").vocab_size, seed=0)
    assert (prompts["attention_mask"][-1] == 0).any()  # the last batch's one row is left-padded
    wrapped = StaticDecoding(seka, max_length=96, compile=True, backend="eager")
    addresses = None
    for start in (0, 3, 6):
        batch = {key: value[start : start + 3] for key, value in prompts.items()}
        got = wrapped.generate(model, batch, max_new_tokens=NEW, pad_token_id=0)
        assert got.shape == (batch["input_ids"].shape[0], NEW)
        assert torch.equal(got, seka.generate(model, batch, max_new_tokens=NEW, pad_token_id=0))
        (decoder,) = wrapped._decoders.values()
        now = [layer.keys.data_ptr() for layer in decoder.cache.layers]
        assert addresses in (None, now)  # the cache is reset, not reallocated
        addresses = now
    assert decoder.batch_size == 3 and {layer.keys.shape[0] for layer in decoder.cache.layers} == {3}


def test_a_larger_batch_than_any_before_replaces_the_decoder_once(setup) -> None:
    model, seka, enc = setup
    wrapped = StaticDecoding(seka, max_length=128, compile=False)
    for rows in (1, 2, 1):
        part = {key: value[:rows] for key, value in enc.items()}
        reference = seka.generate(model, part, max_new_tokens=NEW, pad_token_id=0)
        assert torch.equal(wrapped.generate(model, part, max_new_tokens=NEW, pad_token_id=0), reference)
    (decoder,) = wrapped._decoders.values()
    assert decoder.batch_size == 2


def test_reserved_rows_size_the_decoder_whichever_batch_comes_first(setup) -> None:
    """A run resumed at its short last batch builds the decoder of an uninterrupted run (the batch size's rows)."""
    model, seka, enc = setup
    wrapped = StaticDecoding(seka, max_length=128, compile=False)
    wrapped.reserve_rows(3)
    part = {key: value[:1] for key, value in enc.items()}
    reference = seka.generate(model, part, max_new_tokens=NEW, pad_token_id=0)
    assert torch.equal(wrapped.generate(model, part, max_new_tokens=NEW, pad_token_id=0), reference)
    (decoder,) = wrapped._decoders.values()
    assert decoder.batch_size == 3
    with pytest.raises(ValueError, match=r"^rows must be >= 1, got 0$"):
        wrapped.reserve_rows(0)


@pytest.mark.parametrize(
    ("family", "lengths", "graphs"),
    [
        ("llama", (40, 33, 50), 1),
        ("gemma3", (40, 33, 50), 1),  # the sliding layers (window 16) are full at every step
        ("gemma3", (40, 10, 12), 2),  # short prompts: not full, then full mid-call (the cache update branches)
    ],
)
def test_the_compiled_step_is_not_recompiled_across_steps_and_prompt_lengths(
    tokenizer, family: str, lengths: tuple[int, ...], graphs: int
) -> None:
    """Gemma-3's sliding layers count tokens in a Python int; read inside the step, it recompiled the step (and
    re-recorded CUDA graphs) as it changed. One graph now serves every step and call (two where a sliding layer
    fills up: transformers' cache update takes another branch then), and the tokens stay generate's."""
    from tests.conftest import tiny_llama
    from torch._dynamo.utils import counters

    vocab = len(tokenizer)
    model = tiny_llama(vocab) if family == "llama" else tiny_gemma3(vocab, sliding_window=16)
    model.generation_config.eos_token_id = None
    decoder = StaticGreedyDecoder(model, batch_size=2, max_cache_len=62, compile=True, backend="eager")
    # every decoder's step shares one code object, whose compiled entries count towards dynamo's recompile limit (8)
    # over the whole session; start from none, so that earlier tests' decoders cannot stop this one compiling
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    for length in lengths:
        enc = random_prompts(2, length, documents=2, highlighted=1, vocab_size=vocab, seed=length)
        reference = HighlightMethod().generate(model, enc, max_new_tokens=12, pad_token_id=0)
        assert torch.equal(decoder.generate(HighlightMethod(), enc, max_new_tokens=12, pad_token_id=0), reference)
    assert counters["stats"]["unique_graphs"] - before == graphs, counters["stats"]


def test_static_decoding_in_predict_gives_the_generate_results(tiny_model_dir, litm_oracle, tmp_path: Path) -> None:
    """`seka predict --model.static_decoding N` on a generation benchmark: the same predictions and metrics."""
    import json

    from seka_lightning.cli import run_lightning

    def predict(out: str, *extra: str) -> dict:
        run_lightning(
            [
                "predict",
                "--model", "seka_lightning.lit.evaluator.BenchmarkEvaluator",
                "--model.pretrained", str(tiny_model_dir),
                "--model.method", "seka_lightning.methods.HighlightMethod",
                *extra,
                "--data", "seka_lightning.benchmarks.LostInTheMiddleDataModule",
                "--data.path", str(litm_oracle),
                "--data.num_documents", "4",
                "--data.gold_positions", "[0, 3]",
                "--data.example_subset", "0:3",
                "--data.max_new_tokens", "5",
                "--data.batch_size", "4",  # 6 prompts: batches of 4 and 2, the second padded to 4 rows
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
    read = lambda name: (tmp_path / name / "predictions.jsonl.gz").read_bytes()  # noqa: E731
    assert read("static") == read("generate")
    options = [
        ("fused", "--model.static_decoding_fuse", "true", "fuse_projections", True),
        ("rows", "--model.static_decoding_prompt_pass", "rows", "prompt_pass", "rows"),
    ]
    if split_kv_available(torch.device("cpu")):  # Triton's interpreter (conftest) runs the kernel on the CPU
        options.append(("split", "--model.static_decoding_split_kv", "true", "split_kv", True))
    for out, option, value, setting, recorded in options:
        fast = predict(out, "--model.static_decoding", "512", "--model.static_decoding_backend", "eager", option, value)
        assert fast["method"]["static_decoding"][setting] == recorded
        assert read(out) == read("generate")


def test_a_sliding_window_model_with_bidirectional_attention_is_refused_by_the_compiled_decoder(tokenizer) -> None:
    """The compiled decoder builds Gemma-3's decode masks itself (causal builders only): a config asking for
    bidirectional attention is refused before anything compiles, with the way out."""
    model = tiny_gemma3(len(tokenizer), sliding_window=16)
    model.config.use_bidirectional_attention = True
    with pytest.raises(
        ValueError,
        match=r"^the compiled decoder builds the decode masks of sliding-window models for the layer types "
        r"\['full_attention', 'sliding_attention'\] with causal attention; this model has "
        r"\['full_attention', 'sliding_attention'\] with bidirectional attention; use compile=False or method.generate$",
    ):
        StaticGreedyDecoder(model, batch_size=1, max_cache_len=64, backend="eager")
