"""SPA: the anchored logits against independent unpadded passes, cached decoding against full re-runs, batching."""

from __future__ import annotations

import pytest
import torch

from seka_lightning import encode_highlighted
from seka_lightning.baselines.spa import SpaMethod, masked_prompt
from seka_lightning.methods import HighlightMethod

PROMPTS = [
    "Previously the keepers carried **silver lanterns** across the north harbor. What do they carry?",
    "The **golden tower** stands in the valley.",
    "Answer **in one word**: where is the **old castle** now?",
    "The keepers of the village carry nothing at all.",
    "**Silver** lanterns glow in the old castle.",  # a run at the very first token: a fully hidden query
]
MASK_ID = 0  # the test tokenizer's <pad>
MODES = ("pad", "attention")


def spa(tokenizer, **kwargs) -> SpaMethod:
    method = SpaMethod(**kwargs)
    method.setup(None, tokenizer)
    return method


def unpadded_rows(enc) -> list[tuple[list[int], list[bool]]]:
    rows = []
    for ids, real, hl in zip(enc["input_ids"], enc["attention_mask"].bool(), enc["highlight_mask"], strict=True):
        rows.append((ids[real].tolist(), hl[real].tolist()))
    return rows


def collapsed(ids: list[int], highlight: list[bool]) -> tuple[list[int], list[int]]:
    """The auxiliary row built token by token: each highlighted run -> one MASK_ID; returns (ids, placeholder flags)."""
    out, placeholder = [], []
    for i, (token, hl) in enumerate(zip(ids, highlight, strict=True)):
        if not hl:
            out.append(token)
            placeholder.append(0)
        elif i == 0 or not highlight[i - 1]:
            out.append(MASK_ID)
            placeholder.append(1)
    return out, placeholder


def last_logits(model, ids: list[int], hidden: list[int] | None = None) -> torch.Tensor:
    """One unpadded row, full forward, no cache; ``hidden`` marks tokens no query may attend to."""
    input_ids = torch.tensor([ids])
    attention = torch.tensor([[1 - h for h in hidden]]) if hidden else torch.ones_like(input_ids)
    positions = torch.arange(len(ids))[None]
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False)
    return out.logits[0, -1].double()


def slow_reference(model, ids, highlight, *, strength: float, mode: str, steps: int) -> list[int]:
    """Greedy SPA that re-runs both whole sequences every step (no cache, no padding)."""
    main = list(ids)
    aux, placeholder = collapsed(ids, highlight)
    hidden = placeholder if mode == "attention" else None
    chosen = []
    for _ in range(steps):
        m = last_logits(model, main)
        a = last_logits(model, aux, hidden)
        token = int((m + (strength - 1) * (m - a)).argmax())
        chosen.append(token)
        main.append(token)
        aux.append(token)
        if hidden:
            hidden.append(0)
    return chosen


def test_masked_prompt_collapses_each_run_and_repads():
    enc = {
        "input_ids": torch.tensor([[0, 0, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7]),
        "highlight_mask": torch.tensor([[0, 0, 0, 1, 1, 0, 1], [0] * 7], dtype=torch.bool),
    }
    pad = masked_prompt(enc, mask_token_id=99, mask_mode="pad")
    assert pad["input_ids"].tolist() == [[99, 99, 99, 5, 99, 8, 99], [10, 11, 12, 13, 14, 15, 16]]
    assert pad["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1], [1] * 7]
    assert pad["position_ids"].tolist() == [[0, 0, 0, 0, 1, 2, 3], list(range(7))]
    attention = masked_prompt(enc, mask_token_id=99, mask_mode="attention")
    assert torch.equal(attention["input_ids"], pad["input_ids"])
    assert attention["attention_mask"].tolist() == [[0, 0, 0, 1, 0, 1, 0], [1] * 7]
    assert torch.equal(attention["position_ids"], pad["position_ids"])  # the hidden placeholder keeps its slot


def test_auxiliary_pass_equals_a_pass_with_one_hidden_placeholder_per_highlight(tiny_model, tokenizer):
    """BENCHMARKS.md: by default the anchored text becomes one placeholder with attention mask 0 at prefill."""
    enc = encode_highlighted(tokenizer, PROMPTS)
    method = spa(tokenizer)
    assert method.mask_mode == "attention"
    got = method.auxiliary_logits(tiny_model, enc)
    for i, (ids, highlight) in enumerate(unpadded_rows(enc)):
        aux, placeholder = collapsed(ids, highlight)
        assert sum(placeholder) == (0 if i == 3 else len(PROMPTS[i].split("**")) // 2)
        expected = last_logits(tiny_model, aux, placeholder)
        torch.testing.assert_close(got[i].double(), expected, rtol=1e-5, atol=1e-5, msg=f"row {i}")
    # hidden: the placeholder's token does not matter, while a visible placeholder does
    other = spa(tokenizer, mask_token="<eos>").auxiliary_logits(tiny_model, enc)
    torch.testing.assert_close(other, got, rtol=1e-5, atol=1e-5)
    visible = spa(tokenizer, mask_mode="pad").auxiliary_logits(tiny_model, enc)
    assert (visible[:3] - got[:3]).abs().amax(-1).min() > 1e-3
    torch.testing.assert_close(visible[3], got[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_strength_one_is_the_plain_model(tiny_model, tokenizer, mode):
    enc = encode_highlighted(tokenizer, PROMPTS)
    method, plain = spa(tokenizer, strength=1.0, mask_mode=mode), HighlightMethod()
    assert torch.equal(method.prompt_logits(tiny_model, enc), plain.prompt_logits(tiny_model, enc))
    kwargs = {"max_new_tokens": 6, "pad_token_id": tokenizer.pad_token_id}
    assert torch.equal(method.generate(tiny_model, enc, **kwargs), plain.generate(tiny_model, enc, **kwargs))


@pytest.mark.parametrize("mode", MODES)
def test_first_step_logits_match_two_independent_passes(tiny_model, tokenizer, mode):
    strength = 1.6
    enc = encode_highlighted(tokenizer, PROMPTS)
    got = spa(tokenizer, strength=strength, mask_mode=mode).prompt_logits(tiny_model, enc)
    for i, (ids, highlight) in enumerate(unpadded_rows(enc)):
        aux, placeholder = collapsed(ids, highlight)
        main = last_logits(tiny_model, ids)
        masked = last_logits(tiny_model, aux, placeholder if mode == "attention" else None)
        expected = main + (strength - 1) * (main - masked)
        torch.testing.assert_close(got[i].double(), expected, rtol=1e-4, atol=1e-4, msg=f"row {i}")
    # the contrast is real: highlighted rows move, the row without a highlight does not
    plain = HighlightMethod().prompt_logits(tiny_model, enc)
    assert (got[:3] - plain[:3]).abs().amax(-1).min() > 1e-2
    torch.testing.assert_close(got[3], plain[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_cached_generation_equals_full_rerun_reference(tiny_model, tokenizer, mode):
    strength, steps = 3.0, 5
    enc = encode_highlighted(tokenizer, PROMPTS)
    got = spa(tokenizer, strength=strength, mask_mode=mode).generate(
        tiny_model, enc, max_new_tokens=steps, pad_token_id=tokenizer.pad_token_id
    )
    for i, (ids, highlight) in enumerate(unpadded_rows(enc)):
        expected = slow_reference(tiny_model, ids, highlight, strength=strength, mode=mode, steps=steps)
        assert got[i].tolist() == expected, f"row {i}"
    plain = HighlightMethod().generate(tiny_model, enc, max_new_tokens=steps, pad_token_id=tokenizer.pad_token_id)
    assert not torch.equal(got[:3], plain[:3])  # anchoring changed some continuation


def test_batched_generation_equals_rows_one_by_one(tiny_model, tokenizer):
    method = spa(tokenizer, strength=2.5)
    kwargs = {"max_new_tokens": 6, "pad_token_id": tokenizer.pad_token_id}
    batched = method.generate(tiny_model, encode_highlighted(tokenizer, PROMPTS), **kwargs)
    for i, prompt in enumerate(PROMPTS):
        alone = method.generate(tiny_model, encode_highlighted(tokenizer, [prompt]), **kwargs)
        assert torch.equal(batched[i], alone[0]), f"row {i}"


def test_prompt_without_highlight_gives_the_plain_continuation(tiny_model, tokenizer):
    kwargs = {"max_new_tokens": 6, "pad_token_id": tokenizer.pad_token_id}
    enc = encode_highlighted(tokenizer, PROMPTS)
    got = spa(tokenizer, strength=20.0).generate(tiny_model, enc, **kwargs)
    alone = HighlightMethod().generate(tiny_model, encode_highlighted(tokenizer, [PROMPTS[3]]), **kwargs)
    assert torch.equal(got[3], alone[0])


def test_rows_are_padded_after_eos_and_length_is_max_new_tokens(tiny_model, tokenizer):
    method = spa(tokenizer, strength=3.0)
    enc = encode_highlighted(tokenizer, PROMPTS)
    pad = tokenizer.pad_token_id
    free = method.generate(tiny_model, enc, max_new_tokens=6, pad_token_id=pad)
    eos = int(free[0, 2])  # make row 0's third token the EOS
    tiny_model.generation_config.eos_token_id = eos
    stopped = method.generate(tiny_model, enc, max_new_tokens=6, pad_token_id=pad)
    assert stopped.shape == (len(PROMPTS), 6)
    for row_free, row_stopped in zip(free.tolist(), stopped.tolist(), strict=True):
        end = row_free.index(eos) + 1 if eos in row_free else len(row_free)
        assert row_stopped == row_free[:end] + [pad] * (len(row_free) - end)
    assert stopped[0, 3:].eq(pad).all()


def test_mask_token_choice_and_errors(tokenizer):
    assert spa(tokenizer).mask_token_id == tokenizer.pad_token_id
    assert spa(tokenizer, mask_token="<eos>").mask_token_id == tokenizer.eos_token_id
    with pytest.raises(ValueError, match=r"mask_token='silver lanterns' is \d+ tokens for this tokenizer"):
        spa(tokenizer, mask_token="silver lanterns")
    with pytest.raises(ValueError, match=r"mask_mode must be one of \('pad', 'attention'\), got 'embed'"):
        SpaMethod(mask_mode="embed")
    with pytest.raises(ValueError, match="strength must be a finite number, got nan"):
        SpaMethod(strength=float("nan"))
    with pytest.raises(RuntimeError, match=r"SpaMethod.setup\(\) must run before the first batch"):
        SpaMethod().prompt_logits(None, encode_highlighted(tokenizer, PROMPTS[:1]))
    assert SpaMethod(strength=20.0).describe() == {
        "method": "spa",
        "strength": 20.0,
        "mask_mode": "attention",
        "mask_token": None,
    }
