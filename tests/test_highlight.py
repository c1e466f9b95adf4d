"""Highlight encoding (SPEC §2): markers, offsets rule, padding, chat templates and every bad-input error."""

from __future__ import annotations

import pytest
import torch

from seka_lightning import encode_highlighted
from seka_lightning.highlight import encode_spans, strip_markers, token_highlight_mask


def highlighted_text(tokenizer, enc, row: int) -> str:
    ids = enc["input_ids"][row][enc["highlight_mask"][row]]
    return tokenizer.decode(ids)


def test_strip_markers_several_spans_and_newlines():
    plain, spans = strip_markers("a **b c** d **e\nf** g")
    assert plain == "a b c d e\nf g"
    assert [plain[s:e] for s, e in spans] == ["b c", "e\nf"]
    plain, spans = strip_markers("x <<y>> z", ("<<", ">>"))
    assert plain == "x y z" and spans == [(2, 3)]


def test_offsets_rule_admits_the_leading_space_token_only():
    # tokens: "The"(0,3) " keep"(3,8) "ers"(8,11) " carry"(11,17); span "keepers" = (4, 11)
    offsets = [(0, 3), (3, 8), (8, 11), (11, 17), (0, 0)]
    assert token_highlight_mask(offsets, [(4, 11)]) == [False, True, True, False, False]


def test_batch_with_different_spans_per_row_is_left_padded(tokenizer):
    enc = encode_highlighted(tokenizer, ["The keepers carry **silver lanterns** home.", "**Moon** rain."])
    assert enc["input_ids"].shape == enc["highlight_mask"].shape == enc["attention_mask"].shape
    lengths = enc["attention_mask"].sum(1)
    assert enc["attention_mask"][1, : -lengths[1]].eq(0).all() and enc["attention_mask"][1, -lengths[1] :].eq(1).all()
    assert not enc["highlight_mask"][enc["attention_mask"] == 0].any()
    assert highlighted_text(tokenizer, enc, 0).strip() == "silver lanterns"
    assert highlighted_text(tokenizer, enc, 1).strip() == "Moon"
    # same tokens as tokenizing the plain text
    plain = tokenizer(["The keepers carry silver lanterns home."], add_special_tokens=False)["input_ids"][0]
    assert enc["input_ids"][0, -len(plain) :].tolist() == plain


def test_configurable_markers_and_no_markers(tokenizer):
    enc = encode_highlighted(tokenizer, ["keep [[the moon]] bright", "plain prompt"], markers=("[[", "]]"))
    assert highlighted_text(tokenizer, enc, 0).strip() == "the moon"
    assert not enc["highlight_mask"][1].any()


def test_chat_template_keeps_highlight_inside_user_message(tokenizer):
    enc = encode_highlighted(tokenizer, ["What glows? **The golden tower** glows."], chat=True)
    text = tokenizer.decode(enc["input_ids"][0])
    assert text.startswith("<bos>user\n") and text.endswith("<bos>assistant\n")
    assert highlighted_text(tokenizer, enc, 0).strip() == "The golden tower"


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        (["ok", "a **b"], "prompt 1: unbalanced highlight marker '\\*\\*' at character 2"),
        (["x <<a <<b>> c>>"], "prompt 0: nested highlight markers in span 'a <<b'"),
        (["fine **** text"], "prompt 0: empty highlight '\\*\\*\\*\\*' at character 5"),
        (["fine **  ** text"], "prompt 0: empty highlight"),
    ],
)
def test_bad_markers_name_the_prompt_and_span(tokenizer, prompts, message):
    markers = ("<<", ">>") if "<<" in prompts[0] else ("**", "**")
    with pytest.raises(ValueError, match=message):
        encode_highlighted(tokenizer, prompts, markers=markers)


def test_span_inside_a_token_is_an_error(tokenizer):
    text = "Question: What do the keepers carry?"
    offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    s, e = next((s, e) for s, e in offsets if e - s >= 3)  # a token of 3+ characters; highlight its inside
    with pytest.raises(ValueError, match=f"prompt 0: highlight '{text[s + 1 : e - 1]}' covers no whole token"):
        encode_spans(tokenizer, [text], [[(s + 1, e - 1)]])


def test_truncation_that_cuts_a_highlight_is_an_error(tokenizer):
    prompt = "**The keepers carry** silver lanterns across the north harbor every night."
    with pytest.raises(
        ValueError, match="prompt 0: highlight 'The keepers carry' is cut off by truncation to 30 tokens"
    ):
        encode_highlighted(tokenizer, [prompt], max_length=30)
    enc = encode_highlighted(tokenizer, [prompt], max_length=30, truncation_side="right")
    assert enc["input_ids"].shape[1] == 30 and enc["highlight_mask"].any()


def test_empty_batch_and_slow_tokenizer_errors(tokenizer):
    with pytest.raises(ValueError, match="no prompts to encode"):
        encode_highlighted(tokenizer, [])

    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="slow tokenizer without offset mapping"):
        encode_spans(Slow(), ["a"], [[]])


def test_mask_dtype_is_bool(tokenizer):
    assert encode_highlighted(tokenizer, "a **b**")["highlight_mask"].dtype == torch.bool
