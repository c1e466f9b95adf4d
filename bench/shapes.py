"""Stand-ins for real checkpoints: Qwen3-shaped models with random weights built on the device, and an offline
tokenizer. Speed and memory depend on the shapes, not on the weights, so no download is needed to measure them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from seka_lightning.models import freeze

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Qwen3 decoder that decide its cost."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int = 40960

    def config(self, *, attn_implementation: str = "sdpa") -> Qwen3Config:
        return Qwen3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_positions,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,  # random weights emit any id; no EOS keeps every generation at its full length
            attn_implementation=attn_implementation,
        )

    def describe(self) -> dict:
        return asdict(self)


SHAPES: dict[str, ModelShape] = {
    # Qwen/Qwen3-8B's config.json
    "qwen3-8b": ModelShape("qwen3-8b", 36, 4096, 32, 8, 128, 12288, 151936),
    "qwen3-4b": ModelShape("qwen3-4b", 36, 2560, 32, 8, 128, 9728, 151936),
    # for CPU smoke tests: every code path, none of the cost (the 8B's context too, so its 32k-token runs work)
    "tiny": ModelShape("tiny", 2, 64, 4, 2, 16, 128, 512),
}


def get_shape(name: str) -> ModelShape:
    if name not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {name!r}")
    return SHAPES[name]


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def random_model(
    shape: ModelShape,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> Qwen3ForCausalLM:
    """A frozen Qwen3 of ``shape`` with random weights (transformers' init: N(0, 0.02), unit norms).

    Built directly on ``device`` in ``dtype`` (no float32 or CPU copy of an 8B model ever exists).
    """
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = Qwen3ForCausalLM(shape.config(attn_implementation=attn_implementation))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return freeze(model)


def offline_tokenizer(texts: Iterable[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` in memory (no hub access), ids below ``vocab_size``.

    Trained on the benchmark's own data, it splits that data into about as many tokens as a real tokenizer does.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1], bos_token=SPECIAL_TOKENS[2]
    )
    fast.padding_side = "left"
    return fast


def save_checkpoint(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Save model and tokenizer like a hub checkpoint, so ``seka fit --model.pretrained PATH`` loads them."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
