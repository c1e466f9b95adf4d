"""build_bank / build_statistics: the bank `seka fit` writes, from a loaded model and an iterable of QA pairs."""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from tests.conftest import tiny_llama

from seka_lightning import BankStatistics, ProjectionBank, build_bank, build_statistics, load_model
from seka_lightning import build as build_module
from seka_lightning.capture import collect_triplet_keys
from seka_lightning.cli import run_lightning
from seka_lightning.data.triplets import ChatTriplet, triplets_from_pair
from seka_lightning.families import resolve_layout
from seka_lightning.lit.builder import ProjectionBuilder, stats_path_for
from seka_lightning.provenance import weights_hash
from seka_lightning.stats import KeyStatistics, KeySums

BUILD_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "build" / "synthetic_qa.yaml"


def seka_fit(model_dir: Path, qa_path: Path, out: Path, *extra: str, max_samples: int, min_diff: float = 0.0):
    """`seka fit` as the CLI runs it: float64 model, batches of 5 triplets, top_pct 0.7."""
    settings = {
        "model.pretrained": model_dir,
        "model.dtype": "float64",
        "data.path": qa_path,
        "data.max_samples": max_samples,
        "data.batch_size": 5,
        "model.top_pct": 0.7,
        "model.min_diff": min_diff,
        "model.output": out,
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.enable_progress_bar": "false",
        "trainer.callbacks": "[]",
    }
    options = [part for key, value in settings.items() for part in (f"--{key}", str(value))]
    run_lightning(["fit", "-c", str(BUILD_CONFIG), *options, *extra])
    return ProjectionBank.load(out)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bucketed_build_bank_equals_bucketed_seka_fit_exactly(tiny_model_dir, qa_file, tmp_path):
    """``length_window`` reorders the same way in both: the same float64 sums, bit for bit."""
    out = tmp_path / "fit.safetensors"
    seka_fit(tiny_model_dir, qa_file, out, "--data.length_window", "2", max_samples=12, min_diff=0.05)
    model, tokenizer = load_model(str(tiny_model_dir), dtype="float64")
    bank = build_bank(model, tokenizer, read_jsonl(qa_file)[:12], min_diff=0.05, batch_size=5, length_window=2)
    fit_sums, _ = KeySums.load(stats_path_for(out))
    for name, tensor in fit_sums.tensors().items():
        assert torch.equal(bank.statistics.tensors()[name], tensor), name


def test_packed_build_bank_equals_packed_seka_fit_exactly(tiny_model_dir, qa_file, tmp_path):
    """``--model.pack_tokens`` packs each batch the same way as ``build_bank(pack_tokens=...)``: the same sums, bit
    for bit, and the setting in the bank's metadata."""
    out = tmp_path / "fit.safetensors"
    fitted = seka_fit(tiny_model_dir, qa_file, out, "--model.pack_tokens", "160", max_samples=12, min_diff=0.05)
    model, tokenizer = load_model(str(tiny_model_dir), dtype="float64")
    bank = build_bank(model, tokenizer, read_jsonl(qa_file)[:12], min_diff=0.05, batch_size=5, pack_tokens=160)
    assert fitted.metadata["pack_tokens"] == bank.metadata["pack_tokens"] == 160
    fit_sums, _ = KeySums.load(stats_path_for(out))
    for name, tensor in fit_sums.tensors().items():
        assert torch.equal(bank.statistics.tensors()[name], tensor), name


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_build_bank_equals_seka_fit_exactly(tiny_model_dir, qa_file, tmp_path, chat):
    """Same data, layers, batch size and settings (chat-template building texts too): the same float64 sums and the
    same bank, bit for bit."""
    extra = ("--model.chat", "true") if chat else ()
    fitted = seka_fit(tiny_model_dir, qa_file, tmp_path / "fit.safetensors", *extra, max_samples=12, min_diff=0.05)
    model, tokenizer = load_model(str(tiny_model_dir), dtype="float64")
    pairs = read_jsonl(qa_file)[:12]
    bank = build_bank(model, tokenizer, iter(pairs), top_pct=0.7, min_diff=0.05, batch_size=5, chat=chat)
    assert bank.metadata["chat"] is chat and fitted.metadata["chat"] is chat
    # unpacked builds record nothing about packing: their files stay byte-equal to builds made before it existed
    assert "pack_tokens" not in bank.metadata and "pack_tokens" not in fitted.metadata

    fit_sums, fit_meta = KeySums.load(stats_path_for(tmp_path / "fit.safetensors"))
    for name, tensor in fit_sums.tensors().items():
        assert torch.equal(bank.statistics.tensors()[name], tensor), name
    for name in ("pos", "neg", "u_pos", "s_pos", "u_neg", "s_neg", "diff"):
        assert torch.equal(getattr(bank, name), getattr(fitted, name)), name
    assert 0 < bank.metadata["heads_kept"] < bank.metadata["heads_total"], "both kept and skipped heads"
    # the metadata agrees except where it describes the source (a file for seka fit, records here)
    differs = {"data_fingerprint", "model_revision", "statistics_sha256"}
    assert set(fitted.metadata) - set(bank.metadata) == {"statistics_sha256"}  # the written pair's digest
    for key, value in fitted.metadata.items():
        if key not in differs:
            assert bank.metadata[key] == value, key
    assert fit_meta["layers"] == bank.layers == [0, 1, 2]
    # both record the hash of the weights they built from (the model card shows it)
    assert fitted.metadata["weights_sha256"] == weights_hash(str(tiny_model_dir))["sha256"] is not None
    assert bank.metadata["weights_sha256"] == fitted.metadata["weights_sha256"]


def test_statistics_derive_the_same_bank_and_other_batch_sizes_agree_to_float64(tiny_model_dir, qa_file):
    model, tokenizer = load_model(str(tiny_model_dir), dtype="float64")
    pairs = read_jsonl(qa_file)[:6]
    stats = build_statistics(model, tokenizer, pairs, layers="last2", batch_size=4)
    assert isinstance(stats, BankStatistics) and stats.layers == [1, 2] and stats.head_dim == 16
    other = build_statistics(model, tokenizer, pairs, layers="last2", batch_size=12)
    for name, tensor in stats.sums.tensors().items():
        torch.testing.assert_close(other.sums.tensors()[name], tensor, rtol=1e-12, atol=1e-12)
    assert stats.metadata["triplets_used"] == other.metadata["triplets_used"] == 12
    derived = stats.to_bank(top_pct=0.5, min_diff=0.0)
    direct = ProjectionBank.from_statistics(stats.sums, layers=[1, 2], top_pct=0.5, min_diff=0.0)
    assert torch.equal(derived.pos, direct.pos) and derived.metadata["top_pct"] == 0.5
    assert derived.statistics is stats.sums


def test_positive_only_expert_matches_seka_fit(tiny_model_dir, qa_file, tmp_path):
    fitted = seka_fit(
        tiny_model_dir, qa_file, tmp_path / "e.safetensors", "--model.positive_only", "true", max_samples=6
    )
    model, tokenizer = load_model(str(tiny_model_dir), dtype="float64")
    bank = build_bank(
        model, tokenizer, read_jsonl(qa_file)[:6], top_pct=0.7, min_diff=0.0, batch_size=5, positive_only=True
    )
    assert bank.neg is None and fitted.neg is None
    assert torch.equal(bank.pos, fitted.pos) and bank.metadata["negative_text"] is False


def test_pairs_stream_one_batch_at_a_time(tiny_model_dir, qa_file, monkeypatch):
    """A generator is consumed as batches are needed: at most one batch of triplets is ever held."""
    model, tokenizer = load_model(str(tiny_model_dir), dtype="float64")
    pulled = [0]
    ahead: list[int] = []

    def generate():
        for pair in read_jsonl(qa_file)[:10]:
            pulled[0] += 1
            yield pair

    real = build_module.accumulate_triplets
    processed = [0]

    def spy(stats, model, tokenizer, layout, layer_ids, batch, **kwargs):
        ahead.append(2 * pulled[0] - processed[0] - len(batch))  # triplets pulled but not yet in any batch
        processed[0] += len(batch)
        return real(stats, model, tokenizer, layout, layer_ids, batch, **kwargs)

    monkeypatch.setattr(build_module, "accumulate_triplets", spy)
    build_statistics(model, tokenizer, generate(), batch_size=4)
    assert processed[0] == 20 and len(ahead) == 5
    assert max(ahead) == 0, "pairs were read ahead of the batch being processed"


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([], "pairs is empty; pass at least one QA pair dict with keys"),
        ("data/qa.jsonl", "got a str; read a JSONL file with seka_lightning.data.triplets.read_pairs"),
        (["not a dict"], "pair 0 is a str, expected a dict with keys"),
    ],
)
def test_bad_pairs_are_refused(tiny_model_dir, pairs, message):
    model, tokenizer = load_model(str(tiny_model_dir))
    with pytest.raises(ValueError, match=message):
        build_bank(model, tokenizer, pairs)


def test_missing_and_empty_fields_name_the_record_and_key(tiny_model_dir, qa_file):
    model, tokenizer = load_model(str(tiny_model_dir))
    pairs = read_jsonl(qa_file)[:3]
    del pairs[2]["answer_2"]
    with pytest.raises(ValueError, match=r"pair 2 is missing key 'answer_2'; each pair needs \['context_1'"):
        build_bank(model, tokenizer, pairs)
    pairs[2]["answer_2"] = "  "
    with pytest.raises(ValueError, match=r"pair 2: 'answer_2' must be a non-empty string, got '  '"):
        build_bank(model, tokenizer, pairs)


def test_data_without_answers_and_bad_settings_are_refused(tiny_model_dir, qa_file):
    model, tokenizer = load_model(str(tiny_model_dir))
    pair = read_jsonl(qa_file)[0]
    absent = {**pair, "answer_1": "nowhere to be found", "answer_2": "not here either"}
    with pytest.raises(ValueError, match="no triplet had its answer in all three texts"):
        build_bank(model, tokenizer, [absent])
    with pytest.raises(ValueError, match="top_pct must be in"):
        build_bank(model, tokenizer, [pair], top_pct=1.5)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        build_statistics(model, tokenizer, [pair], batch_size=0)
    with pytest.raises(ValueError, match="ids \\[7\\] are outside 0..2"):
        build_statistics(model, tokenizer, [pair], layers="0,7")


def test_defaults_follow_seka_fit():
    """build_bank's defaults are ProjectionBuilder's, so the two entry points build the same bank by default."""
    api = inspect.signature(build_bank).parameters
    fit = inspect.signature(ProjectionBuilder.__init__).parameters
    for name in ("layers", "top_pct", "min_diff", "head_filter", "positive_only", "attention_ratio", "chat"):
        assert api[name].default == fit[name].default, name


class UserMessages(NamedTuple):
    """A triplet's texts wrapped by hand as user messages, independently of ``ChatTriplet``."""

    answer: str
    wrapped: tuple[str, str, str]

    def texts(self) -> tuple[str, str, str]:
        return self.wrapped


def by_hand(tokenizer, triplet) -> UserMessages:
    messages = ([{"role": "user", "content": text}] for text in triplet.texts())
    return UserMessages(
        triplet.answer,
        tuple(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages),
    )


def test_chat_statistics_are_those_of_the_chat_formatted_texts(tiny_model_dir, qa_file):
    """chat=True sums the answer-token keys of the texts as user messages of the chat template, bit for bit."""
    model, tokenizer = load_model(str(tiny_model_dir), dtype="float64")
    pairs = read_jsonl(qa_file)[:6]
    stats = build_statistics(model, tokenizer, pairs, batch_size=12, chat=True)
    triplets = [t for pair in pairs for t in triplets_from_pair(pair)]
    wrapped = [by_hand(tokenizer, t) for t in triplets]
    assert wrapped[0].texts()[0] == f"<bos>user\nContext: {triplets[0].context} <eos>\n<bos>assistant\n"
    assert ChatTriplet(triplets[0], tokenizer).texts() == wrapped[0].texts()
    layout = resolve_layout(model)
    keys = collect_triplet_keys(model, tokenizer, layout, [0, 1, 2], wrapped, device=torch.device("cpu"))
    direct = KeyStatistics(3, layout.num_kv_heads, layout.head_dim)
    direct.update(keys.neutral, keys.positive, keys.negative)
    for name, tensor in direct.compute().tensors().items():
        assert torch.equal(stats.sums.tensors()[name], tensor), name
    assert stats.metadata["triplets_used"] == keys.kept > 0 and stats.metadata["chat"] is True


def test_chat_and_plain_texts_give_other_statistics(tiny_model_dir, qa_file):
    model, tokenizer = load_model(str(tiny_model_dir), dtype="float64")
    pairs = read_jsonl(qa_file)[:6]
    chat = build_statistics(model, tokenizer, pairs, batch_size=4, chat=True)
    plain = build_statistics(model, tokenizer, pairs, batch_size=4)
    assert plain.metadata["chat"] is False and chat.metadata["triplets_used"] == plain.metadata["triplets_used"]
    assert torch.equal(chat.sums.count, plain.sums.count)  # the same answer tokens...
    for name in ("a0", "a_pos", "a_neg"):  # ...with other keys: the template's tokens come before them
        assert not torch.allclose(chat.sums.tensors()[name], plain.sums.tensors()[name], rtol=1e-3), name


def test_chat_without_a_chat_template_is_refused_before_any_key_is_captured(
    tiny_model_dir, tokenizer, qa_file, tmp_path, monkeypatch
):
    model, _ = load_model(str(tiny_model_dir))
    plain_tokenizer = copy.deepcopy(tokenizer)
    plain_tokenizer.chat_template = None
    pulled = []

    def pairs():
        pulled.append(1)
        yield from read_jsonl(qa_file)[:2]

    monkeypatch.setattr(build_module, "accumulate_triplets", lambda *a, **k: pytest.fail("keys were captured"))
    message = f"and {tiny_model_dir}'s tokenizer has none; set chat: false \\(--model.chat false\\)"
    with pytest.raises(ValueError, match=message):
        build_bank(model, plain_tokenizer, pairs(), chat=True)
    assert not pulled, "the data was read before the tokenizer was checked"

    base = tmp_path / "base-model"
    tiny_llama(len(tokenizer)).save_pretrained(base)
    plain_tokenizer.save_pretrained(base)
    out = tmp_path / "bank.safetensors"
    with pytest.raises(ValueError, match=f"and {base}'s tokenizer has none; set chat: false"):
        ProjectionBuilder(str(base), chat=True, output=str(out))
    assert not out.exists() and not stats_path_for(out).exists()
