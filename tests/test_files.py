"""Atomic writes: complete files only, the old file kept when writing fails, no temp files left behind."""

from __future__ import annotations

import json

import pytest

from seka_lightning.files import atomic_path, write_json, write_jsonl, write_text


def test_round_trip_and_no_leftovers(tmp_path):
    write_json(tmp_path / "a" / "r.json", {"x": "é", "path": tmp_path})
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"x": "é", "path": str(tmp_path)}
    write_jsonl(tmp_path / "r.jsonl", [{"g": "one\u2028two"}, {"g": "b"}])
    lines = (tmp_path / "r.jsonl").read_text().split("\n")
    assert [json.loads(line) for line in lines if line] == [{"g": "one\u2028two"}, {"g": "b"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "r.jsonl"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = write_text(tmp_path / "t.txt", "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("seka_lightning.files.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_a_writer_that_fails_inside_atomic_path_leaves_the_old_file(tmp_path):
    target = write_text(tmp_path / "bank.safetensors", "old")
    with pytest.raises(RuntimeError, match="serialiser failed"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("serialiser failed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]
