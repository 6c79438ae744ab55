"""fileio: atomic file writes and the directory swap keep the old copy on failure."""

from __future__ import annotations

import json

import pytest

from cnnflow.fileio import atomic_dir, atomic_write, atomic_write_bytes, swap_in_dir, write_json


def test_atomic_write_bytes_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["b.bin"]


def test_a_writer_that_raises_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "x.pt"
    atomic_write_bytes(path, b"old")

    def half(f):
        f.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_write_json_is_sorted_indented_with_a_final_newline(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"b": 1, "a": [1, 2]})
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps({"a": [1, 2], "b": 1}, indent=2, sort_keys=True) + "\n"


def test_swap_in_dir_replaces_a_directory_and_removes_the_old_copy(tmp_path):
    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "stale").write_text("old")
    new.mkdir()
    (new / "fresh").write_text("new")
    swap_in_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["fresh"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_keeps_the_old_directory_when_the_block_raises(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "first").write_text("1")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out) as tmp:
        (tmp / "second").write_text("2")
        raise RuntimeError("boom")
    assert [p.name for p in out.iterdir()] == ["first"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old copies left


def test_atomic_dir_carries_a_spool_written_meanwhile_into_the_new_copy(tmp_path):
    out = tmp_path / "out"
    (out / "mlflow-spool").mkdir(parents=True)
    (out / "mlflow-spool" / "events.jsonl").write_text("{}\n")
    (out / "old.npy").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out, keep=("mlflow-spool",)) as tmp:
        (tmp / "new.npy").write_text("new")
        raise RuntimeError("the stage failed")
    assert sorted(p.name for p in out.iterdir()) == ["mlflow-spool", "old.npy"]
    with atomic_dir(out, keep=("mlflow-spool",)) as tmp:
        (tmp / "new.npy").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["mlflow-spool", "new.npy"]
    assert (out / "mlflow-spool" / "events.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
