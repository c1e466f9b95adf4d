"""Greedy decoding with a static KV cache and one compiled decode step, for every hook-based highlighting method.

Plain ``model.generate`` spends most of each decode step in Python (logits processors, stopping criteria, cache and
mask bookkeeping), far above what reading the weights costs. :class:`StaticGreedyDecoder` keeps a decode step to one
function with fixed shapes (one token per row, a preallocated cache, a full-length attention mask, positions as
tensors) and compiles it; with ``mode="reduce-overhead"`` it replays as a CUDA graph, and nothing in the loop waits
for the GPU. The prefill runs eagerly inside ``method.active(...)``: SEKA's key edit (and AdaSEKA's routing) happen
there and live on in the cache, so decode steps run with no hook at all.

During the decode steps of a compiled decoder, the model attends through
:func:`seka_lightning.decode_attention.gqa_decode_attention` (the query heads of a group against their key/value
head, reading the cache once). The prompt pass of a batch without padding gets a mask that transformers recognises as plainly causal, so it runs SDPA's
causal kernel on the prompt's own keys instead of a masked kernel over the whole cache. A left-padded batch forces a
masked kernel that computes every query against every key; ``prompt_pass="rows"`` instead runs each row's prompt
alone, without its padding (the causal kernel again), and copies its keys and values into that row's cache slots.

It produces what ``HighlightMethod.generate`` produces (greedy, ``pad_token_id`` after an EOS) for the methods whose
effect is confined to the prompt pass (``edits_decode_steps = False``): none, SEKA, the random ablation and AdaSEKA.
PASTA (a bias at every step) and SPA (a logit mix at every step) keep their own ``generate``.

One compiled step serves every decode step and every call (``dynamic=False``: no shape or Python number of the step
varies). transformers' static sliding-window layers (Gemma-3) count their tokens in a Python int, which the mask
builders and the cache update read; inside the compiled step that int changed at every step, so the step recompiled
with the int as a dynamic size and CUDA graphs recorded a new graph per value. For a cache with sliding layers the
decoder therefore builds the step's masks eagerly (transformers' own builders, the real counts) and hands the step
only whether each sliding layer is full (see :func:`_steady_sliding_counts`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from seka_lightning import split_kv as split_kernel
from seka_lightning.decode_attention import gqa_decoding
from seka_lightning.families import head_geometry
from seka_lightning.fused_projections import ProjectionFusion
from seka_lightning.methods import Encoded, HighlightMethod, position_ids_for

log = logging.getLogger(__name__)

# the builders of the decode steps' masks per layer type, for models whose cache has sliding-window layers
MASK_BUILDERS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}

# generation_config fields that make `generate`'s greedy output differ from a plain argmax, with their neutral values
NEUTRAL_GENERATION = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": 0,
    "num_beams": 1,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "bad_words_ids": None,
    "sequence_bias": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
}


def greedy_changes(generation_config) -> list[str]:
    """The fields of ``generation_config`` that change greedy decoding (logits processors, beam search), as
    ``name=value``; empty when ``generate``'s greedy output is the plain argmax this decoder computes."""
    if generation_config is None:
        return []
    changes = []
    for name, neutral in NEUTRAL_GENERATION.items():
        value = getattr(generation_config, name, None)
        if value is not None and value != neutral and value != [] and value != {}:
            changes.append(f"{name}={value!r}")
    return changes


def require_prompt_only(method: HighlightMethod, *, fix: str) -> None:
    """Refuse a method that acts on decode steps (its own ``generate``, or ``edits_decode_steps``): the decoder
    runs decode steps without hooks."""
    if method.edits_decode_steps or type(method).generate is not HighlightMethod.generate:
        raise ValueError(f"method {method.name!r} also acts on decode steps, which run here without hooks; {fix}")


CACHE_ALIGN = 64
"""The decoder's cache length is a multiple of this. With 4,156 slots (4,096 + 60) the rows of the bf16 attention
probabilities are only 2-byte aligned; on the H200 one compile then ran the value matmul as an sm80 CUTLASS kernel
at 41 us per layer, another copied the probabilities first (5 us) and ran cuBLAS's nvjet kernel (8 us). With 4,160
slots it is the nvjet kernel at 8 us and no copy (docs/performance.md)."""


PROMPT_PASSES = ("batch", "rows")


class StaticGreedyDecoder:
    """Reusable greedy decoding for one model: the cache is allocated once for ``batch_size`` rows and
    ``max_cache_len`` positions (prompt + new tokens), and reset, not reallocated, between calls. A call with fewer
    rows is padded up to ``batch_size`` with copies of its last row (rows never mix, so the real rows' tokens are
    those of the batch alone) and the copies' outputs are dropped: one cache and one compiled step serve a dataset's
    smaller last batch too."""

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        max_cache_len: int,
        compile: bool = True,
        backend: str = "inductor",
        mode: str | None = "reduce-overhead",
        grouped_decode: bool | None = None,
        fuse_projections: bool = False,
        split_kv: bool = False,
        prompt_pass: str = "batch",
    ) -> None:
        """
        Args:
            model: a causal LM whose family supports transformers' ``StaticCache``.
            batch_size: rows of the cache; a call may have fewer (a larger batch is refused).
            max_cache_len: prompt length + new tokens, at least.
            compile: compile the decode step (False runs the same loop eagerly, for tests).
            backend: ``torch.compile`` backend (``inductor``; ``eager`` for quick CPU checks).
            mode: ``torch.compile`` mode; ``reduce-overhead`` uses CUDA graphs.
            grouped_decode: decode steps attend through ``decode_attention.gqa_decode_attention`` (models on SDPA); default:
                when the step is compiled or ``split_kv`` is set (eagerly, transformers already packs a query's heads
                per key/value head).
            fuse_projections: decode steps run each layer's q/k/v, and its MLP's gate/up, as one matmul each
                (:class:`seka_lightning.fused_projections.ProjectionFusion`: the model's weights become views of the
                fused tensors, no memory is added; the prompt pass keeps the separate matmuls, which ran faster there
                on an H200).
            split_kv: decode steps attend through the split-KV Triton kernel
                (:func:`seka_lightning.split_kv.split_kv_attention`: each cached key and value read once, the cache
                spread over every SM); needs the grouped decode path and a CUDA device with Triton. The same tokens
                up to rounding (float32 softmax statistics either way; the sums run in another order).
            prompt_pass: ``batch`` runs the prompts as one left-padded batch; ``rows`` runs a padded batch's prompts
                one row at a time without their padding (SDPA's causal kernel, no masked attention over the padded
                length; each row's keys and values are copied into its slots of the cache, where the batch pass would
                have put them). The same tokens up to rounding. Not for models with sliding-window layers.
        """
        check_prompt_pass(prompt_pass)
        if batch_size < 1 or max_cache_len < 2:
            raise ValueError(f"batch_size must be >= 1 and max_cache_len >= 2, got {batch_size} and {max_cache_len}")
        self.model, self.batch_size, self.max_cache_len = model, batch_size, max_cache_len
        # cache slots, rounded up to CACHE_ALIGN: rows of per-slot tensors (attention scores and probabilities) start
        # 16-byte aligned, so cuBLAS can take its fast kernels for the value matmul; the extra slots stay masked
        self.cache_slots = -(-max_cache_len // CACHE_ALIGN) * CACHE_ALIGN
        self.grouped_decode = (compile or split_kv) if grouped_decode is None else grouped_decode
        if split_kv and not self.grouped_decode:
            raise ValueError(
                "split_kv runs inside the grouped decode path, which grouped_decode=False turns off; "
                "leave grouped_decode at None or True"
            )
        self.split_kv = _checked_split_kv(split_kv, model)
        self.fusion = ProjectionFusion.of(model) if fuse_projections else None
        # the cache's layers are allocated by the first prompt pass, each on its own layer's device (sharded models)
        self.cache = StaticCache(config=model.config, max_cache_len=self.cache_slots)
        # transformers renamed `past_key_values` to `cache` (5.2x); pass whichever this model's forward names
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # sliding-window layers that count their tokens in a Python int (transformers 5.2x's StaticSlidingWindowLayer)
        self._sliding = [layer for layer in self.cache.layers if hasattr(layer, "cumulative_length_int")]
        kinds = sorted({type(layer).__name__ for layer in self.cache.layers if type(layer) is not StaticLayer})
        if prompt_pass == "rows" and kinds:
            raise ValueError(
                "prompt_pass='rows' copies each row's keys into the static cache's full-length layers; this model's "
                f"cache also has {kinds} layers (a sliding window keeps a rolling one); use prompt_pass='batch'"
            )
        self.prompt_pass = prompt_pass
        self._text_config = model.config.get_text_config()
        self._mask_builders = self._sliding_mask_builders() if compile and self._sliding else None
        step: Callable = self._step
        self.step = torch.compile(step, backend=backend, mode=mode, dynamic=False) if compile else step

    def _sliding_mask_builders(self) -> dict[str, Callable]:
        """The mask builder of each layer type of a model with sliding-window layers (decode steps get their masks
        as the dict the model's forward accepts in place of a mask)."""
        config = self._text_config
        types = set(getattr(config, "layer_types", None) or ())
        unknown = types - set(MASK_BUILDERS)
        if unknown or not types or getattr(config, "use_bidirectional_attention", False):
            raise ValueError(
                f"the compiled decoder builds the decode masks of sliding-window models for the layer types "
                f"{sorted(MASK_BUILDERS)} with causal attention; this model has {sorted(types)}"
                f"{' with bidirectional attention' if getattr(config, 'use_bidirectional_attention', False) else ''}; "
                "use compile=False or method.generate"
            )
        return {name: MASK_BUILDERS[name] for name in sorted(types)}

    def _step(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        cache_position: torch.Tensor,
        mask: torch.Tensor | dict[str, torch.Tensor],
    ) -> torch.Tensor:
        logits = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=position_ids,
            cache_position=cache_position,
            use_cache=True,
            **{self._cache_kw: self.cache},
        ).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def _decode_step(
        self, token: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """One decode step through the compiled step; a cache with sliding layers gets its masks built here."""
        if self._mask_builders is None:
            return self.step(token, position_ids, cache_position, mask)
        embeds = torch.empty(token.shape[0], 1, 0, dtype=self.model.dtype, device=token.device)  # shape, dtype, device
        masks = {
            name: build(
                config=self._text_config,
                inputs_embeds=embeds,
                attention_mask=mask,
                cache=self.cache,
                position_ids=position_ids,
            )
            for name, build in self._mask_builders.items()
        }
        with _steady_sliding_counts(self._sliding):
            return self.step(token, position_ids, cache_position, masks)

    def _eos_ids(self, device: torch.device) -> torch.Tensor | None:
        """The model's EOS ids now (generation_config may change between calls), as a tensor, or None."""
        config = self.model.generation_config
        eos = None if config is None else config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return torch.tensor(eos, dtype=torch.long, device=device) if eos else None

    @torch.no_grad()
    def generate(
        self,
        method: HighlightMethod,
        enc: Encoded,
        *,
        max_new_tokens: int,
        pad_token_id: int,
    ) -> torch.Tensor:
        """Greedy continuation ids ``[B, max_new_tokens]`` of the left-padded prompts ``enc`` under ``method``; rows
        that emit one of the model's EOS ids continue with ``pad_token_id``."""
        require_prompt_only(method, fix="use method.generate for it")
        changes = greedy_changes(self.model.generation_config)
        if changes:
            raise ValueError(
                f"the model's generation_config sets {', '.join(changes)}, which change greedy decoding and this "
                "decoder only takes the argmax; reset them on model.generation_config or use method.generate"
            )
        rows, length = enc["input_ids"].shape
        if rows > self.batch_size:
            raise ValueError(
                f"this decoder holds a cache for {self.batch_size} rows, got a batch of {rows}; "
                f"build one with batch_size >= {rows}"
            )
        if length + max_new_tokens > self.max_cache_len:
            raise ValueError(
                f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceeds max_cache_len={self.max_cache_len}; "
                "use a larger max_cache_len (static_decoding in seka predict)"
            )
        enc, batch = pad_rows(enc, self.batch_size), self.batch_size
        device = enc["input_ids"].device
        if self.split_kv and not split_kernel.available(device):
            raise ValueError(
                f"split_kv runs its Triton kernel on CUDA devices, and these inputs are on {device}; "
                "move the model and inputs to a GPU or drop split_kv"
            )
        self.cache.reset()
        # the prompt pass's mask: the prompt's padding, then zeros for the cache positions after it; without padding,
        # transformers reads that as plainly causal and attends to the prompt's keys only, with SDPA's causal kernel
        prompt_mask = torch.zeros(batch, self.cache_slots, dtype=enc["attention_mask"].dtype, device=device)
        prompt_mask[:, :length] = enc["attention_mask"]
        # the decode steps' mask, the same for every step: ones after the prompt (later positions are causally hidden)
        mask = prompt_mask.clone()
        mask[:, length:] = 1
        positions = position_ids_for(enc["attention_mask"])
        if self.prompt_pass == "rows" and not bool(enc["attention_mask"].all()):
            check_rows_independent(method)
            token = self._row_prompt_passes(method, enc, rows)
        else:
            with method.active(self.model, enc):  # the prompt pass: edits land in the cache
                logits = self.model(
                    input_ids=enc["input_ids"],
                    attention_mask=prompt_mask,
                    position_ids=positions,
                    cache_position=torch.arange(length, device=device),
                    use_cache=True,
                    logits_to_keep=1,
                    **{self._cache_kw: self.cache},
                ).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        out[:, :1] = token
        eos = self._eos_ids(device)
        done = torch.isin(token, eos) if eos is not None else None
        last = positions[:, -1:]
        with ExitStack() as decode_steps:
            if self.grouped_decode:
                decode_steps.enter_context(gqa_decoding(self.model, split_kv=self.split_kv))
            if self.fusion is not None:
                decode_steps.enter_context(self.fusion.active())
            for i in range(1, max_new_tokens):
                cache_position = torch.full((1,), length + i - 1, dtype=torch.long, device=device)
                token = self._decode_step(token, last + i, cache_position, mask).clone()  # CUDA graphs reuse outputs
                if done is not None:
                    token = torch.where(done, torch.full_like(token, pad_token_id), token)
                    done = done | torch.isin(token, eos)
                out[:, i : i + 1] = token
        return out[:rows]

    def _row_prompt_passes(self, method: HighlightMethod, enc: Encoded, rows: int) -> torch.Tensor:
        """The prompt pass of the left-padded ``enc`` one row at a time, each without its padding, under ``method``;
        each row's keys and values go to the cache slots the batch pass would have filled (its last ``n`` of the
        padded length; its padding slots stay zero and masked). The copies that pad the batch up to the decoder's
        rows take their source row's cache. Returns each row's first token ``[batch, 1]``."""
        length = enc["input_ids"].shape[1]
        tokens = []
        for i in range(rows):
            row_mask = enc["attention_mask"][i]
            n = int(row_mask.sum())
            start = length - n
            if n == 0 or not bool(row_mask[start:].all()):
                holes = ((row_mask[start:] == 0).nonzero().flatten() + start).tolist()[:8]
                where = f", and its mask is 0 at positions {holes} after its first token" if n else ""
                raise ValueError(
                    f"prompt_pass='rows' needs left-padded prompts with at least one token; row {i} has {n} tokens"
                    f"{where}; pad on the left (encode_highlighted does) or use prompt_pass='batch'"
                )
            row = {key: value[i : i + 1, start:] for key, value in enc.items()}
            row_cache = DynamicCache()
            with method.active(self.model, row):
                logits = self.model(
                    input_ids=row["input_ids"],
                    attention_mask=row["attention_mask"],
                    position_ids=position_ids_for(row["attention_mask"]),
                    use_cache=True,
                    logits_to_keep=1,
                    **{self._cache_kw: row_cache},
                ).logits
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
            for layer, computed in zip(self.cache.layers, row_cache.layers, strict=True):
                if not layer.is_initialized:  # the first call: allocate [batch, kv_heads, slots, dim] like the model's
                    layer.lazy_initialization(
                        computed.keys.expand(self.batch_size, -1, -1, -1),
                        computed.values.expand(self.batch_size, -1, -1, -1),
                    )
                layer.keys[i, :, start:length] = computed.keys[0]
                layer.values[i, :, start:length] = computed.values[0]
        for layer in self.cache.layers:
            layer.keys[rows:] = layer.keys[rows - 1]  # pad_rows' copies of the last row
            layer.values[rows:] = layer.values[rows - 1]
            layer.cumulative_length.fill_(length)  # where the first decode step writes
        token = torch.cat(tokens)
        return torch.cat([token, token[-1:].expand(self.batch_size - rows, 1)])


def check_prompt_pass(prompt_pass: str, method: HighlightMethod | None = None) -> None:
    """Refuse an unknown ``prompt_pass``, and ``"rows"`` for ``method`` when its rows depend on each other."""
    if prompt_pass not in PROMPT_PASSES:
        raise ValueError(f"prompt_pass must be one of {PROMPT_PASSES}, got {prompt_pass!r}")
    if prompt_pass == "rows" and method is not None:
        check_rows_independent(method)


def check_rows_independent(method: HighlightMethod) -> None:
    """Refuse ``prompt_pass="rows"`` for a method whose edit of a row depends on the other rows of the batch."""
    if method.row_dependence is not None:
        raise ValueError(
            f"method {method.name!r} edits a row using the other rows of its batch ({method.row_dependence}), so "
            "its prompts cannot run one row at a time; use prompt_pass='batch'"
        )


def _checked_split_kv(split_kv: bool, model: nn.Module | None = None) -> bool:
    """``split_kv``, refused when it is asked for and Triton is missing or ``model``'s attention is not what the
    kernel takes (grouped-query heads of a power-of-two dim from 16 to 256, no soft-capping): decode steps would
    otherwise fall back to the other path while the run records split_kv."""
    if not split_kv:
        return False
    if split_kernel.triton is None:
        raise ValueError("split_kv needs Triton (it comes with CUDA builds of torch); install it or drop split_kv")
    if model is not None:
        config = model.config.get_text_config()
        heads, kv_heads, dim = head_geometry(config)
        softcap = getattr(config, "attn_logit_softcapping", None)
        if kv_heads == heads or not split_kernel.supports_head_dim(dim) or softcap is not None:
            raise ValueError(
                f"split_kv's kernel takes grouped-query attention (fewer key/value heads than query heads) with head "
                f"dims a power of two from 16 to 256 and no soft-capping; this model has {heads} query heads, "
                f"{kv_heads} key/value heads of dim {dim}{f', soft-capping {softcap}' if softcap else ''}; "
                "drop split_kv"
            )
    return True


def pad_rows(enc: Encoded, rows: int) -> Encoded:
    """``enc`` with ``rows`` rows: its own, then copies of its last row (valid inputs for every method, padded or
    not as that row is, so the batch's kernels and the real rows' results stay those of ``enc`` alone)."""
    have = enc["input_ids"].shape[0]
    if have == rows:
        return enc
    return {key: torch.cat([value, value[-1:].expand(rows - have, *value.shape[1:])]) for key, value in enc.items()}


@contextmanager
def _steady_sliding_counts(layers: list) -> Iterator[None]:
    """Within the block, each sliding-window layer's Python token count reads only whether the layer is full (its
    window length) or not (0), the one thing the cache update of a one-token step branches on; on exit it is the real
    count plus the step's token. Inside the compiled step the count is then the same at every step and in every call,
    so the step is neither recompiled nor re-recorded as a CUDA graph (the masks, which need the real count, are built
    before the block)."""
    counts = [layer.cumulative_length_int for layer in layers]
    for layer, count in zip(layers, counts, strict=True):
        layer.cumulative_length_int = layer.max_cache_len if count >= layer.max_cache_len else 0
    try:
        yield
    finally:
        for layer, count in zip(layers, counts, strict=True):
            layer.cumulative_length_int = count + 1


class StaticDecoding(HighlightMethod):
    """``method`` with its ``generate`` served by :class:`StaticGreedyDecoder`; scoring, prompt logits and settings
    stay the method's (``seka predict --model.static_decoding N``).

    One decoder per model, with ``max_length`` cache positions and the rows of the largest batch seen so far: one
    cache and one compiled decode step serve every batch whatever its prompt length, and a smaller batch (a dataset's
    last) is padded up to the decoder's rows. A batch larger than every earlier one replaces the decoder by one of its
    size (once, as batches come largest first; the old cache is freed) rather than splitting the batch."""

    def __init__(
        self,
        method: HighlightMethod,
        *,
        max_length: int,
        compile: bool = True,
        backend: str = "inductor",
        mode: str | None = "reduce-overhead",
        fuse_projections: bool = False,
        split_kv: bool = False,
        prompt_pass: str = "batch",
    ) -> None:
        """
        Args:
            method: a method confined to the prompt pass (none, SEKA, the random ablation, AdaSEKA).
            max_length: the longest prompt plus the new tokens of any batch (the cache length).
            compile, backend, mode, fuse_projections, split_kv, prompt_pass: as :class:`StaticGreedyDecoder`.
        """
        require_prompt_only(method, fix="drop static_decoding for it")
        _checked_split_kv(split_kv)
        check_prompt_pass(prompt_pass, method)
        self.method, self.max_length = method, max_length
        self.name, self.uses_highlight = method.name, method.uses_highlight
        self._options = {
            "compile": compile,
            "backend": backend,
            "mode": mode,
            "fuse_projections": fuse_projections,
            "split_kv": split_kv,
            "prompt_pass": prompt_pass,
        }
        self._decoders: dict[int, StaticGreedyDecoder] = {}
        self._reserved_rows = 1

    def reserve_rows(self, rows: int) -> None:
        """Build the decoder with at least ``rows`` rows (the run's batch size), whichever batch comes first: a run
        resumed at its short last batch then decodes with the rows of an uninterrupted run."""
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self._reserved_rows = rows

    def setup(self, model: nn.Module, tokenizer) -> None:
        self.method.setup(model, tokenizer)

    def active(self, model: nn.Module, enc: Encoded):
        return self.method.active(model, enc)

    def prompt_logits(self, model: nn.Module, enc: Encoded) -> torch.Tensor:
        return self.method.prompt_logits(model, enc)

    def generate(self, model: nn.Module, enc: Encoded, *, max_new_tokens: int, pad_token_id: int) -> torch.Tensor:
        rows = enc["input_ids"].shape[0]
        decoder = self._decoders.get(id(model))
        if decoder is None or decoder.batch_size < rows:
            if decoder is not None:
                log.info("static decoding: a batch of %d rows, larger than the decoder's %d", rows, decoder.batch_size)
                del self._decoders[id(model)], decoder  # free the old cache before allocating the new one
            decoder = StaticGreedyDecoder(
                model, batch_size=max(rows, self._reserved_rows), max_cache_len=self.max_length, **self._options
            )
            self._decoders[id(model)] = decoder
        return decoder.generate(self.method, enc, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)

    def describe(self) -> dict:
        return {**self.method.describe(), "static_decoding": {"max_length": self.max_length, **self._options}}
