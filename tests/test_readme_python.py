"""The README's "Using it from Python" snippet runs as written, on the tiny model and QA file instead of the real ones."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippet() -> str:
    section = README.read_text(encoding="utf-8").split("## Using it from Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


def test_readme_snippet_runs_on_the_tiny_model(tiny_model_dir, qa_file, tmp_path, monkeypatch):
    code = python_snippet()
    for real in ('"embedded:smollm2-135m"', '"data/synthetic_qa.jsonl"'):
        assert real in code, f"the snippet no longer loads {real}; update this test"
    code = code.replace('"embedded:smollm2-135m"', repr(str(tiny_model_dir)))
    code = code.replace('"data/synthetic_qa.jsonl"', repr(str(qa_file)))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)

    bank, enc = namespace["bank"], namespace["enc"]
    assert sorted(p.name for p in (tmp_path / "banks" / "smollm2-135m").iterdir()) == [
        "README.md",
        "bank.safetensors",
        "bank.stats.safetensors",
    ]
    assert bank.statistics is not None and bank.metadata["triplets_used"] == 48
    prompt = enc["input_ids"]
    assert enc["highlight_mask"].any()
    assert torch.equal(namespace["out"][:, : prompt.shape[1]], prompt)
    beams = namespace["beams"]
    assert beams.shape[0] == 2 and torch.equal(beams[:, : prompt.shape[1]], prompt.expand(2, -1))
