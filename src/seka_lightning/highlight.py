"""Highlighted prompts -> token masks (SPEC §2).

A prompt marks spans with a start and an end marker (default ``**`` and ``**``). The markers are removed, the
plain text is tokenized with offsets, and token i is highlighted iff its character offsets ``(cs, ce)`` satisfy
``cs >= span_start - 1 and ce <= span_end`` and it is not a ``(0, 0)`` special/pad token. The ``-1`` admits a
token that carries the span's leading space. Batches are left-padded.

With a chat template, markers are stripped from the prompt *before* templating and the spans are carried into the
templated text as character offsets (:func:`template_spans`), so a span can never cross a message boundary and text
that happens to contain marker characters cannot inject highlights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedTokenizerBase

Span = tuple[int, int]
Message = Mapping[str, str]

DEFAULT_MARKERS: tuple[str, str] = ("**", "**")


def _opens(text: str, at: int, marker: str) -> bool:
    """True when the marker at ``at`` can only open a span: whitespace (or the text's start) before it, and a
    non-space character after it (Markdown's left-flanking rule)."""
    after = at + len(marker)
    return (at == 0 or text[at - 1].isspace()) and after < len(text) and not text[after].isspace()


def strip_markers(text: str, markers: tuple[str, str] = DEFAULT_MARKERS, *, index: int = 0) -> tuple[str, list[Span]]:
    """Remove the markers from ``text``; return the plain text and the character spans they enclosed.

    Matching is non-greedy and spans may contain newlines. Unbalanced, nested or empty highlights raise
    ``ValueError`` naming the prompt ``index`` and the offending span. With identical start and end markers
    (``**``), a span whose closing marker can only open one (space before it, text after it, as in
    ``A **b **c** d** e``) while more markers follow is nesting, not two spans: ``**a** and **b**`` stays two spans.
    """
    start, end = markers
    if not start or not end:
        raise ValueError(f"markers must be two non-empty strings, got {markers!r}")
    pattern = re.compile(re.escape(start) + "(.*?)" + re.escape(end), flags=re.DOTALL)
    pieces: list[str] = []
    spans: list[Span] = []
    plain_len = 0
    last = 0
    for match in pattern.finditer(text):
        before = text[last : match.start()]
        content = match.group(1)
        if start != end and start in content:
            raise ValueError(
                f"prompt {index}: nested highlight markers in span {content!r}; "
                f"highlights cannot nest, close the outer span with {end!r} before opening another"
            )
        closing = match.end() - len(end)
        if start == end and _opens(text, closing, end) and end in text[match.end() :]:
            raise ValueError(
                f"prompt {index}: nested highlight: the {end!r} at character {closing} opens a span inside the one "
                f"opened at character {match.start()} (context: {text[match.start() : match.end() + 20]!r}); "
                f"highlights cannot nest, so close the outer span first, and write a closing {end!r} right after "
                "the highlighted text (no space before it)"
            )
        if not content.strip():
            raise ValueError(
                f"prompt {index}: empty highlight {match.group(0)!r} at character {match.start()}; "
                "put the text to highlight between the markers or remove them"
            )
        pieces.append(before)
        plain_len += len(before)
        spans.append((plain_len, plain_len + len(content)))
        pieces.append(content)
        plain_len += len(content)
        last = match.end()
    rest = text[last:]
    for marker in {start, end}:
        if marker in rest:
            position = last + rest.index(marker)
            raise ValueError(
                f"prompt {index}: unbalanced highlight marker {marker!r} at character {position} "
                f"(context: {text[max(0, position - 20) : position + 20]!r}); every {start!r} needs a closing {end!r}"
            )
    pieces.append(rest)
    return "".join(pieces), spans


def token_highlight_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[bool]:
    """SPEC §2 rule: token highlighted iff ``cs >= start - 1 and ce <= end`` for some span, and not ``(0, 0)``."""
    mask = [False] * len(offsets)
    for i, (cs, ce) in enumerate(offsets):
        if cs == 0 and ce == 0:
            continue
        mask[i] = any(cs >= s - 1 and ce <= e for s, e in spans)
    return mask


def encode_spans(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    spans: Sequence[Sequence[Span]],
    *,
    add_special_tokens: bool = False,
    max_length: int | None = None,
    truncation_side: str = "left",
    max_positions: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize plain ``texts`` and mark the tokens inside the given character ``spans`` (one list per text).

    Returns left-padded ``input_ids``, ``attention_mask`` and a bool ``highlight_mask`` (all ``[B, T]``).
    With ``max_length``, prompts are truncated from ``truncation_side``; a highlight that loses tokens to
    truncation is an error, never a silently shorter highlight. ``max_positions`` (the model's
    ``max_position_embeddings``) makes a prompt still longer than that an error here, before any compute.
    """
    if len(texts) != len(spans):
        raise ValueError(f"got {len(texts)} texts but {len(spans)} span lists; pass one span list per text")
    if not texts:
        raise ValueError("no prompts to encode; pass at least one text")
    if truncation_side not in ("left", "right"):
        raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer without offset mapping; load the fast tokenizer "
            "(AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    encoded = tokenizer(list(texts), add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")

    rows: list[tuple[list[int], list[bool]]] = []
    for i, (text, row_spans) in enumerate(zip(texts, spans, strict=True)):
        ids = list(encoded["input_ids"][i])
        offsets = [tuple(o) for o in encoded["offset_mapping"][i]]
        for s, e in row_spans:
            if not 0 <= s < e <= len(text):
                raise ValueError(f"prompt {i}: span ({s}, {e}) is outside the text of length {len(text)}")
        mask = token_highlight_mask(offsets, row_spans)
        per_span = [token_highlight_mask(offsets, [span]) for span in row_spans]
        for (s, e), span_mask in zip(row_spans, per_span, strict=True):
            if not any(span_mask):
                raise ValueError(
                    f"prompt {i}: highlight {text[s:e]!r} covers no whole token (tokens straddle its edges); "
                    "widen the highlight to whole words"
                )
        if max_length is not None and len(ids) > max_length:
            cut = slice(len(ids) - max_length, None) if truncation_side == "left" else slice(0, max_length)
            for (s, e), span_mask in zip(row_spans, per_span, strict=True):
                if sum(span_mask[cut]) != sum(span_mask):
                    raise ValueError(
                        f"prompt {i}: highlight {text[s:e]!r} is cut off by truncation to {max_length} tokens "
                        f"(prompt has {len(ids)}); raise max_length or shorten the prompt"
                    )
            ids, mask = ids[cut], mask[cut]
        if max_positions is not None and len(ids) > max_positions:
            raise ValueError(
                f"prompt {i} is {len(ids)} tokens long but the model has only {max_positions} positions "
                "(max_position_embeddings); pass max_length to truncate it (truncation_side='left' keeps its end) "
                "or shorten the prompt"
            )
        rows.append((ids, mask))

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    highlight_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids)
        if n == 0:
            raise ValueError(f"prompt {i} is empty after tokenization; pass a non-empty prompt")
        input_ids[i, width - n :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - n :] = 1
        highlight_mask[i, width - n :] = torch.tensor(mask, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "highlight_mask": highlight_mask}


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, text: str, *, system: str | None = None) -> str:
    """Wrap ``text`` as a user message with the tokenizer's chat template (the text passes through verbatim)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "chat=True but the tokenizer has no chat template; pass chat=False or set tokenizer.chat_template"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_PLACEHOLDER = "\ue000seka-user-message\ue001"  # private-use characters: no template or prompt produces them


def template_spans(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    spans: Sequence[Span],
    *,
    system: str | None = None,
    index: int = 0,
) -> tuple[str, list[Span]]:
    """Apply the chat template to the plain ``text`` and move its character ``spans`` into the templated text.

    The template is rendered once with a placeholder for the user message to find the text around it; the real
    rendering must be that text around ``text`` (or ``text`` stripped, for templates that trim). Spans are shifted
    by the message's position and clipped to what the template kept. A template that rewrites the message
    otherwise is an error: its highlights could not be placed.
    """
    templated = apply_chat_template(tokenizer, text, system=system)
    if not spans:
        return templated, []
    skeleton = apply_chat_template(tokenizer, _PLACEHOLDER, system=system)
    prefix, found, suffix = skeleton.partition(_PLACEHOLDER)
    fits = bool(found) and len(templated) >= len(prefix) + len(suffix)
    fits = fits and templated.startswith(prefix) and templated.endswith(suffix)
    body = templated[len(prefix) : len(templated) - len(suffix)] if fits else None
    lead = len(text) - len(text.lstrip())
    kept = ((text, 0), (text.strip(), lead), (text.lstrip(), lead), (text.rstrip(), 0))
    offset = next((start for candidate, start in kept if body == candidate), None)
    if body is None or offset is None:
        raise ValueError(
            f"prompt {index}: the chat template rewrites the user message (it is not found verbatim in the templated "
            "prompt), so its highlights cannot be placed; pass chat=False and apply the template yourself"
        )
    moved: list[Span] = []
    for start, end in spans:
        kept_start, kept_end = max(start, offset) - offset, min(end, offset + len(body)) - offset
        if kept_start >= kept_end:
            raise ValueError(
                f"prompt {index}: highlight {text[start:end]!r} lies in whitespace the chat template trims away; "
                "highlight visible text"
            )
        moved.append((len(prefix) + kept_start, len(prefix) + kept_end))
    return templated, moved


def _check_system(system: str | None, markers: tuple[str, str]) -> None:
    """A system prompt carries no highlight: markers there would be highlighted (or paired) across messages."""
    for marker in dict.fromkeys(markers):
        if system and marker in system:
            position = system.index(marker)
            raise ValueError(
                f"the system prompt contains the highlight marker {marker!r} at character {position} (context: "
                f"{system[max(0, position - 20) : position + 20]!r}); highlights belong in the prompts: remove the "
                "marker from the system prompt"
            )


def encode_highlighted(
    tokenizer: PreTrainedTokenizerBase,
    texts: str | Sequence[str] | Sequence[Message] | Sequence[Sequence[Message]],
    *,
    markers: tuple[str, str] = DEFAULT_MARKERS,
    chat: bool = False,
    system: str | None = None,
    add_special_tokens: bool | None = None,
    max_length: int | None = None,
    truncation_side: str = "left",
    max_positions: int | None = None,
) -> dict[str, torch.Tensor]:
    """Encode prompts whose highlights are marked inline (``"Answer **in French**."``).

    ``texts`` is a prompt, a list of prompts, a chat (a list of ``{"role": ..., "content": ...}`` messages with the
    markers inside the contents) or a list of chats. Chats, and prompts with ``chat=True`` (each wrapped as a user
    message, after an optional ``system`` message), go through the tokenizer's chat template, whose own special
    tokens are part of the text. With ``chat=True`` the markers are stripped from the message first and its spans
    carried into the templated text (:func:`template_spans`), so a span stays inside its message; a ``system`` prompt
    with markers is an error. A chat's messages are checked one by one (:func:`render_chat`), so a span cannot cross
    a message boundary either. ``add_special_tokens=None`` follows the tokenizer's convention: nothing is added to
    chat-templated text, and plain text gets them iff the tokenizer adds a BOS token (base models such as Gemma-3).
    Returns left-padded ``input_ids``, ``attention_mask`` and bool ``highlight_mask``, each ``[B, T]``. A prompt
    without markers is encoded with an all-False highlight mask. ``max_positions``: see :func:`encode_spans`.
    """
    chats = as_chats(texts)
    if chats is not None and (chat or system is not None):
        raise ValueError("chat=True and system= apply to plain-text prompts; put a system message in the chat instead")
    if chats is None:
        prompts = [texts] if isinstance(texts, str) else list(texts)
    else:
        prompts = [render_chat(tokenizer, messages, markers, index=i) for i, messages in enumerate(chats)]
    if chat:
        _check_system(system, markers)
    templated = chat or chats is not None
    plain: list[str] = []
    spans: list[list[Span]] = []
    for i, text in enumerate(prompts):
        stripped, row_spans = strip_markers(text, markers, index=i)
        if chat:
            stripped, row_spans = template_spans(tokenizer, stripped, row_spans, system=system, index=i)
        plain.append(stripped)
        spans.append(row_spans)
    if add_special_tokens is None:
        add_special_tokens = not templated and adds_bos(tokenizer)
    return encode_spans(
        tokenizer,
        plain,
        spans,
        add_special_tokens=add_special_tokens,
        max_length=max_length,
        truncation_side=truncation_side,
        max_positions=max_positions,
    )


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts its BOS token in front of a text when asked for special tokens (Llama, Gemma)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def as_chats(texts: object) -> list[list[Message]] | None:
    """``texts`` as a list of chats when it is one chat or a list of chats; None for plain prompts."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        return None
    first = texts[0]
    if isinstance(first, Mapping):
        return [list(texts)]
    if isinstance(first, Sequence) and not isinstance(first, str):
        return [list(messages) for messages in texts]
    return None


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], markers: tuple[str, str], *, index: int
) -> str:
    """Apply the chat template to ``messages`` (markers kept verbatim, a generation prompt added); the markers of
    the rendered text must be exactly those of the message contents."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"chat {index}: the tokenizer has no chat template; set tokenizer.chat_template or pass plain prompts"
        )
    expected = 0
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"chat {index}, message {j}: expected a dict with a 'role' and a 'content' string")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"chat {index}, message {j}: 'content' must be a string, got {message.get('content')!r}")
        expected += len(strip_markers(message["content"], markers, index=index)[1])
    rendered = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    found = len(strip_markers(rendered, markers, index=index)[1])
    if found != expected:
        raise ValueError(
            f"chat {index}: the chat template adds text containing the markers {markers!r} ({found} spans after "
            f"rendering, {expected} in the messages); choose other markers"
        )
    return rendered
