"""Expert banks with `seka fit` (positive_only + the attention-ratio filter) against an independent computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seka_lightning.adaseka.experts import ExpertSet
from seka_lightning.bank import ProjectionBank, derive_bank
from seka_lightning.capture import attention_kept, collect_triplet_keys
from seka_lightning.cli import run_lightning
from seka_lightning.data.triplets import iter_triplets, read_pairs
from seka_lightning.families import resolve_layout
from seka_lightning.lit.builder import ProjectionBuilder, stats_path_for
from seka_lightning.models import load_model

REPO = Path(__file__).resolve().parents[2]
BUILD_CONFIG = REPO / "configs" / "adaseka" / "build" / "synthetic_qa.yaml"
MAX_SAMPLES = 12


def _answer_tokens(tokenizer, text: str, answer: str) -> list[int]:
    start = text.lower().find(answer.lower())
    if start < 0:
        return []
    end = start + len(answer)
    offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    for lo, hi in ((start, end), (start - 1, end), (start, end + 1)):
        found = [i for i, (s, e) in enumerate(offsets) if s >= lo and e <= hi and (s, e) != (0, 0)]
        if found:
            return found
    return []


def reference_expert(model_dir: Path, qa_path: Path, *, ratio: float | None, top_pct: float, min_diff: float):
    """The reference's positive-only builder on unpadded float64 eager passes: the attention check per triplet
    (last token -> answer tokens, summed over every head of every layer), then ||h+ - h|| head filter and SVD."""
    model, tokenizer = load_model(str(model_dir), dtype="float64", attn_implementation="eager")
    n_layers, n_kv, d = model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim
    rows = {kind: [[[] for _ in range(n_kv)] for _ in range(n_layers)] for kind in "hp"}
    ratios, kept, filtered = [], 0, 0
    for triplet in iter_triplets(read_pairs(qa_path, max_samples=MAX_SAMPLES)):
        texts = triplet.texts()[:2]
        idx = [_answer_tokens(tokenizer, t, triplet.answer) for t in texts]
        if not all(idx) or len(idx[0]) != len(idx[1]):
            continue
        outs, mass = [], []
        for text, i in zip(texts, idx, strict=True):
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = model(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=False)
            outs.append(out)
            mass.append(sum(float(out.attentions[L][0, :, -1, i].sum()) for L in range(n_layers)))
        ratios.append(mass[1] / mass[0])
        if ratio is not None:
            ok = mass[1] > 0 if mass[0] == 0 else mass[1] / mass[0] >= ratio
            if not ok:
                filtered += 1
                continue
        kept += 1
        for kind, out, i in zip("hp", outs, idx, strict=True):
            for L in range(n_layers):
                block = model.model.layers[L]
                k = block.self_attn.k_proj(block.input_layernorm(out.hidden_states[L]))[0].view(-1, n_kv, d)[i]
                for h in range(n_kv):
                    rows[kind][L][h].append(k[:, h])
    pos = torch.zeros(n_layers, n_kv, d, d)
    s_pos = torch.full((n_layers, n_kv, d), float("nan"))
    for L in range(n_layers):
        for h in range(n_kv):
            H, Hp = (torch.cat(rows[kind][L][h]) for kind in "hp")
            n = H.shape[0]
            u, s, _ = torch.linalg.svd((H.T @ Hp / n).float())
            if torch.norm(Hp - H) / n >= min_diff:
                k = int((s.cumsum(0) / s.sum() < top_pct).sum()) + 1
                pos[L, h] = u[:, :k] @ u[:, :k].T
                s_pos[L, h] = s
    return {"pos": pos, "s_pos": s_pos, "kept": kept, "filtered": filtered, "ratios": ratios}


def build_expert(model_dir: Path, qa_path: Path, out: Path, *, ratio: float | None, min_diff: float) -> ProjectionBank:
    args = [
        "fit", "-c", str(BUILD_CONFIG),
        "--model.pretrained", str(model_dir), "--model.dtype", "float64",
        "--model.top_pct", "0.7", "--model.min_diff", str(min_diff), "--model.head_filter", "reference", "--model.output", str(out),
        "--data.path", str(qa_path), "--data.max_samples", str(MAX_SAMPLES), "--data.batch_size", "5",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
    ]  # fmt: skip
    if ratio is not None:
        args += ["--model.attention_ratio", repr(ratio)]
    run_lightning(args)
    return ProjectionBank.load(out)


def test_attention_filtered_expert_matches_the_reference_builder(tiny_model_dir, qa_file, tmp_path):
    unfiltered = reference_expert(tiny_model_dir, qa_file, ratio=None, top_pct=0.7, min_diff=0.0)
    # a threshold halfway between two observed ratios near the median: about half the triplets are filtered
    ordered = sorted(unfiltered["ratios"])
    middle = len(ordered) // 2
    ratio = (ordered[middle - 1] + ordered[middle]) / 2
    # min_diff between the 3rd and 4th smallest head values: three heads skipped (NaN), the rest kept; the final
    # bank is derived from the fit's saved statistics (the same triplets pass the filter)
    fitted = build_expert(tiny_model_dir, qa_file, tmp_path / "fitted.safetensors", ratio=ratio, min_diff=0.0)
    diffs = fitted.diff.flatten().sort().values
    min_diff = float((diffs[2] + diffs[3]) / 2)
    expected = reference_expert(tiny_model_dir, qa_file, ratio=ratio, top_pct=0.7, min_diff=min_diff)
    output = derive_bank(
        stats=str(stats_path_for(tmp_path / "fitted.safetensors")),
        output=str(tmp_path / "expert.safetensors"),
        top_pct=0.7,
        min_diff=min_diff,
        head_filter="reference",
        positive_only=True,
    )
    bank = ProjectionBank.load(output)

    assert 0 < expected["filtered"] < len(ordered)
    assert bank.metadata["triplets_filtered_attention"] == expected["filtered"]
    assert bank.metadata["triplets_used"] == expected["kept"]
    assert bank.metadata["positive_only"] is True and bank.metadata["negative_text"] is False
    assert bank.neg is None and bank.metadata["attention_ratio"] == ratio
    skipped = torch.isnan(expected["s_pos"]).all(-1)
    assert skipped.sum() == 3 and torch.equal(torch.isnan(bank.s_pos).all(-1), skipped)
    assert torch.isnan(bank.u_pos[skipped]).all() and (bank.pos[skipped] == 0).all()
    assert (bank.pos - expected["pos"]).abs().max() < 1e-5
    torch.testing.assert_close(bank.s_pos[~skipped], expected["s_pos"][~skipped], rtol=1e-5, atol=1e-6)

    # the {expert: path} JSON of the reference loads these banks
    (tmp_path / "experts.json").write_text(json.dumps({"qa": str(tmp_path / "expert.safetensors")}))
    experts = ExpertSet.load(str(tmp_path / "experts.json"))
    assert experts.names == ("qa",) and torch.equal(
        torch.isnan(experts.factors[0][0][0]).flatten(1).all(-1), skipped[0]
    )


def test_positive_only_collection_runs_two_texts_per_triplet_in_one_pass_and_filters_by_ratio(
    tiny_model, tokenizer, qa_file
):
    triplets = list(iter_triplets(read_pairs(qa_file, max_samples=4)))
    layout = resolve_layout(tiny_model)
    rows = []
    handle = tiny_model.register_forward_pre_hook(lambda m, a, kw: rows.append(len(kw["input_ids"])), with_kwargs=True)
    try:
        three = collect_triplet_keys(tiny_model, tokenizer, layout, [0, 1, 2], triplets, device=torch.device("cpu"))
        assert rows == [3 * three.kept] and three.negative is not None
        rows.clear()
        full = collect_triplet_keys(
            tiny_model, tokenizer, layout, [0, 1, 2], triplets, device=torch.device("cpu"), positive_only=True
        )
        assert rows == [2 * full.kept] and full.negative is None  # the negative text is never run
        torch.testing.assert_close(full.positive, three.positive, rtol=0, atol=1e-6)  # rows do not interact
        # the attention filter sees the same masses whether the negative texts share the pass or not
        filtered = [
            collect_triplet_keys(
                tiny_model, tokenizer, layout, [0, 1, 2], triplets, device=torch.device("cpu"),
                positive_only=positive_only, attention_ratio=0.5,
            )
            for positive_only in (False, True)
        ]  # fmt: skip
        assert filtered[0].kept == filtered[1].kept and filtered[0].skipped_attention == filtered[1].skipped_attention
        assert 0 < filtered[0].kept < three.kept, "ratio 0.5 must keep some triplets and drop others here"
        torch.testing.assert_close(filtered[0].positive, filtered[1].positive, rtol=0, atol=1e-6)
        none_kept = collect_triplet_keys(
            tiny_model, tokenizer, layout, [0, 2], triplets, device=torch.device("cpu"),
            positive_only=True, attention_ratio=1e9,
        )  # fmt: skip
    finally:
        handle.remove()
    assert none_kept.kept == 0 and none_kept.skipped_attention == full.kept
    assert none_kept.positive.shape[1] == 0
    assert tiny_model.config._attn_implementation == "sdpa", "the eager switch must be undone"


def test_attention_rule_edge_cases():
    neutral = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    positive = torch.tensor([0.0, 0.1, 1.2, 1.19], dtype=torch.float64)
    assert attention_kept(neutral, positive, 1.2).tolist() == [False, True, True, False]


def test_attention_ratio_is_validated(tiny_model_dir):
    with pytest.raises(ValueError, match=r"attention_ratio must be > 0 \(the reference uses 1.2\) or None"):
        ProjectionBuilder(str(tiny_model_dir), attention_ratio=0.0)
