"""Highlight input that used to be misread now fails clearly (or is read exactly): nesting, chat messages, length,
marker characters inside benchmark text, and prompts without a highlight in ``seka predict``."""

from __future__ import annotations

import copy

import pytest
import torch

from seka_lightning import ProjectionBank
from seka_lightning.highlight import (
    apply_chat_template,
    encode_highlighted,
    encode_spans,
    strip_markers,
    template_spans,
)
from seka_lightning.lit.evaluator import encode_examples
from seka_lightning.lit.generation import HighlightGenerator
from seka_lightning.methods import SekaMethod
from seka_lightning.steering import NoEditWarning


def test_nested_default_markers_are_an_error():
    with pytest.raises(ValueError) as err:
        strip_markers("A **b **c** d** e", index=3)
    assert str(err.value) == (
        "prompt 3: nested highlight: the '**' at character 6 opens a span inside the one opened at character 2 "
        "(context: '**b **c** d** e'); highlights cannot nest, so close the outer span first, and write a closing "
        "'**' right after the highlighted text (no space before it)"
    )


@pytest.mark.parametrize(
    ("text", "plain", "highlights"),
    [
        ("**a** and **b**", "a and b", ["a", "b"]),
        ("Say **north** or **south**, **now**.", "Say north or south, now.", ["north", "south", "now"]),
        ("in**word**s and **b**", "inwords and b", ["word", "b"]),
        ("**x **y", "x y", ["x "]),  # two markers: one reading only, kept as before
    ],
)
def test_flat_spans_stay_flat(text, plain, highlights):
    got, spans = strip_markers(text)
    assert got == plain and [got[s:e] for s, e in spans] == highlights


def reference_chat(tokenizer, plain: str, spans: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Independent reference: template the plain text, find it (it occurs once) and shift the spans."""
    templated = apply_chat_template(tokenizer, plain)
    assert templated.count(plain) == 1
    shift = templated.index(plain)
    return encode_spans(tokenizer, [templated], [[(s + shift, e + shift) for s, e in spans]])


def test_chat_spans_land_where_the_user_text_is(tokenizer):
    enc = encode_highlighted(tokenizer, ["What glows? **The golden tower** glows."], chat=True)
    ref = reference_chat(tokenizer, "What glows? The golden tower glows.", [(12, 28)])
    assert all(torch.equal(enc[k], ref[k]) for k in ref)


def test_trimming_templates_clip_the_spans(tokenizer):
    trimming = copy.deepcopy(tokenizer)
    trimming.chat_template = (
        "{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] | trim }}<eos>\n{% endfor %}<bos>assistant\n"
    )
    enc = encode_highlighted(trimming, ["  The **silver lanterns** glow.  "], chat=True)
    ref = encode_spans(trimming, ["<bos>user\nThe silver lanterns glow.<eos>\n<bos>assistant"], [[(14, 29)]])
    assert all(torch.equal(enc[k], ref[k]) for k in ref)


def test_templates_that_rewrite_the_message_are_an_error(tokenizer):
    shouting = copy.deepcopy(tokenizer)
    shouting.chat_template = "{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(ValueError) as err:
        encode_highlighted(shouting, ["plain", "The **moon** rises."], chat=True)
    assert str(err.value) == (
        "prompt 1: the chat template rewrites the user message (it is not found verbatim in the templated prompt), "
        "so its highlights cannot be placed; pass chat=False and apply the template yourself"
    )
    assert encode_highlighted(shouting, ["no highlight here"], chat=True)["highlight_mask"].sum() == 0


def test_markers_in_the_system_prompt_are_an_error(tokenizer):
    with pytest.raises(ValueError) as err:
        encode_highlighted(tokenizer, ["The **moon** rises."], chat=True, system="Be **brief")
    assert str(err.value) == (
        "the system prompt contains the highlight marker '**' at character 3 (context: 'Be **brief'); highlights "
        "belong in the prompts: remove the marker from the system prompt"
    )


def test_an_unbalanced_message_is_caught_before_templating(tokenizer):
    """Character 4 of the message itself, not of the templated text (its markers never reach the template)."""
    with pytest.raises(ValueError, match=r"^prompt 1: unbalanced highlight marker '\*\*' at character 4 "):
        encode_highlighted(tokenizer, ["fine", "The **moon rises."], chat=True, system="Answer briefly.")


def test_prompt_longer_than_the_model_is_an_error_before_compute(tokenizer):
    text = "the river " * 200 + "**moon**"
    n = len(tokenizer(text.replace("**", ""), add_special_tokens=False)["input_ids"])
    assert n > 256
    with pytest.raises(ValueError) as err:
        encode_highlighted(tokenizer, ["short **one**", text], max_positions=256)
    assert str(err.value) == (
        f"prompt 1 is {n} tokens long but the model has only 256 positions (max_position_embeddings); pass "
        "max_length to truncate it (truncation_side='left' keeps its end) or shorten the prompt"
    )
    enc = encode_highlighted(tokenizer, ["short **one**", text], max_positions=256, max_length=256)
    assert enc["input_ids"].shape[1] == 256 and enc["highlight_mask"][1].any()


@pytest.mark.parametrize("chat", [False, True])
def test_benchmark_text_with_the_old_span_markers_encodes_exactly(tokenizer, chat):
    text = "The \u27e6keepers\u27e7 carry silver lanterns \u27e6 home."
    spans = [(text.index("silver"), text.index("silver") + len("silver lanterns"))]
    enc = encode_examples(tokenizer, [{"text": text, "spans": [list(s) for s in spans]}], chat=chat)
    ref = reference_chat(tokenizer, text, spans) if chat else encode_spans(tokenizer, [text], [spans])
    assert all(torch.equal(enc[k], ref[k]) for k in ref)
    assert tokenizer.decode(enc["input_ids"][0][enc["highlight_mask"][0]]).strip() == "silver lanterns"


def test_template_spans_without_spans_is_the_plain_template(tokenizer):
    assert template_spans(tokenizer, "a b", []) == (apply_chat_template(tokenizer, "a b"), [])


@pytest.fixture
def generator(tiny_model_dir, tmp_path) -> HighlightGenerator:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 2, 16, 16, generator=gen))
    bank = ProjectionBank(layers=[0, 1, 2], pos=q[..., :4] @ q[..., :4].transpose(-1, -2), metadata={"num_layers": 3})
    bank.save(tmp_path / "bank.safetensors")
    return HighlightGenerator(str(tiny_model_dir), SekaMethod(str(tmp_path / "bank.safetensors")), max_new_tokens=2)


def test_predict_warns_with_a_count_of_unhighlighted_prompts(generator):
    generator.on_predict_start()
    prompts = ["The **moon** rises.", "plain one", "plain two", "The **tower** stands.", "plain three"]
    records = [{"index": i, "prompt": p} for i, p in enumerate(prompts)]
    generator.predict_step(records[:2], 0)
    generator.predict_step(records[2:], 1)
    with pytest.warns(NoEditWarning) as record:
        generator.on_predict_end()
    assert [str(w.message) for w in record] == [
        "3 of 5 prompts carry no highlight (prompts 1, 2, 4); steering leaves them unchanged: mark the text to "
        "highlight as **text**"
    ]


def test_predict_refuses_an_overlong_prompt_before_generating(generator, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("generation ran")

    monkeypatch.setattr(generator, "_generate", no_generation)
    long = "the river " * 200 + "**moon**"
    with pytest.raises(ValueError, match=r"^prompt 1 is \d+ tokens long but the model has only 256 positions"):
        generator.predict_step([{"index": 0, "prompt": "ok"}, {"index": 1, "prompt": long}], 0)
    generator.hparams.max_length = 200
    monkeypatch.undo()
    out = generator.predict_step([{"index": 1, "prompt": long}], 0)
    assert out[0]["highlighted_tokens"] > 0
