"""The `seka` entry point: one help, version, typo suggestions and `-c` for every subcommand, no optimizer options,
short class names, missing inputs reported before loading, known-benign warnings filtered (and no others); builds
pick the frozen-model DDP strategy."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist
import yaml
from lightning.pytorch.cli import LightningCLI
from tests.conftest import REPO, printed_predict_config

from seka_lightning import __version__
from seka_lightning.cli import LIGHTNING_COMMANDS, PLAIN_COMMANDS, SekaCLI, main, requested_devices, run_lightning
from seka_lightning.console import LIGHTNING_LOGGERS, install_quiet_console
from seka_lightning.models import load_model, looks_like_local_path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def exit_code_and_output(capsys, argv: list[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_help_lists_every_subcommand(capsys):
    code, out, _ = exit_code_and_output(capsys, ["--help"])
    assert code == 0
    for name in [*LIGHTNING_COMMANDS, *PLAIN_COMMANDS]:
        assert f"\n  {name} " in out
    assert "test" not in LIGHTNING_COMMANDS


def test_version(capsys):
    main(["--version"])
    assert capsys.readouterr().out == f"seka {__version__}\n"


@pytest.mark.parametrize(("typo", "meant"), [("fti", "fit"), ("predcit", "predict"), ("genrate", "generate")])
def test_an_unknown_subcommand_suggests_the_nearest(capsys, typo, meant):
    code, _, err = exit_code_and_output(capsys, [typo])
    assert code == 2
    assert f"unknown command {typo!r}; did you mean {meant!r}?" in err


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["derive", "--stats", "s.stats.safetensors", "--outptu", "b.safetensors"], "did you mean --output?"),
        (["fit", "-c", str(CONFIGS / "build/smollm2-135m.yaml"), "--trainer.max_epocs", "1"], "--trainer.max_epochs?"),
        (["fit", "-c", str(CONFIGS / "build/smollm2-135m.yaml"), "--model.top_pc", "1"], "--model.top_pct?"),
        (["fit", "-c", str(CONFIGS / "build/smollm2-135m.yaml"), "--model", "ProjectionBuildr"], "ProjectionBuilder?"),
    ],
)
def test_an_unknown_option_or_class_suggests_the_nearest(capsys, argv, hint):
    code, _, err = exit_code_and_output(capsys, [*argv, "--print_config"])
    assert code == 2
    assert err.rstrip().endswith(hint)


@pytest.mark.parametrize("command", list(LIGHTNING_COMMANDS))
def test_lightning_commands_have_no_optimizer_options(capsys, command):
    code, out, _ = exit_code_and_output(capsys, [command, "--help"])
    assert code == 0
    assert "--optimizer" not in out and "--lr_scheduler" not in out
    assert "--model " in out and "--trainer.callbacks" in out


def test_plain_commands_read_a_config_with_c(tmp_path):
    config = tmp_path / "derive.yaml"
    config.write_text(yaml.safe_dump({"stats": str(tmp_path / "none.stats.safetensors"), "output": "b.safetensors"}))
    with pytest.raises(FileNotFoundError, match=r"none\.stats\.safetensors does not exist"):
        main(["derive", "-c", str(config)])


def test_generate_reports_a_missing_bank_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr("seka_lightning.generate.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    config = tmp_path / "generate.yaml"
    config.write_text(yaml.safe_dump({"bank": str(tmp_path / "missing.safetensors"), "max_new_tokens": 4}))
    with pytest.raises(FileNotFoundError, match=r"bank '.*missing\.safetensors' does not exist; build one with"):
        main(["generate", "Where is **X**?", "-c", str(config)])


def test_short_class_names_resolve_in_a_fresh_process():
    """Every configurable class is importable at CLI start (a fresh process has imported nothing else)."""
    config = printed_predict_config(
        "--model", "BenchmarkEvaluator", "--model.method", "RandomProjectionMethod",
        "--model.method.bank", "b.safetensors", "--data", "PronChangeDataModule",
    )  # fmt: skip
    assert config["model"]["class_path"] == "seka_lightning.lit.evaluator.BenchmarkEvaluator"
    method = config["model"]["init_args"]["method"]["class_path"]
    assert method == "seka_lightning.baselines.random_projection.RandomProjectionMethod"
    assert config["data"]["class_path"].endswith(".PronChangeDataModule")


def test_adaseka_method_resolves_by_its_short_name_in_a_fresh_process():
    """The AdaSEKA package is imported at CLI start too, so ``--model.method AdaSekaMethod`` resolves."""
    config = printed_predict_config("--model.method", "AdaSekaMethod", "--model.method.experts", "experts.json")
    method = config["model"]["init_args"]["method"]["class_path"]
    assert method == "seka_lightning.adaseka.method.AdaSekaMethod"


@pytest.mark.parametrize("key", ["bank", "pretrained"])
def test_a_missing_bank_or_model_path_fails_before_loading(tmp_path, monkeypatch, key):
    monkeypatch.setattr("seka_lightning.lit.frozen.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    missing = str(tmp_path / "missing" / ("bank.safetensors" if key == "bank" else "model"))
    bank = tmp_path / "bank.safetensors"
    bank.touch()
    paths = {"method.bank": str(bank), "pretrained": "embedded:smollm2-135m"}
    paths["method.bank" if key == "bank" else key] = missing
    argv = ["-c", str(CONFIGS / "predict/highlight.yaml")]  # run=False: no subcommand
    argv += [f"--model.{name}={value}" for name, value in paths.items()]
    with pytest.raises(FileNotFoundError, match=f"'{missing}' does not exist"):
        run_lightning(argv, run=False)


def test_a_missing_local_model_path_is_not_a_hub_error():
    with pytest.raises(FileNotFoundError, match=r"model path './no/such-model' does not exist; pass an existing"):
        load_model("./no/such-model")
    assert looks_like_local_path("~/models/x") and looks_like_local_path("a/b/c")
    assert not looks_like_local_path("HuggingFaceTB/SmolLM2-135M-Instruct")  # org/name stays a hub id


def test_only_the_known_benign_warnings_are_filtered():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        install_quiet_console()
        warnings.warn(
            "You passed in a `val_dataloader` but have no `validation_step`. Skipping val loop.", stacklevel=1
        )
        warnings.warn("Found 397 module(s) in eval mode at the start of training.", stacklevel=1)
        warnings.warn("The 'predict_dataloader' does not have many workers which may be a bottleneck.", stacklevel=1)
        warnings.warn("the prompt has no highlighted span", stacklevel=1)
    assert [str(w.message) for w in caught] == ["the prompt has no highlighted span"]


def test_lightning_tips_are_dropped_and_other_lines_kept():
    install_quiet_console()
    logger = logging.getLogger(LIGHTNING_LOGGERS[0])

    def record(message: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, (), None)

    assert not logger.filter(record("💡 Tip: For seamless cloud uploads and versioning, try installing litmodels"))
    assert not logger.filter(record("GPU available: False, used: False"))
    assert logger.filter(record("Restoring states from the checkpoint path at last.ckpt"))


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


def test_generate_prints_the_unsteered_and_steered_continuations(tiny_model_dir, tmp_path, capsys):
    import torch

    from seka_lightning.bank import ProjectionBank
    from seka_lightning.cli import run_plain

    q, _ = torch.linalg.qr(torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(0)))
    ProjectionBank(layers=[0, 1, 2], pos=q[..., :4] @ q[..., :4].transpose(-1, -2)).save(tmp_path / "bank.safetensors")
    common = ["--bank", str(tmp_path / "bank.safetensors"), "--pretrained", str(tiny_model_dir), "--layers", "all"]
    common += ["--chat", "false", "--max_new_tokens", "4", "--device", "cpu"]
    prompt = "the keepers carry **silver lanterns** to the tower"
    zero = run_plain("generate", [prompt, *common, "--gain_pos", "0"])
    assert zero["steered"] == zero["unsteered"]  # zero gain edits nothing
    model, tokenizer = load_model(str(tiny_model_dir))
    ids = tokenizer(prompt.replace("**", ""), return_tensors="pt", add_special_tokens=False)["input_ids"]
    reference = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert zero["unsteered"] == tokenizer.decode(reference[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert "unsteered" in capsys.readouterr().out


def test_fit_suggests_the_shipped_predict_config_of_its_model():
    import lightning as L

    from seka_lightning.cli import fit_summary
    from seka_lightning.lit.builder import ProjectionBuilder

    builder = ProjectionBuilder.__new__(ProjectionBuilder)  # the hyperparameters only: no model is loaded
    L.LightningModule.__init__(builder)
    trainer = SimpleNamespace(logger=None)
    expected = {
        "embedded:gemma3-270m": "next: seka predict -c configs/predict/highlight-gemma3.yaml --model.method.bank b",
        "embedded:smollm2-135m": "next: seka predict -c configs/predict/highlight.yaml --model.method.bank b",
        "org/other": "next: seka predict -c configs/predict/highlight.yaml --model.pretrained org/other "
        "--model.method.bank b",
    }
    for pretrained, line in expected.items():
        builder.save_hyperparameters({"output": "b", "pretrained": pretrained})
        assert fit_summary(builder, trainer)[0] == line
    builder.save_hyperparameters({"output": "b", "pretrained": "embedded:smollm2-135m", "chat": True})
    assert (
        fit_summary(builder, trainer)[0]
        == "next: seka predict -c configs/predict/highlight-chat.yaml --model.method.bank b"
    )


def test_a_method_option_set_to_null_on_the_command_line_is_null():
    """``--model.method.X null`` (two classes deep) parses to None for ``str | None`` and ``int | None`` options;
    jsonargparse alone gave the string 'None' (then "bank 'None' does not exist") and refused the int option."""
    key_scaling = str(REPO / "configs" / "methods" / "gemma3-270m" / "key_scaling.yaml")
    config = printed_predict_config(
        "-c",
        key_scaling,
        "--model.method.bank",
        "null",
        "--model.method.length_reference=null",
    )
    init_args = config["model"]["init_args"]["method"]["init_args"]
    assert init_args["bank"] is None
    assert init_args["length_reference"] is None
    shipped = yaml.safe_load(Path(key_scaling).read_text())["model"]["init_args"]["method"]["init_args"]
    assert init_args["layers"] == shipped["layers"]  # the config's other values stay
    assert init_args["gain_pos"] == shipped["gain_pos"]
    for literal in ("None.pt", "a=None"):  # other strings stay strings
        kept = printed_predict_config("-c", key_scaling, "--model.method.bank", literal)
        assert kept["model"]["init_args"]["method"]["init_args"]["bank"] == literal


@pytest.fixture
def gloo_group(tmp_path):
    """Opens a one-process gloo group (``open()``); whatever a test leaves open is closed after it."""
    yield lambda: dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_lightning_command_closes_the_process_group_it_leaves_open(gloo_group, monkeypatch):
    """Lightning keeps the DDP group open after a run; a gloo group still open at exit can abort a good run's process
    (-6, `terminate called without an active exception`), so the CLI closes it after the command, also on failure."""

    def run_in_a_group(self, subcommand):
        gloo_group()
        raise RuntimeError("the command failed")

    monkeypatch.setattr(LightningCLI, "_run_subcommand", run_in_a_group)
    with pytest.raises(RuntimeError, match="the command failed"):
        object.__new__(SekaCLI)._run_subcommand("fit")
    assert not dist.is_initialized()


def test_a_group_the_caller_opened_stays_open(gloo_group, monkeypatch):
    gloo_group()
    monkeypatch.setattr(LightningCLI, "_run_subcommand", lambda self, subcommand: None)
    object.__new__(SekaCLI)._run_subcommand("fit")
    assert dist.is_initialized()
