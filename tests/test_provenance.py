"""Provenance of a run: the git state of the sources, also for a copy that is not a git checkout."""

from __future__ import annotations

import subprocess

from seka_lightning.provenance import SOURCE_COMMIT_ENV, git_state


def test_git_state_of_this_checkout_is_its_head():
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
        "reason": "not a git checkout; the commit is $SEKA_SOURCE_COMMIT, set by whoever copied the sources",
    }
