"""`seka search`: the grid covers every setting, reuses derived banks, and picks the best dev score."""

from __future__ import annotations

import json

from seka_lightning.lit.builder import ProjectionBuilder, stats_path_for
from seka_lightning.search import search

CASES = [
    (0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French", ["{} is a native speaker of"]),
    (1, "Toyota", "{} is based in", "Germany", "Japan", ["The headquarters of {} are in"]),
]


def test_search_grid_and_best(tiny_model_dir, qa_file, counterfact_file, tmp_path):
    import lightning as L

    from seka_lightning.data.synthetic_qa import SyntheticQADataModule

    bank = tmp_path / "bank.safetensors"
    builder = ProjectionBuilder(str(tiny_model_dir), min_diff=0.0, output=str(bank))
    L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(
        builder, datamodule=SyntheticQADataModule(str(qa_file), batch_size=4, max_samples=6)
    )
    data = counterfact_file(CASES)
    result = search(
        pretrained=str(tiny_model_dir),
        stats=str(stats_path_for(bank)),
        output=str(tmp_path / "search.json"),
        data=str(data),
        example_subset="0:2",
        layers=["all", "last1"],
        gains=[0.0, 2.0],
        min_diffs=[0.0, 1e9],
        top_pcts=[0.5, 0.9],
    )
    assert len(result["grid"]) == 16
    assert {(g["top_pct"], g["min_diff"], g["layers"], g["gain_pos"]) for g in result["grid"]} == {
        (t, m, spec, g) for t in (0.5, 0.9) for m in (0.0, 1e9) for spec in ("all", "last1") for g in (0.0, 2.0)
    }
    # a different top_pct is a different projector: some steered score moves with it
    by_pct = {
        t: [
            g["efficacy_magnitude"] for g in result["grid"] if g["top_pct"] == t and g["gain_pos"] and not g["min_diff"]
        ]
        for t in (0.5, 0.9)
    }
    assert by_pct[0.5] != by_pct[0.9]
    # zero gain and an all-skipping min_diff reproduce the unsteered scores exactly
    for g in result["grid"]:
        if g["gain_pos"] == 0.0 or g["min_diff"] == 1e9:
            assert g["efficacy_score"] == result["none"]["efficacy_score"]
            assert g["efficacy_magnitude"] == result["none"]["efficacy_magnitude"]
    objective = [(g["efficacy_score"] + g["paraphrase_score"]) / 2 for g in result["grid"]]
    assert (result["best"]["efficacy_score"] + result["best"]["paraphrase_score"]) / 2 == max(objective)
    assert json.loads((tmp_path / "search.json").read_text())["best"] == result["best"]
