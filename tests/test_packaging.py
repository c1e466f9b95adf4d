"""The shipped configs and data: name resolution, the data-path fallback, `seka init`, and what a built wheel holds."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from seka_lightning import resources
from seka_lightning.cli import main, resolve_config_args
from seka_lightning.resources import init, resolve_config, resolve_data_path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.relative_to(REPO).as_posix() for folder in ("configs", "data") for p in (REPO / folder).rglob("*"))
SHIPPED = [name for name in SHIPPED if (REPO / name).is_file()]


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    """A shipped tree with names shared across folders."""
    root = tmp_path / "shipped"
    for name in ("build/a", "validate/a", "build/x", "adaseka/build/x", "predict/h", "eval/h", "eval/only"):
        path = root / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {name}\n")
    (root / "data").mkdir()
    (root / "data" / "d.jsonl").write_text("{}\n")
    return root


def test_a_bare_name_is_looked_up_in_the_commands_folders(fake_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = fake_root / "configs"
    assert resolve_config("a", command="fit", root=fake_root) == str(configs / "build/a.yaml")
    assert resolve_config("a.yaml", command="validate", root=fake_root) == str(configs / "validate/a.yaml")
    assert resolve_config("x", command="fit", root=fake_root) == str(configs / "build/x.yaml")
    assert resolve_config("only", command="predict", root=fake_root) == str(configs / "eval/only.yaml")
    with pytest.raises(
        ValueError, match=r"config name 'h' is ambiguous: it names eval/h, predict/h; give one of these"
    ):
        resolve_config("h", command="predict", root=fake_root)
    with pytest.raises(ValueError, match=r"'a' is ambiguous: it names build/a, validate/a"):
        resolve_config("a", command="generate", root=fake_root)


def test_a_path_under_configs_names_any_shipped_config(fake_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = str(fake_root / "configs" / "adaseka/build/x.yaml")
    for value in ("adaseka/build/x", "adaseka/build/x.yaml", "configs/adaseka/build/x.yaml"):
        assert resolve_config(value, command="fit", root=fake_root) == expected
    with pytest.raises(
        FileNotFoundError, match=r"config 'buidl/a' is neither a file nor a shipped config; did you mean 'build/a'\?"
    ):
        resolve_config("buidl/a", command="fit", root=fake_root)
    with pytest.raises(
        FileNotFoundError, match="config 'onyl' is neither a file nor a shipped config; did you mean 'eval/only'"
    ):
        resolve_config("onyl", command="predict", root=fake_root)
    with pytest.raises(
        FileNotFoundError, match="config 'only' is neither a file nor a shipped config; give its path: eval/only"
    ):
        resolve_config("only", command="fit", root=fake_root)  # eval/ is not a folder of fit


def test_files_and_inline_yaml_are_never_replaced(fake_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").write_text("trainer: {}\n")  # a user's file with the name of a shipped config
    assert resolve_config("a", command="fit", root=fake_root) == "a"
    assert resolve_config("trainer: {max_epochs: 1}", command="fit", root=fake_root) == "trainer: {max_epochs: 1}"


def test_the_real_configs_resolve_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_config("smollm2-135m", command="fit")) == REPO / "configs/build/smollm2-135m.yaml"
    assert Path(resolve_config("smollm2-135m-chat", command="fit")) == REPO / "configs/build/smollm2-135m-chat.yaml"
    assert Path(resolve_config("smollm2-135m", command="validate")) == REPO / "configs/validate/smollm2-135m.yaml"
    assert (
        Path(resolve_config("configs/eval/counterfact.yaml", command="predict"))
        == REPO / "configs/eval/counterfact.yaml"
    )
    args = resolve_config_args(["fit", "--config=smollm2-135m", "--trainer.devices", "1", "-c", "build/sharded"])
    assert args == [
        "fit",
        f"--config={REPO / 'configs/build/smollm2-135m.yaml'}",
        "--trainer.devices",
        "1",
        "-c",
        str(REPO / "configs/build/sharded.yaml"),
    ]


def test_an_unknown_config_name_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "-c", "smollm2-135"])
    assert stop.value.code == 2
    assert (
        "seka: error: config 'smollm2-135' is neither a file nor a shipped config; did you mean 'build/smollm2-135m'?"
        in (capsys.readouterr().err)
    )


def test_seka_fit_reads_a_shipped_config_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "-c", "smollm2-135m", "--print_config"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert "output: checkpoints/smollm2-135m.safetensors" in printed and "path: data/synthetic_qa.jsonl" in printed


def test_a_missing_relative_data_path_reads_the_shipped_file(fake_root, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    resources._log_fallback.cache_clear()
    with caplog.at_level(logging.INFO, logger="seka_lightning.resources"):
        assert resolve_data_path("data/d.jsonl", root=fake_root) == fake_root / "data/d.jsonl"
    assert (
        f"data/d.jsonl is not in the working directory; reading the shipped {fake_root / 'data/d.jsonl'}" in caplog.text
    )
    assert resolve_data_path("data/other.jsonl", root=fake_root) == Path("data/other.jsonl")  # shipped nowhere
    assert resolve_data_path("src/d.jsonl", root=fake_root) == Path("src/d.jsonl")  # not a shipped folder
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.jsonl").write_text("mine\n")
    assert resolve_data_path("data/d.jsonl", root=fake_root) == Path("data/d.jsonl")  # the user's file wins


def test_shipped_prompts_are_read_from_another_directory(tmp_path, monkeypatch):
    from seka_lightning.data.prompts import read_prompts

    expected = read_prompts(REPO / "data/prompts/knowledge_conflict.jsonl")
    monkeypatch.chdir(tmp_path)
    assert read_prompts("data/prompts/knowledge_conflict.jsonl") == expected and len(expected) == 24


def test_init_copies_everything_and_never_overwrites_silently(tmp_path, caplog):
    target = tmp_path / "project"
    with caplog.at_level(logging.INFO, logger="seka_lightning.resources"):
        main(["init", str(target)])
    copied = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert copied == SHIPPED
    assert all((target / name).read_bytes() == (REPO / name).read_bytes() for name in SHIPPED)
    assert f"copied {len(SHIPPED)} file(s) to {target} (0 already there)" in caplog.text
    assert init(str(target)) == []  # identical files are left alone
    edited = target / "configs/build/smollm2-135m.yaml"
    edited.write_text("# my edits\n")
    with pytest.raises(
        FileExistsError,
        match=r"1 file\(s\) in .* differ from the shipped ones .*smollm2-135m.yaml\); nothing was copied: pass --overwrite true",
    ):
        init(str(target))
    assert edited.read_text() == "# my edits\n"
    assert init(str(target), overwrite=True) == [edited]
    assert edited.read_bytes() == (REPO / "configs/build/smollm2-135m.yaml").read_bytes()
    blocked = tmp_path / "blocked"
    (blocked / "data" / "synthetic_qa.jsonl").mkdir(parents=True)
    with pytest.raises(
        FileExistsError, match="synthetic_qa.jsonl is in the way of the shipped files .* nothing was copied"
    ):
        init(str(blocked), overwrite=True)
    assert not (blocked / "configs").exists()


def build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the project (the build writes build/ and *.egg-info beside the sources)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(REPO / name, project / name)
    for name in ("configs", "data", "src"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."]
    subprocess.run(command, cwd=project, check=True, capture_output=True)
    (wheel,) = (project / "dist").glob("seka_lightning-*.whl")
    return wheel


def test_the_wheel_ships_the_configs_and_data_and_they_resolve_from_it(tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        shipped = sorted(
            n.removeprefix("seka_lightning/shipped/") for n in names if n.startswith("seka_lightning/shipped/")
        )
        assert shipped == SHIPPED
        site = tmp_path / "site"
        archive.extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    probe = (
        "import json, seka_lightning; from seka_lightning.resources import init, resolve_config, resolve_data_path; "
        "init('copy'); print(json.dumps([seka_lightning.__file__, resolve_config('smollm2-135m', command='fit'), "
        "str(resolve_data_path('data/synthetic_qa.jsonl'))]))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, check=True, capture_output=True, text=True)
    package, config, data = (Path(p) for p in json.loads(out.stdout))
    assert package.parent == site / "seka_lightning"
    assert config == site / "seka_lightning/shipped/configs/build/smollm2-135m.yaml"
    assert data == site / "seka_lightning/shipped/data/synthetic_qa.jsonl"
    assert data.read_bytes() == (REPO / "data/synthetic_qa.jsonl").read_bytes()
    assert sorted(p.relative_to(work / "copy").as_posix() for p in (work / "copy").rglob("*") if p.is_file()) == SHIPPED
