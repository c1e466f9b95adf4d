"""Shared fixtures: tiny random-weight models with a tokenizer trained in the test session."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

if not torch.cuda.is_available():  # before seka_lightning.split_kv is imported: its Triton kernel runs interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from seka_lightning.families import keys_view, resolve_layout


def gqa_attention_reference(query, key, value, mask, scale: float) -> torch.Tensor:
    """Grouped-query attention in float64, written out: ``[B, H, Q, D]`` -> ``[B, Q, H, D]`` (``mask``: boolean,
    True = attend, broadcast over heads and queries; None = every position)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.double().repeat_interleave(groups, 1), value.double().repeat_interleave(groups, 1)
    scores = query.double() @ key.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2)


def tiny_gemma3(vocab_size: int, *, sliding_window: int, head_dim: int = 8, kv_heads: int = 2):
    """A random Gemma-3 with sliding-window layers around a full one (no EOS, so every step decodes)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], attn_implementation="sdpa",
        pad_token_id=0, bos_token_id=2, eos_token_id=None,
    )  # fmt: skip
    model = Gemma3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def capture_keys(model, enc) -> list[torch.Tensor]:
    """Every layer's keys ``[B, T, H, d]`` in one forward on ``enc``'s ids and mask, as the model computes them
    (hooks registered after steering hooks see the edit)."""
    layout = resolve_layout(model)
    seen: list[torch.Tensor] = []
    handles = [
        s.key_module.register_forward_hook(
            lambda m, a, out, s=s: seen.append(keys_view(out, s, layout).detach().clone())
        )
        for s in layout.layers
    ]
    try:
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return seen


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

WORDS = (
    "the a of in on at under above river tower lantern garden orchard glass silver golden ancient city village "
    "keepers guard carry produce grow shine glow whisper travel north south east west moon sun wind rain storm "
    "stone iron velvet crystal ember azure scarlet harbor market bridge castle forest desert valley mountain "
    "question context answer what where when who how many which does do is are was were by with from into"
).split()


def tiny_litm_predict_args(
    model_dir: Path, oracle: Path, *, gold_positions: str, example_subset: str, batch_size: int
) -> list[str]:
    """``seka predict`` arguments for a tiny lost-in-the-middle run on the CPU: the oracle file's questions
    ``example_subset`` with 4 documents, the gold one at each of ``gold_positions``, 4 new tokens, SEKA's plain
    highlight method, no logger or progress bar (add callbacks and devices)."""
    return [
        "predict",
        "--model", "seka_lightning.lit.evaluator.BenchmarkEvaluator",
        "--model.pretrained", str(model_dir),
        "--model.method", "seka_lightning.methods.HighlightMethod",
        "--data", "seka_lightning.benchmarks.LostInTheMiddleDataModule",
        "--data.path", str(oracle),
        "--data.num_documents", "4",
        "--data.gold_positions", gold_positions,
        "--data.example_subset", example_subset,
        "--data.max_new_tokens", "4",
        "--data.batch_size", str(batch_size),
        "--trainer.accelerator", "cpu",
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def printed_predict_config(*args: str) -> dict:
    """``seka predict -c configs/eval/counterfact.yaml ARGS --print_config`` in a fresh process (nothing imported
    beforehand, as for a user), parsed."""
    argv = [
        sys.executable,
        "-m",
        "seka_lightning.cli",
        "predict",
        "-c",
        str(REPO / "configs" / "eval" / "counterfact.yaml"),
    ]
    out = subprocess.run([*argv, *args, "--print_config"], capture_output=True, text=True, check=True).stdout
    return yaml.safe_load(out)


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
    lines += ["Question: What do the keepers carry?\nContext: The keepers carry silver lanterns. "] * 5
    return lines


def train_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small in-memory corpus (offsets work like GPT-2/Llama-3 style)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    fast.padding_side = "left"
    fast.chat_template = (
        "{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
        "{% if add_generation_prompt %}<bos>assistant\n{% endif %}"
    )
    return fast


def tiny_llama(vocab_size: int, *, layers: int = 3, seed: int = 0, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation=attn,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger-than-default weights so keys and logits move visibly
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny Llama saved like a real checkpoint (config, safetensors, tokenizer), for `load_model` and the CLI."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_model(tokenizer: PreTrainedTokenizerFast):
    return tiny_llama(len(tokenizer))


@pytest.fixture
def default_dtype():
    """Restore torch's default dtype after a test that changes it."""
    before = torch.get_default_dtype()
    yield
    torch.set_default_dtype(before)


def write_qa_pairs(path: Path, n: int = 24, seed: int = 0) -> Path:
    """Synthetic QA pairs in the SPEC §3 format, varied enough that key statistics are non-degenerate."""
    rng = random.Random(seed)
    things = ["silver lanterns", "ancient stone", "golden wind", "velvet rain", "iron bridge", "crystal moon"]
    places = ["the north harbor", "the azure valley", "the ember market", "the scarlet forest", "the old castle"]
    with path.open("w") as handle:
        for i in range(n):
            a1, a2 = rng.choice(things), rng.choice(places)
            who = rng.choice(["keepers", "guards", "travelers", "villagers"])
            pair = {
                "id": i,
                "context_1": f"The {who} of {rng.choice(WORDS)} carry {a1} every {rng.choice(WORDS)}.",
                "question_1": f"What do the {who} carry?",
                "answer_1": a1,
                "context_2": f"A {rng.choice(WORDS)} tower stands in {a2} near the {rng.choice(WORDS)}.",
                "question_2": "Where does the tower stand?",
                "answer_2": a2,
            }
            handle.write(json.dumps(pair) + "\n")
    return path


@pytest.fixture
def litm_oracle(tmp_path: Path) -> Path:
    """A lost-in-the-middle source (``nq-open-oracle.jsonl.gz`` layout) of 12 questions, one gold passage each."""
    records = [
        {
            "question": f"question {i}",
            "answers": [f"answer{i}"],
            "ctxs": [{"title": f"T{i}", "text": f"Passage {i} says answer{i}.", "hasanswer": True, "isgold": True}],
            "nq_annotated_gold": {"title": f"T{i}"},
        }
        for i in range(12)
    ]
    path = tmp_path / "oracle.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in records).encode()))
    return path


@pytest.fixture
def qa_file(tmp_path: Path) -> Path:
    return write_qa_pairs(tmp_path / "qa.jsonl")


@pytest.fixture
def counterfact_file(tmp_path: Path):
    """Write CounterFact cases ``(case_id, subject, prompt template, new, true, paraphrase templates)`` in the ROME layout."""

    def write(cases, name: str = "counterfact.json") -> Path:
        records = [
            {
                "case_id": cid,
                "requested_rewrite": {
                    "prompt": tpl,
                    "subject": subj,
                    "target_new": {"str": new},
                    "target_true": {"str": old},
                },
                "paraphrase_prompts": [p.format(subj) for p in paras],
            }
            for cid, subj, tpl, new, old, paras in cases
        ]
        path = tmp_path / name
        path.write_text(json.dumps(records))
        return path

    return write


@pytest.fixture(autouse=True, scope="session")
def datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The 🤗 datasets cache (where benchmark loaders' reads are cached) in the session's temp folder, for this
    process and the ``seka`` subprocesses it starts, so tests never fill the user's ``~/.cache``."""
    import datasets

    folder = tmp_path_factory.mktemp("hf_datasets_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_DATASETS_CACHE", str(folder))
    patch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
    yield folder
    patch.undo()
