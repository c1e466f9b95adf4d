"""Atomic writes: complete files only, the old file kept when writing fails, no temp files left behind."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest

from seka_lightning.files import (
    PASTA_HEADS,
    SEARCH_RESULTS,
    atomic_path,
    check_output,
    file_kind,
    write_json,
    write_jsonl,
    write_text,
)


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


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    """Run under a given umask, restoring the old one afterwards."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_files_get_the_permissions_of_the_umask(tmp_path, umask):
    import torch

    from seka_lightning import ProjectionBank
    from seka_lightning.stats import KeySums

    written = [
        write_text(tmp_path / "t.md", "x"),
        write_json(tmp_path / "r.json", {}),
        ProjectionBank(layers=[0], pos=torch.zeros(1, 1, 2, 2)).save(tmp_path / "b.safetensors"),
    ]
    KeySums.zeros(1, 1, 2).save(tmp_path / "s.stats.safetensors")
    written.append(tmp_path / "s.stats.safetensors")
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_check_output_kinds_and_directories(tmp_path):
    (tmp_path / "d.json").mkdir()
    with pytest.raises(
        FileExistsError,
        match=re.escape(f"the output {tmp_path / 'd.json'} is a directory; give a file path for the search result"),
    ):
        check_output(tmp_path / "d.json", kind=SEARCH_RESULTS)
    search = write_json(tmp_path / "s.json", {"grid": [], "best": {}})
    heads = write_json(tmp_path / "h.json", {"layers": {}, "scores": {}, "settings": {}})
    assert (file_kind(search), file_kind(heads)) == (SEARCH_RESULTS, PASTA_HEADS)
    assert check_output(search, kind=SEARCH_RESULTS, overwrite=True) == search
    with pytest.raises(
        FileExistsError, match=re.escape(f"{heads} already holds a PASTA head set, not a search result")
    ):
        check_output(heads, kind=SEARCH_RESULTS, overwrite=True)
    link = tmp_path / "link.json"
    link.symlink_to(search)
    with pytest.raises(
        ValueError, match=re.escape(f"the output {link} is also this command's input --stats ({search})")
    ):
        check_output(link, kind=SEARCH_RESULTS, inputs={"--stats": search}, overwrite=True)
    assert (
        check_output(tmp_path / "new.json", kind=SEARCH_RESULTS, inputs={"--data": [search, None]})
        == tmp_path / "new.json"
    )
