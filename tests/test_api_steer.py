"""Steering from Python: steer() with the encoding dict, generate_highlighted with expanded batches, chat messages
and the tokenizer's special-token convention in encode_highlighted."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import processors

from seka_lightning import ProjectionBank, encode_highlighted, generate_highlighted, steer
from seka_lightning.generate import expand_highlight

PROMPTS = [
    "Previously the keepers carried **silver lanterns** across the north harbor. What do they carry?",
    "The **golden tower** stands in the valley. Where?",
]


def random_bank(seed: int = 0) -> ProjectionBank:
    gen = torch.Generator().manual_seed(seed)

    def projectors() -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(3, 2, 16, 16, generator=gen))
        return q[..., :4] @ q[..., :4].transpose(-1, -2)

    return ProjectionBank(layers=[0, 1, 2], pos=projectors(), neg=projectors(), metadata={"num_layers": 3})


def inputs_of(enc):
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_steer_takes_the_encoding_dict(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    bank = random_bank()
    with steer(tiny_model, bank, enc["highlight_mask"], gain_pos=3.0):
        by_mask = tiny_model(**inputs_of(enc)).logits
    with steer(tiny_model, bank, enc, gain_pos=3.0):
        by_dict = tiny_model(**inputs_of(enc)).logits
    plain = tiny_model(**inputs_of(enc)).logits
    assert torch.equal(by_mask, by_dict) and not torch.allclose(by_dict, plain)
    with pytest.raises(
        ValueError, match="the encoding has no 'highlight_mask' \\(it has \\['attention_mask', 'input_ids'\\]\\)"
    ):
        with steer(tiny_model, bank, inputs_of(enc)):
            pass


def steered_generate(model, bank, enc, mask, **kwargs):
    """The reference: the hooks of steer() with a mask already shaped like generate's internal batch."""
    with steer(model, bank, mask, gain_pos=4.0):
        return model.generate(**inputs_of(enc), **kwargs)


GREEDY = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}


def test_generate_highlighted_equals_steer_then_generate(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    bank = random_bank()
    out = generate_highlighted(tiny_model, bank, enc, gain_pos=4.0, **GREEDY)
    assert torch.equal(out, steered_generate(tiny_model, bank, enc, enc["highlight_mask"], **GREEDY))
    assert not torch.equal(out, tiny_model.generate(**inputs_of(enc), **GREEDY)), "steering must change the output"
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in tiny_model.modules())


def test_beam_search_with_several_returned_sequences_expands_each_prompt_in_place(tiny_model, tokenizer):
    """transformers runs each prompt's row max(num_beams, num_return_sequences) times, rows of one prompt adjacent;
    the highlight rows must follow (repeat_interleave), and a block-wise repeat would steer the wrong prompts."""
    enc = encode_highlighted(tokenizer, PROMPTS)
    mask = enc["highlight_mask"]
    assert not torch.equal(mask[0], mask[1]), "the prompts must differ for the order to matter"
    bank = random_bank()
    kwargs = {**GREEDY, "num_beams": 2, "num_return_sequences": 2}
    out = generate_highlighted(tiny_model, bank, enc, gain_pos=4.0, **kwargs)
    assert out.shape[0] == 4
    assert torch.equal(out, steered_generate(tiny_model, bank, enc, mask.repeat_interleave(2, dim=0), **kwargs))
    assert not torch.equal(out, steered_generate(tiny_model, bank, enc, mask.repeat(2, 1), **kwargs))
    with pytest.raises(ValueError, match="the highlight mask has 2 rows but the batch has 4"):
        steered_generate(tiny_model, bank, enc, mask, **kwargs)  # what plain steer() does with beams


def test_sampled_sequences_are_steered_like_a_manually_expanded_batch(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    bank = random_bank()
    kwargs = {"max_new_tokens": 5, "do_sample": True, "num_return_sequences": 3, "pad_token_id": 0}
    torch.manual_seed(7)
    out = generate_highlighted(tiny_model, bank, enc, gain_pos=4.0, **kwargs)
    torch.manual_seed(7)
    reference = steered_generate(tiny_model, bank, enc, enc["highlight_mask"].repeat_interleave(3, dim=0), **kwargs)
    assert out.shape[0] == 6 and torch.equal(out, reference)


def test_generate_highlighted_refuses_mismatched_inputs(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    bank = random_bank()
    with pytest.raises(ValueError, match=r"\['input_ids'\] come from enc; pass them there"):
        generate_highlighted(tiny_model, bank, enc, input_ids=enc["input_ids"])
    with pytest.raises(ValueError, match="differ in shape"):
        generate_highlighted(tiny_model, bank, {**enc, "highlight_mask": enc["highlight_mask"][:1]}, **GREEDY)
    with pytest.raises(ValueError, match="generate runs 5 rows for a highlight mask of 2"):
        expand_highlight(enc["highlight_mask"], 5)


def highlighted_text(tokenizer, enc, row: int) -> str:
    return tokenizer.decode(enc["input_ids"][row][enc["highlight_mask"][row]])


def test_chat_messages_are_templated_and_highlighted_inside_their_contents(tokenizer):
    chat = [
        {"role": "system", "content": "Trust the **latest** fact."},
        {"role": "user", "content": "What glows? **The golden tower** glows."},
    ]
    enc = encode_highlighted(tokenizer, chat)
    text = tokenizer.decode(enc["input_ids"][0])
    assert text == (
        "<bos>system\nTrust the latest fact.<eos>\n<bos>user\nWhat glows? The golden tower glows.<eos>\n<bos>assistant\n"
    )
    assert highlighted_text(tokenizer, enc, 0).split() == ["latest", "The", "golden", "tower"]
    # a user-only chat is what chat=True makes of the plain prompt
    same = encode_highlighted(tokenizer, chat[1]["content"], chat=True)
    assert all(torch.equal(encode_highlighted(tokenizer, chat[1:])[k], same[k]) for k in same)
    batch = encode_highlighted(tokenizer, [chat, chat[1:]])
    assert batch["input_ids"].shape[0] == 2
    assert highlighted_text(tokenizer, batch, 1).strip() == "The golden tower"


def test_bad_chats_are_refused(tokenizer):
    with pytest.raises(ValueError, match="chat 0, message 1: 'content' must be a string"):
        encode_highlighted(tokenizer, [{"role": "user", "content": "a"}, {"role": "user", "content": None}])
    with pytest.raises(ValueError, match="chat=True and system= apply to plain-text prompts"):
        encode_highlighted(tokenizer, [{"role": "user", "content": "a"}], system="be brief")
    marked = copy.deepcopy(tokenizer)
    marked.chat_template = "{% for m in messages %}**{{ m['content'] }}**{% endfor %}"
    with pytest.raises(ValueError, match="chat 0: the chat template adds text containing the markers"):
        encode_highlighted(marked, [{"role": "user", "content": "plain"}])
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat 0: the tokenizer has no chat template"):
        encode_highlighted(bare, [{"role": "user", "content": "a"}])


@pytest.fixture
def bos_tokenizer(tokenizer):
    """The test tokenizer with a post-processor that puts <bos> first, as Llama's and Gemma's do."""
    bos = copy.deepcopy(tokenizer)
    bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos.bos_token_id)]
    )
    return bos


def test_special_tokens_follow_the_tokenizer(tokenizer, bos_tokenizer):
    prompt = "The **golden tower** stands."
    bare = encode_highlighted(bos_tokenizer, prompt, add_special_tokens=False)["input_ids"][0].tolist()
    default = encode_highlighted(bos_tokenizer, prompt)
    assert default["input_ids"][0].tolist() == [bos_tokenizer.bos_token_id, *bare]
    assert highlighted_text(bos_tokenizer, default, 0).strip() == "golden tower"
    # chat-templated text carries the template's own tokens: nothing is added (no double BOS)
    chat = encode_highlighted(bos_tokenizer, prompt, chat=True)["input_ids"][0].tolist()
    assert (
        chat == encode_highlighted(bos_tokenizer, prompt, chat=True, add_special_tokens=False)["input_ids"][0].tolist()
    )
    assert chat[:2] != [bos_tokenizer.bos_token_id] * 2
    # a tokenizer that adds no BOS (the session tokenizer: byte-level post-processing only) is encoded as before
    assert torch.equal(
        encode_highlighted(tokenizer, prompt)["input_ids"],
        encode_highlighted(tokenizer, prompt, add_special_tokens=False)["input_ids"],
    )
