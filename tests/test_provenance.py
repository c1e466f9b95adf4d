"""Provenance of a run: the git state of the sources, also for a copy that is not a git checkout."""

from __future__ import annotations

import subprocess

from seka_lightning.provenance import SOURCE_COMMIT_ENV, git_state


def test_git_state_of_this_checkout_is_its_head(monkeypatch):
    monkeypatch.delenv(SOURCE_COMMIT_ENV, raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    state = git_state()
    assert state["commit"] == head
    assert isinstance(state["dirty"], bool)


def test_a_copy_outside_git_records_the_copiers_commit_or_why_there_is_none(tmp_path, monkeypatch):
    monkeypatch.delenv(SOURCE_COMMIT_ENV, raising=False)
    missing = git_state(tmp_path)
    assert missing["commit"] is None and missing["dirty"] is None
    assert missing["reason"].startswith("not a git checkout or git unavailable")
    monkeypatch.setenv(SOURCE_COMMIT_ENV, "0123abcd")
    assert git_state(tmp_path) == {
        "commit": "0123abcd",
        "dirty": None,
        "reason": "the commit is $SEKA_SOURCE_COMMIT, set by whoever copied the sources",
        "git_head": None,
    }


def test_the_copiers_commit_wins_over_a_stale_checkout(monkeypatch):
    """A copy laid over an older checkout (its HEAD is not the copied code) records the copier's commit."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setenv(SOURCE_COMMIT_ENV, "0123abcd")
    state = git_state()
    assert state["commit"] == "0123abcd" and state["dirty"] is None and state["git_head"] == head


def test_the_command_names_the_entry_point_not_its_location():
    from seka_lightning.provenance import run_provenance

    record = run_provenance(
        pretrained="embedded:smollm2-135m",
        method={"method": "none"},
        config={},
        data={},
        seeds={},
        argv=["/some/machine/src/seka_lightning/cli.py", "predict", "-c", "configs/eval/counterfact.yaml"],
    )
    assert record["command"] == ["seka", "predict", "-c", "configs/eval/counterfact.yaml"]
