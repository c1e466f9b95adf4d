"""PASTA head profiling: the examples, the written head set, and one head's score recomputed through the KV cache."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from seka_lightning.baselines.pasta import PastaMethod
from seka_lightning.baselines.pasta_profile import encode_examples, profile_examples, profile_heads
from seka_lightning.data.triplets import read_pairs
from seka_lightning.highlight import token_highlight_mask
from seka_lightning.models import load_model

PAIR = {
    "context_1": "The keepers carry silver lanterns.",
    "question_1": "What do the keepers carry?",
    "answer_1": "silver lanterns",
    "context_2": "A tower stands in the valley.",
    "question_2": "Where does the tower stand?",
    "answer_2": "the valley",
}


def test_four_prompts_per_pair_with_the_answer_context_highlighted():
    examples = profile_examples([PAIR])
    assert [ex.prompt for ex in examples] == [
        "Context: The keepers carry silver lanterns. A tower stands in the valley.\n"
        "Question: What do the keepers carry?\nAnswer:",
        "Context: A tower stands in the valley. The keepers carry silver lanterns.\n"
        "Question: What do the keepers carry?\nAnswer:",
        "Context: A tower stands in the valley. The keepers carry silver lanterns.\n"
        "Question: Where does the tower stand?\nAnswer:",
        "Context: The keepers carry silver lanterns. A tower stands in the valley.\n"
        "Question: Where does the tower stand?\nAnswer:",
    ]
    highlighted = [ex.prompt[slice(*ex.highlight)] for ex in examples]
    assert highlighted == [PAIR["context_1"]] * 2 + [PAIR["context_2"]] * 2
    assert [ex.answer for ex in examples] == ["silver lanterns"] * 2 + ["the valley"] * 2


def test_answer_tokens_are_the_row_suffix(tokenizer):
    examples = profile_examples([PAIR])
    enc, answers = encode_examples(tokenizer, examples)
    for i, ex in enumerate(examples):
        ids = enc["input_ids"][i][answers[i]]
        assert tokenizer.decode(ids) == f" {ex.answer}"
        assert not (enc["highlight_mask"][i] & answers[i]).any()


def recomputed_score(model, tokenizer, examples, layer: int, head: int) -> float:
    """Mean answer log-likelihood gain of PASTA on one head, through the KV cache: the prompt is prefilled under
    PASTA, then the answer tokens are fed one at a time as decode steps (no bias on their keys)."""
    method = PastaMethod({layer: [head]}, alpha=0.01)
    method.setup(model, tokenizer)
    gains = []
    for ex in examples:
        text = f"{ex.prompt} {ex.answer}"
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([encoded["input_ids"]])
        is_answer = torch.tensor([start >= len(ex.prompt) for start, _ in encoded["offset_mapping"]])
        prompt_len = int((~is_answer).sum())
        highlight = torch.tensor([token_highlight_mask(encoded["offset_mapping"][:prompt_len], [ex.highlight])])
        targets = ids[0, prompt_len:]
        with torch.no_grad():
            plain = F.log_softmax(model(input_ids=ids).logits[0, prompt_len - 1 : -1], -1)
            base = plain.gather(-1, targets[:, None]).sum()
            enc = {
                "input_ids": ids[:, :prompt_len],
                "attention_mask": torch.ones(1, prompt_len, dtype=torch.long),
                "highlight_mask": highlight,
            }
            steered = 0.0
            with method.active(model, enc):
                out = model(input_ids=enc["input_ids"], use_cache=True)
                for token in targets:
                    steered += F.log_softmax(out.logits[0, -1], -1)[token]
                    out = model(input_ids=token.view(1, 1), cache=out.cache, use_cache=True)
        gains.append(float(steered - base))
    return sum(gains) / len(gains)


def test_profile_writes_top_k_heads_whose_score_matches_a_direct_recomputation(tiny_model_dir, qa_file, tmp_path):
    output = tmp_path / "heads" / "pasta.json"
    written = profile_heads(
        pretrained=str(tiny_model_dir),
        data=str(qa_file),
        output=str(output),
        max_samples=2,
        top_k=3,
        batch_size=3,
        dtype="float64",
        heads_per_pass=5,  # groups cross layer boundaries (12 candidates)
    )
    assert written == str(output)
    result = json.loads(output.read_text())
    assert result["settings"]["prompts"] == 8 and result["settings"]["top_k"] == 3
    scores = torch.tensor([result["scores"][str(layer)] for layer in range(3)], dtype=torch.float64)  # [3, 4]
    assert scores.shape == (3, 4)
    chosen = sorted((int(layer), head) for layer, heads in result["layers"].items() for head in heads)
    best = scores.flatten().topk(3).indices
    assert chosen == sorted((int(i) // 4, int(i) % 4) for i in best)
    assert not list(output.parent.glob(".*.tmp"))

    model, tokenizer = load_model(str(tiny_model_dir), dtype="float64")
    examples = profile_examples(read_pairs(qa_file, max_samples=2))
    for layer, head in [chosen[0], (2, 3)]:
        expected = recomputed_score(model, tokenizer, examples, layer, head)
        assert scores[layer, head].item() == pytest.approx(expected, abs=1e-9)
    assert PastaMethod(str(output)).describe()["heads"] == str(output)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 13}, r"top_k=13 exceeds the model's 12 \(layer, head\) pairs \(3 layers x 4 heads\)"),
        ({"top_k": 0}, r"top_k must be >= 1, got 0"),
        ({"alpha": 1.5}, r"alpha must be in \(0, 1\), got 1.5"),
        ({"heads_per_pass": 0}, r"heads_per_pass must be >= 1, got 0"),
    ],
)
def test_profile_settings_are_checked(tiny_model_dir, qa_file, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        profile_heads(pretrained=str(tiny_model_dir), data=str(qa_file), output=str(tmp_path / "h.json"), **kwargs)
    assert not (tmp_path / "h.json").exists()
