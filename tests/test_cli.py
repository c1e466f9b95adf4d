"""The `seka` entry point: plain subcommands are listed in --help; builds pick the frozen-model DDP strategy."""

from __future__ import annotations

import pytest

from seka_lightning.cli import PLAIN_COMMANDS, main, requested_devices


def test_help_lists_the_plain_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in PLAIN_COMMANDS:
        assert f"seka {name}" in out
    assert "{fit,validate,test,predict}" in out


def test_requested_devices_on_cpu():
    assert requested_devices("cpu", 2) == 2
    assert requested_devices("cpu", "3") == 3
    assert requested_devices("cpu", "auto") == 1
    assert requested_devices("cpu", [0, 1]) == 2


def test_derive_reports_a_missing_statistics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(
            ["derive", "--stats", str(tmp_path / "none.stats.safetensors"), "--output", str(tmp_path / "b.safetensors")]
        )


@pytest.mark.parametrize(
    ("devices", "num_nodes", "expected"),
    [("1", "1", "auto"), ("2", "1", "ddp_frozen"), ("1", "2", "ddp_frozen")],
)
def test_builds_on_several_processes_use_the_frozen_ddp_strategy(tiny_model_dir, qa_file, devices, num_nodes, expected):
    from seka_lightning.cli import run_lightning

    cli = run_lightning(
        [
            "--model",
            "seka_lightning.lit.builder.ProjectionBuilder",
            "--model.pretrained",
            str(tiny_model_dir),
            "--data",
            "seka_lightning.data.synthetic_qa.SyntheticQADataModule",
            "--data.path",
            str(qa_file),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            devices,
            "--trainer.num_nodes",
            num_nodes,
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    strategy = cli.trainer.strategy
    assert (type(strategy).__name__ == "FrozenModelDDPStrategy") == (expected == "ddp_frozen")
