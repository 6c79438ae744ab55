"""A full disk under a checkpoint or the tracking store, as a user meets it: `cnnflow`
exits non-zero with one line naming the operation and the path, leaves no temporary
behind, and what earlier runs wrote is intact.

The full disk is a small tmpfs the test mounts (and unmounts) itself. Where mounting is
not allowed (not root), the command runs under RLIMIT_FSIZE instead, at the size the
files have now: every write that would grow a file fails with EFBIG, as on a full disk.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

CLEAN_ENV = ("CNNFLOW_", "KFP_", "DVC_")
TINY_TRAIN = ("--set", "tracking.enabled=false", "--set", "train.epochs=1", "--set",
              "train.batch_size=32", "--set", "model.width=8", "--set",
              "checkpoint.every_steps=1", "--set", "train.log_every=1")
TINY_PREPARE = ("--set", "prepare.source=synthetic", "--set", "prepare.num_images=200",
                "--set", "prepare.workers=1")
FULL = r"(no space left on device|file too large for the file system or its limit)"


@contextlib.contextmanager
def small_fs(where: Path, size: str = "4m") -> Iterator[bool]:
    """A small tmpfs at `where`: True; or, where mounting fails, a plain directory: False
    (then the test limits the command's file sizes instead)."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(where)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], check=True)


def fill(where: Path) -> None:
    """Write a filler file in `where` until the file system refuses another byte."""
    with open(where / "filler", "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)


def cnnflow(*args: str, cwd: Path, limit: int | None = None, env: dict | None = None):
    """The `cnnflow` console script; with `limit`, under RLIMIT_FSIZE = `limit` bytes."""
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full_env = {k: v for k, v in os.environ.items() if not k.startswith(CLEAN_ENV)}
    full_env.update(env or {})
    return subprocess.run([str(Path(sys.executable).with_name("cnnflow")), *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec if limit is not None else None)


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "filler"}


def error_line(done) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("cnnflow: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_last_one(digits_shards,
                                                                         tmp_path):
    with small_fs(tmp_path / "fs") as mounted:
        ckpt = tmp_path / "fs" / "ckpt"
        common = (*TINY_TRAIN, "--set", f"train.shards={digits_shards}", "--set",
                  f"checkpoint.dir={ckpt}")
        first = cnnflow("train", *common, "--set", "train.max_steps=1", cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        assert (ckpt / "step-00000001.pt").is_file()
        before = digests(ckpt)
        del before["progress"]  # the last step finished: rewritten in place, on purpose
        limit = None
        if mounted:
            fill(tmp_path / "fs")
        else:
            limit = max(p.stat().st_size for p in ckpt.iterdir()) - 1
        done = cnnflow("train", *common, "--set", "train.max_steps=2", cwd=tmp_path,
                       limit=limit)
        assert done.returncode == 1, done.stderr
        assert re.fullmatch(rf"cnnflow: error: {FULL} while writing checkpoint "
                            rf"{re.escape(str(ckpt / 'step-00000002.pt'))}",
                            error_line(done))
        assert {k: v for k, v in digests(ckpt).items() if k != "progress"} == before
        assert not [p for p in ckpt.rglob("*") if p.name.endswith(".tmp")]


def test_a_full_tracking_store_is_one_line_and_keeps_its_runs(tmp_path):
    with small_fs(tmp_path / "fs") as mounted:
        db = tmp_path / "fs" / "mlflow.db"
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
        first = cnnflow("prepare", *TINY_PREPARE, "--set", "prepare.out_dir=p1",
                        cwd=tmp_path, env=env)
        assert first.returncode == 0, first.stderr
        before = digests(tmp_path / "p1")
        limit = None
        if mounted:
            fill(tmp_path / "fs")
            with pytest.raises(OSError) as full:
                (tmp_path / "fs" / "probe").write_bytes(b"x" * 4096)
            assert full.value.errno == errno.ENOSPC
        else:  # the store's next write (its rollback journal) cannot grow
            limit = 1
        done = cnnflow("prepare", *TINY_PREPARE, "--set", "prepare.out_dir=p2",
                       cwd=tmp_path, env=env, limit=limit)
        assert done.returncode == 1, done.stderr
        assert re.fullmatch(rf"cnnflow: error: ({FULL}|I/O error) while writing the "
                            rf"tracking store {re.escape(str(db))}", error_line(done))
        assert not (tmp_path / "p2").exists()
        assert digests(tmp_path / "p1") == before
        assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
        (tmp_path / "fs" / "filler").unlink(missing_ok=True)
        runs = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_runs(
            [MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
             .get_experiment_by_name("cnnflow").experiment_id])
        assert [(r.info.run_name, r.info.status) for r in runs] == [("prepare", "FINISHED")]


def test_shards_on_a_full_disk_are_one_line_and_the_old_ones_stay(digits_shards, tmp_path):
    prepared = digits_shards.parent / "prepared"
    with small_fs(tmp_path / "fs", size="16m") as mounted:
        out = tmp_path / "fs" / "shards"
        sets = ("--set", "tracking.enabled=false", "--set", f"prepare.out_dir={prepared}",
                "--set", f"shard.out_dir={out}", "--set", "shard.workers=1")
        first = cnnflow("shard", *sets, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        before = digests(out)
        if mounted:
            fill(tmp_path / "fs")
        done = cnnflow("shard", *sets, "--set", "shard.samples_per_shard=100", cwd=tmp_path,
                       limit=None if mounted else 1)
        assert done.returncode == 1, done.stderr
        assert re.fullmatch(rf"cnnflow: error: {FULL} while writing "
                            rf"{re.escape(str(out))} \(left as it was\)", error_line(done))
        assert digests(out) == before
        assert sorted(p.name for p in (tmp_path / "fs").iterdir()) == (
            ["filler", "shards"] if mounted else ["shards"])
