"""Every shipped YAML parses against the code it configures, and `--print_config` output is a valid config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from seka_lightning.cli import run_lightning
from seka_lightning.data import generator

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# fragments stacked after an eval config are tested in tests/scripts/test_results_runner.py
FRAGMENTS = (CONFIGS / "models", CONFIGS / "methods")
LIGHTNING_CONFIGS = sorted(
    p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "data" and not any(f in p.parents for f in FRAGMENTS)
)
SUBCOMMAND = {"build": "fit", "predict": "predict", "validate": "validate", "eval": "predict", "gate": "fit"}


@pytest.mark.parametrize("path", LIGHTNING_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_lightning_config_parses_and_prints_a_valid_config(path, tmp_path, capsys):
    subcommand = SUBCOMMAND[path.parent.name]
    with pytest.raises(SystemExit) as exit_info:
        run_lightning([subcommand, "-c", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["class_path"] == yaml.safe_load(path.read_text())["model"]["class_path"]
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        run_lightning([subcommand, "-c", str(tmp_path / "printed.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == config


def test_generator_config_parses(capsys):
    with pytest.raises(SystemExit):
        generator.main(["--config", str(CONFIGS / "data" / "generate.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["n"] == 2000


def test_configs_exist():
    assert {p.parent.name for p in LIGHTNING_CONFIGS} >= {"build", "predict"}
