"""A brand-new sqlite tracking store used by several processes at once: each process opens
it under `<db>.lock`, so MLflow's create-and-migrate runs once and every run lands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

# Every child imports what it needs, says "ready" and waits for one line on stdin: the
# test releases all of them together once all are ready, so their first use of the store
# coincides (no sleep orders anything).
CHILD = """
import sys
import cnnflow.cli, cnnflow.stages, cnnflow.data.prepare, mlflow
import mlflow.store.tracking.sqlalchemy_store
print("ready", flush=True)
sys.stdin.readline()
sys.argv = ["cnnflow", *sys.argv[1:]]
cnnflow.cli.main()
"""


def test_three_first_runs_on_an_empty_store_all_succeed(tmp_path: Path):
    db = tmp_path / "store" / "mlflow.db"
    uri = f"sqlite:///{db}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CNNFLOW_", "KFP_", "DVC_"))}
    env["MLFLOW_TRACKING_URI"] = uri
    procs = []
    for i in range(3):
        args = ["prepare", "--set", "prepare.source=synthetic", "--set",
                "prepare.num_images=200", "--set", "prepare.workers=1", "--set",
                f"prepare.out_dir=p{i}", "--set", "tracking.experiment=first-use"]
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=tmp_path,
                                      env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    assert not db.exists()  # nobody has touched the store yet
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        assert "prepared synthetic -> p" in out
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("first-use")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["prepare"] * 3
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.params["prepare.out_dir"] for r in runs} == {"p0", "p1", "p2"}
