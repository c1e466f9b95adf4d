"""evaluate(): one loop for predict, search and results runners; its metrics equal an independent float64 computation."""

from __future__ import annotations

from pathlib import Path

import torch

from seka_lightning import load_model
from seka_lightning.benchmarks import CounterFactDataModule, evaluate
from seka_lightning.methods import HighlightMethod

CASES = [
    (0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French", ["{} speaks", "{} grew up speaking"]),
    (1, "Toyota", "{} is based in", "Germany", "Japan", ["The headquarters of {} are in"]),
    (2, "the keepers", "What {} carry is", "silver", "stone", ["People say {} carry", "It is known {} carry"]),
]


def first_token_logprob(logp: torch.Tensor, tokenizer, target: str) -> float:
    forms = {target.lower(), target[0].upper() + target[1:], target.upper()}
    return max(logp[tokenizer.encode(form, add_special_tokens=False)[0]].item() for form in forms)


def reference(model, tokenizer) -> dict[str, float]:
    """Each prompt alone and unpadded, in float64: efficacy on the first paraphrase, paraphrase = mean fraction won."""
    efficacy, paraphrase = [], []
    for _, subject, template, new, old, paraphrases in CASES:
        rewrite = template.format(subject)
        wins = []
        for query in (p.format(subject) for p in paraphrases):
            text = f"Previously {rewrite} {old}. Currently {rewrite} {new}. {query}"
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)
            wins.append(float(first_token_logprob(logp, tokenizer, new) > first_token_logprob(logp, tokenizer, old)))
        efficacy.append(wins[0])
        paraphrase.append(sum(wins) / len(wins))
    return {"efficacy_score": sum(efficacy) / len(efficacy), "paraphrase_score": sum(paraphrase) / len(paraphrase)}


def test_evaluate_matches_a_float64_reference_and_returns_one_row_per_prompt(
    tiny_model_dir: Path, counterfact_file
) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    benchmark = CounterFactDataModule(str(counterfact_file(CASES)), split="all", batch_size=3)
    result = evaluate(HighlightMethod(), model, tokenizer, benchmark)
    expected = reference(model, tokenizer)
    assert result.metrics["efficacy_score"] == expected["efficacy_score"]
    assert result.metrics["paraphrase_score"] == expected["paraphrase_score"]
    assert [row["uid"] for row in result.records] == [example.uid for example in benchmark.examples]
    assert result.skipped_highlight == []
    # A second run gets a fresh scorer: the metrics do not accumulate across calls.
    assert evaluate(HighlightMethod(), model, tokenizer, benchmark).metrics == result.metrics
