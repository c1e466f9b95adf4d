"""``seka search``: pick SEKA's layers, gain and min_diff on a dev slice, cheaply.

Banks for each ``top_pct`` and ``min_diff`` are derived from saved key statistics (no rebuild); each (layers, gain) is scored on
the CounterFact dev slice (records 4500:5000 by default, never the reported 5000:10000) with the same scorer and
encoding as ``seka predict``. The objective is the mean of efficacy and paraphrase scores, ties broken by the
efficacy magnitude.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from seka_lightning.bank import ProjectionBank
from seka_lightning.benchmarks import CounterFactDataModule, evaluate
from seka_lightning.files import SEARCH_RESULTS, check_output, write_json
from seka_lightning.methods import HighlightMethod, SekaMethod
from seka_lightning.models import load_model
from seka_lightning.projections import (
    DEFAULT_HEAD_FILTER,
    head_filter_values,
    require_kept_heads,
    validate_hyperparameters,
)
from seka_lightning.stats import KeySums

log = logging.getLogger(__name__)


def evaluate_counterfact(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    method: HighlightMethod,
    benchmark: CounterFactDataModule,
    *,
    chat: bool,
    add_special_tokens: bool,
) -> dict[str, float]:
    """Efficacy/paraphrase scores of ``method`` on the CounterFact slice of ``benchmark`` (through :func:`evaluate`)."""
    return evaluate(method, model, tokenizer, benchmark, chat=chat, add_special_tokens=add_special_tokens).metrics


def search(
    *,
    pretrained: str,
    stats: str,
    output: str,
    data: str = "../shared/data/counterfact",
    example_subset: str = "4500:5000",
    layers: list[str] = ["all", "last20", "last10"],  # noqa: B006 - jsonargparse needs a literal default
    gains: list[float] = [0.5, 1.0, 2.0, 4.0],  # noqa: B006
    min_diffs: list[float] = [0.0, 0.05, 0.1],  # noqa: B006
    top_pcts: list[float] = [0.9],  # noqa: B006
    head_filter: str = DEFAULT_HEAD_FILTER,
    batch_size: int = 16,
    chat: bool = False,
    add_special_tokens: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Grid-search SEKA hyper-parameters on a CounterFact dev slice; writes all scores and the best setting as JSON.

    Args:
        pretrained: the model (hub id, path, or ``embedded:...``).
        stats: ``*.stats.safetensors`` written by ``seka fit`` for this model.
        output: JSON file for the grid and the best setting.
        data: CounterFact folder or file.
        example_subset: the dev slice (never the reported test slice).
        layers: layer selections to try (``all`` = every layer of the bank, ``lastN``, ...).
        gains: ``gain_pos`` values to try.
        min_diffs: head-filter thresholds to try (banks derived from ``stats``); each must keep some head.
        top_pcts: spectrum fractions kept by P+ to try (banks derived from ``stats``).
        head_filter: how ``min_diffs`` are measured: ``relative`` (default, ``sqrt(D / trace(A0))``, independent
            of N) or ``reference`` (the reference's ``sqrt(D) / N``).
        batch_size: prompts per batch.
        chat: wrap prompts in the chat template.
        add_special_tokens: let the tokenizer add BOS (base models such as Gemma-3).
        dtype: model dtype.
        overwrite: replace an existing search result at ``output``.
    """
    started = time.perf_counter()
    check_output(output, kind=SEARCH_RESULTS, inputs={"--stats": stats, "--data": data}, overwrite=overwrite)
    sums, metadata = KeySums.load(stats)
    bank_layers = metadata.pop("layers")
    for top_pct, min_diff in itertools.product(top_pcts, min_diffs):
        validate_hyperparameters(top_pct, min_diff, head_filter)
    diff = head_filter_values(sums, head_filter=head_filter)
    for min_diff in min_diffs:
        require_kept_heads(diff, min_diff=min_diff, head_filter=head_filter)
    model, tokenizer = load_model(pretrained, dtype=dtype)
    if torch.cuda.is_available():
        model.cuda()
    datamodule = CounterFactDataModule(data, example_subset=example_subset, batch_size=batch_size)
    kwargs = {"chat": chat, "add_special_tokens": add_special_tokens}
    baseline = evaluate_counterfact(model, tokenizer, HighlightMethod(), datamodule, **kwargs)
    log.info("none: %s", baseline)
    grid = []
    with tempfile.TemporaryDirectory(prefix="seka-search-") as folder:
        for top_pct, min_diff in itertools.product(top_pcts, min_diffs):
            bank = ProjectionBank.from_statistics(
                sums, layers=bank_layers, top_pct=top_pct, min_diff=min_diff, head_filter=head_filter, metadata=metadata
            )
            # Each grid point gets a fresh method reading the derived bank from a file, as `seka predict` would.
            bank_file = str(bank.save(Path(folder) / f"top_pct-{top_pct}_min_diff-{min_diff}.safetensors"))
            for layer_spec, gain in itertools.product(layers, gains):
                method = SekaMethod(bank_file, gain_pos=gain, layers=layer_spec)
                scores = evaluate_counterfact(model, tokenizer, method, datamodule, **kwargs)
                grid.append(
                    {
                        "top_pct": top_pct,
                        "min_diff": min_diff,
                        "head_filter": head_filter,
                        "layers": layer_spec,
                        "gain_pos": gain,
                        "heads_kept": bank.metadata["heads_kept"],
                        **scores,
                    }
                )
                log.info("%s", grid[-1])
    best = max(grid, key=lambda g: ((g["efficacy_score"] + g["paraphrase_score"]) / 2, g["efficacy_magnitude"]))
    result = {
        "model": pretrained,
        "stats": stats,
        "dev": {"data": data, "example_subset": example_subset, "examples": len(datamodule.examples)},
        "settings": {
            "top_pcts": top_pcts,
            "head_filter": head_filter,
            "chat": chat,
            "add_special_tokens": add_special_tokens,
            "dtype": dtype,
        },
        "none": baseline,
        "grid": grid,
        "best": best,
        "wall_time_s": time.perf_counter() - started,
    }
    write_json(output, result)
    log.info("best on %s %s: %s (none: %s)", data, example_subset, best, baseline)
    return result
