"""A stage writes only into a directory it owns (cnnflow.outputs), run as a user runs the
`cnnflow` command: every refusal is one line naming the path, exit 2, and every file in
the workspace is byte-identical afterwards."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from cnnflow.outputs import MARKER
from tests.cli import cnnflow

ROOT = Path(__file__).resolve().parents[2]
FAST = ("--set", "tracking.enabled=false", "--set", "prepare.workers=1",
        "--set", "shard.workers=1", "--set", "prepare.source=idx",
        "--set", "prepare.path=data/raw/digits", "--set", "shard.samples_per_shard=512")


def run(ws: Path, command: str, *sets: str):
    args = [a for s in sets for a in ("--set", s)]
    return cnnflow(command, *FAST, *args, cwd=ws)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A workspace after `cnnflow prepare` and `cnnflow shard`: data/raw/digits (the
    input), data/prepared, data/shards."""
    ws = tmp_path_factory.mktemp("ws")
    shutil.copytree(ROOT / "data" / "raw" / "digits", ws / "data" / "raw" / "digits")
    for command in ("prepare", "shard"):
        done = run(ws, command)
        assert done.returncode == 0, done.stderr
    return ws


@pytest.fixture
def ws(template, tmp_path) -> Path:
    dest = tmp_path / "ws"
    shutil.copytree(template, dest, symlinks=True)
    return dest


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (hidden ones too), "dir" for directories."""
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir()
            else hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


def refused(ws: Path, command: str, *sets: str) -> str:
    """Run `command`, assert it fails with one line and changes nothing; that line."""
    before = tree(ws)
    done = run(ws, command, *sets)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("cnnflow: error: "), \
        done.stderr
    assert tree(ws) == before
    return done.stderr.removeprefix("cnnflow: error: ").rstrip("\n")


def test_stages_mark_what_they_write_and_rerun_into_it(ws):
    assert '"stage": "prepare"' in (ws / "data" / "prepared" / MARKER).read_text()
    assert '"stage": "shard"' in (ws / "data" / "shards" / MARKER).read_text()
    for command in ("prepare", "shard"):
        done = run(ws, command)
        assert done.returncode == 0, done.stderr


def test_prepare_into_the_directory_holding_its_input_is_refused(ws):
    line = refused(ws, "prepare", "prepare.out_dir=data")
    assert line == ("prepare.out_dir data holds prepare.path data/raw/digits, which the "
                    "stage reads; choose a directory apart from it")


def test_shard_into_its_input_is_refused(ws):
    line = refused(ws, "shard", "shard.out_dir=data/prepared")
    assert line == ("shard.out_dir data/prepared is prepare.out_dir data/prepared, which "
                    "the stage reads; choose a directory apart from it")
    line = refused(ws, "shard", "shard.out_dir=data/prepared/shards")
    assert line.startswith("shard.out_dir data/prepared/shards lies inside prepare.out_dir "
                           "data/prepared")


def test_a_directory_with_other_files_is_refused(ws):
    (ws / "mine" / "notes").mkdir(parents=True)
    (ws / "mine" / "notes" / "README").write_text("keep me\n")
    for name in ("a.txt", "b.txt", "c.txt"):
        (ws / "mine" / name).write_text(name)
    line = refused(ws, "shard", "shard.out_dir=mine")
    assert line == ("shard.out_dir mine holds files cnnflow did not write (a.txt, 3 more); "
                    "choose an empty directory")


def test_a_user_file_in_a_marked_shard_directory_is_not_swapped_away(ws):
    (ws / "data" / "shards" / "NOTES.md").write_text("mine\n")
    line = refused(ws, "shard")
    assert line == ("shard.out_dir data/shards holds files cnnflow did not write "
                    "(NOTES.md); choose an empty directory")


def test_a_directory_another_stage_made_is_refused(ws):
    line = refused(ws, "prepare", "prepare.out_dir=data/shards")
    assert line == ("prepare.out_dir data/shards holds the shard output of cnnflow 0.1.0; "
                    "choose another directory")
    (ws / "data" / "shards" / MARKER).unlink()  # as an older cnnflow left it
    line = refused(ws, "prepare", "prepare.out_dir=data/shards")
    assert line == ("prepare.out_dir data/shards holds the shard output of cnnflow; "
                    "choose an empty directory")


def test_an_unmarked_directory_of_the_stages_own_files_is_accepted(ws):
    """Shards written before the marker existed: manifest.json and <split>-NNNNNN.tar."""
    shards = ws / "data" / "shards"
    (shards / MARKER).unlink()
    done = run(ws, "shard")
    assert done.returncode == 0, done.stderr
    assert '"stage": "shard"' in (shards / MARKER).read_text()


@pytest.mark.parametrize(("value", "line"), [
    ("", "shard.out_dir is empty; expected a directory for the shard output"),
    (".", "shard.out_dir . is the working directory; choose a directory of its own"),
    ("/", "shard.out_dir / is the file system root; choose a directory of its own"),
])
def test_empty_cwd_and_root_are_refused(ws, value, line):
    assert refused(ws, "shard", f"shard.out_dir={value}") == line


def test_the_repository_root_is_refused(ws):
    (ws / ".git").mkdir()
    sub = ws / "work"
    sub.mkdir()
    before = tree(ws)
    done = cnnflow("shard", *FAST, "--set", "shard.out_dir=..", cwd=sub)
    assert done.returncode == 2
    assert done.stderr == ("cnnflow: error: shard.out_dir .. is the repository root; "
                           "choose a directory of its own\n")
    assert tree(ws) == before


def test_train_refuses_an_empty_out_dir_and_checkpoints_inside_its_shards(ws):
    line = refused(ws, "train", "train.out_dir=")
    assert line == "train.out_dir is empty; expected a directory for the train output"
    line = refused(ws, "train", "checkpoint.dir=data/shards/ckpt")
    assert line == ("checkpoint.dir data/shards/ckpt lies inside shard.out_dir data/shards, "
                    "which the stage reads; choose a directory apart from it")
    line = refused(ws, "train", "checkpoint.dir=outputs/train")
    assert line == ("train.out_dir outputs/train is checkpoint.dir outputs/train, another "
                    "output of the stage; choose a directory apart from it")


def test_evaluate_refuses_to_write_reports_into_its_inputs(ws):
    line = refused(ws, "evaluate", "evaluate.out_dir=data/shards")
    assert line == ("evaluate.out_dir data/shards is shard.out_dir data/shards, which the "
                    "stage reads; choose a directory apart from it")
    line = refused(ws, "evaluate", "evaluate.out_dir=outputs/train/reports")
    assert line.startswith("evaluate.out_dir outputs/train/reports lies inside the model "
                           "outputs/train")


def test_checkpoints_nested_in_the_train_dir_belong_to_it(tmp_path, monkeypatch):
    """checkpoint.dir=<train.out_dir>/ckpt (the benchmarks' layout) from an older run."""
    from cnnflow.outputs import OutputError, claim_output, nested_name

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "ckpt").mkdir(parents=True)
    (tmp_path / "run" / "model.pt").write_bytes(b"m")
    (tmp_path / "run" / "ckpt" / "step-00000001.pt").write_bytes(b"c")
    assert nested_name("run/ckpt", "run") == "ckpt" and nested_name("run", "run") is None
    assert claim_output("train", "train.out_dir", "run", holds=("ckpt",)) == tmp_path / "run"
    assert claim_output("checkpoint", "checkpoint.dir", "run/ckpt") == tmp_path / "run/ckpt"
    with pytest.raises(OutputError, match=r"holds files cnnflow did not write \(ckpt/\)"):
        claim_output("train", "train.out_dir", "run")


def test_an_object_storage_prefix_gets_no_local_marker(tmp_path, monkeypatch):
    """s3:// outputs are checked and marked in the bucket's own way: nothing appears in
    the working directory (a path of "s3:/bucket/..." would)."""
    from cnnflow.outputs import claim_output, mark_output

    monkeypatch.chdir(tmp_path)
    assert claim_output("train", "train.out_dir", "s3://bucket/model") is None
    mark_output("train", "s3://bucket/model")
    mark_output("checkpoint", "s3://bucket/ckpt")
    assert list(tmp_path.iterdir()) == []
