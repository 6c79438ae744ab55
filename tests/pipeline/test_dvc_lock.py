"""The committed dvc.lock matches the code and params.yaml it sits beside.

A stale lock makes the first `dvc repro` of a fresh clone rerun stages nobody changed,
and its runs carry deps nobody committed. The repository's tracked files (what a clone
has) are copied into a temporary git repository, where the real `dvc status` may report
only outputs that a clone does not have yet: never a changed dependency or parameter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _tracked_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def test_committed_lock_matches_code_and_params(tmp_path):
    _tracked_copy(tmp_path)
    env = {**os.environ, "GIT_AUTHOR_NAME": "cnnflow-test", "GIT_COMMITTER_NAME": "cnnflow-test",
           "GIT_AUTHOR_EMAIL": "test@cnnflow.invalid",
           "GIT_COMMITTER_EMAIL": "test@cnnflow.invalid"}
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=tmp_path, env=env, check=True)
    done = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout or "{}")
    assert set(status) <= {"prepare", "shard", "train", "evaluate"}
    # an upstream stage's outs are not in a clone: as deps of the next stage they are
    # "deleted"; a code or data dep that git holds can only be "modified" or match
    pipeline = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    produced = {next(iter(o)) if isinstance(o, dict) else o
                for stage in pipeline.values() for o in stage.get("outs", [])}
    changed = {}
    for stage, entries in status.items():
        for entry in entries:
            if not isinstance(entry, dict):
                changed[stage] = entry  # e.g. "changed command"
                continue
            for kind, items in entry.items():
                missing = {path for path, state in items.items()
                           if state in ("deleted", "not in cache")}
                if kind == "changed deps":
                    missing &= produced
                if set(items) - missing or kind not in ("changed outs", "changed deps"):
                    changed[f"{stage}: {kind}"] = items
    assert changed == {}, ("dvc.lock is stale: run `dvc repro` (or `dvc commit`) and commit "
                           f"dvc.lock; {changed}")
