"""Same-pass query capture agrees with queries recomputed from hidden states on every supported family layout."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from seka_lightning.adaseka.experts import ExpertSet
from seka_lightning.adaseka.method import AdaSekaMethod

from .conftest import random_expert

GEOMETRY = dict(
    vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
)  # fmt: skip
FAMILIES = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, {"sliding_window": 8}),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, {}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"pad_token_id": 0}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_pass_equals_separate_pass_on_the_first_layer(family):
    config_cls, model_cls, extra = FAMILIES[family]
    config = dict(GEOMETRY)
    if family == "phi3":
        config.pop("head_dim")
    torch.manual_seed(0)
    model = model_cls(config_cls(**config, **extra)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    experts = ExpertSet.from_banks({name: random_expert(seed, layers=2) for seed, name in enumerate(("a", "b", "c"))})
    experts = ExpertSet(experts.names, {k: (u.double(), s.double()) for k, (u, s) in experts.factors.items()}, 2, 16)
    input_ids = torch.randint(3, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    highlight = torch.zeros(1, 9, dtype=torch.bool)
    highlight[0, 2:5] = True
    enc = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "highlight_mask": highlight}
    logits = {}
    for compat in ([], ["separate_pass"]):
        method = AdaSekaMethod({"x": "x"}, gain=3.0, layers="0", compat=compat)
        method.expert_set = experts
        logits[bool(compat)] = method.prompt_logits(model, enc)
    plain = model(input_ids=input_ids).logits[:, -1]
    assert (logits[False] - plain).abs().max() > 1e-6
    torch.testing.assert_close(logits[False], logits[True], rtol=1e-10, atol=1e-10)
