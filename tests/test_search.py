"""`seka search`: the grid covers every setting, reuses derived banks, picks the best dev score, and refuses a
threshold that keeps no head before the model loads."""

from __future__ import annotations

import json
import re

import pytest
import torch

from seka_lightning import search as search_module
from seka_lightning.lit.builder import ProjectionBuilder, stats_path_for
from seka_lightning.search import search
from seka_lightning.stats import KeySums

CASES = [
    (0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French", ["{} is a native speaker of"]),
    (1, "Toyota", "{} is based in", "Germany", "Japan", ["The headquarters of {} are in"]),
]


@pytest.fixture
def stats(tiny_model_dir, qa_file, tmp_path):
    import lightning as L

    from seka_lightning.data.synthetic_qa import SyntheticQADataModule

    bank = tmp_path / "bank.safetensors"
    builder = ProjectionBuilder(str(tiny_model_dir), min_diff=0.0, output=str(bank))
    L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(
        builder, datamodule=SyntheticQADataModule(str(qa_file), batch_size=4, max_samples=6)
    )
    return stats_path_for(bank)


def relative_values(path) -> torch.Tensor:
    """The relative head filter in float64, from the sums: sqrt(Σ||h+ - h-||² / Σ||h||²)."""
    sums, _ = KeySums.load(path)
    return (sums.d_pos_neg / torch.einsum("lhdd->lh", sums.a0)).sqrt()


def test_search_grid_and_best(tiny_model_dir, counterfact_file, stats, tmp_path):
    largest = float(relative_values(stats).max())  # keeps exactly one head
    data = counterfact_file(CASES)
    result = search(
        pretrained=str(tiny_model_dir),
        stats=str(stats),
        output=str(tmp_path / "search.json"),
        data=str(data),
        example_subset="0:2",
        layers=["all", "last1"],
        gains=[0.0, 2.0],
        min_diffs=[0.0, largest],
        top_pcts=[0.5, 0.9],
    )
    assert len(result["grid"]) == 16
    assert {(g["top_pct"], g["min_diff"], g["layers"], g["gain_pos"]) for g in result["grid"]} == {
        (t, m, spec, g) for t in (0.5, 0.9) for m in (0.0, largest) for spec in ("all", "last1") for g in (0.0, 2.0)
    }
    assert {g["heads_kept"] for g in result["grid"] if g["min_diff"] == largest} == {1}
    assert {g["head_filter"] for g in result["grid"]} == {"relative"}
    # a different top_pct is a different projector: some steered score moves with it
    by_pct = {
        t: [
            g["efficacy_magnitude"] for g in result["grid"] if g["top_pct"] == t and g["gain_pos"] and not g["min_diff"]
        ]
        for t in (0.5, 0.9)
    }
    assert by_pct[0.5] != by_pct[0.9]
    # zero gain reproduces the unsteered scores exactly
    for g in result["grid"]:
        if g["gain_pos"] == 0.0:
            assert g["efficacy_score"] == result["none"]["efficacy_score"]
            assert g["efficacy_magnitude"] == result["none"]["efficacy_magnitude"]
    objective = [(g["efficacy_score"] + g["paraphrase_score"]) / 2 for g in result["grid"]]
    assert (result["best"]["efficacy_score"] + result["best"]["paraphrase_score"]) / 2 == max(objective)
    assert json.loads((tmp_path / "search.json").read_text())["best"] == result["best"]


def test_a_min_diff_that_keeps_no_head_fails_before_the_model_loads(
    tiny_model_dir, counterfact_file, stats, tmp_path, monkeypatch
):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the grid was checked")

    monkeypatch.setattr(search_module, "load_model", no_model)
    sums, _ = KeySums.load(stats)
    heads = sums.d_pos_neg.numel()
    largest = float(relative_values(stats).max())
    kwargs = {"pretrained": str(tiny_model_dir), "stats": str(stats), "data": str(counterfact_file(CASES))}
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"min_diff=1000000000.0 keeps none of the {heads} heads: the largest 'relative' head-filter value is "
            f"{largest:.6g}; set min_diff to at most"
        ),
    ):
        search(**kwargs, output=str(tmp_path / "s.json"), min_diffs=[0.0, 1e9])
    with pytest.raises(ValueError, match=re.escape(f"the output {stats} is also this command's input --stats")):
        search(**kwargs, output=str(stats))
    assert not (tmp_path / "s.json").exists()
