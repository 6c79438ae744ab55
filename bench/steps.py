"""Each pipeline step's cold start beside the bare import time of the libraries it needs.

    python bench/steps.py [--rounds 2]

Every step of `cnnflow pipeline run` is a fresh process (a kfp.local task here, a pod on
a cluster). Its first own line, `step NAME: started, cold start S s, loaded LIBS`, gives
the seconds from the process's start to the step's work: the interpreter, kfp's
executor, cnnflow's imports, the libraries loaded so far and the MLflow parent-run lookup
(its sqlite store opened; the first step also creates the store's schema). The
baseline, measured in the same run, is
`python -c "import LIB, ..."` for the libraries that step needs (NEEDS below: kfp's
executor, mlflow with its SQL store for the local sqlite store, numpy), best of 3.
Ratio = cold start / baseline; target <= 1.3 for every step. A step that loaded a
library outside its NEEDS is flagged: it imports what it does not use.

The pipeline runs on the embedded digits with 1 epoch and 1 training process in a
temporary workspace; threads are pinned to 1 per process.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, table

STEPS = ("prepare", "shard", "train", "evaluate", "finish")
# What each step needs before its first line: kfp's executor runs the component; mlflow
# and its SQL store (the sqlite tracking store of a local run) find the pipeline's parent
# run; numpy for the steps whose stage uses it. torch (evaluate) loads later, while the
# step works, and train's launcher modules load when it renders the job.
_BASE = ("kfp.dsl.executor_main", "mlflow", "mlflow.store.tracking.sqlalchemy_store")
NEEDS = {"prepare": (*_BASE, "numpy"), "shard": (*_BASE, "numpy"), "train": _BASE,
         "evaluate": (*_BASE, "numpy"), "finish": _BASE}
TARGET = 1.3
LINE = re.compile(r"step (\w+): started, cold start ([\d.]+) s, loaded ([\w,]*)")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "CNNFLOW_PARENT_RUN_ID", "KFP_RUN_ID")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def import_time(libs: tuple[str, ...], tries: int = 3) -> float:
    """Best wall seconds of a fresh `python -c "import libs"` (interpreter start included,
    as it is in a step's cold start)."""
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {', '.join(libs)}"], check=True,
                       env=_env())
        best = min(best, time.perf_counter() - start)
    return best


def pipeline_cold_starts(ws: Path) -> dict[str, tuple[float, set[str]]]:
    """{step: (cold start s, libraries loaded by then)} from one `cnnflow pipeline run`."""
    cmd = [str(Path(sys.executable).with_name("cnnflow")), "pipeline", "run",
           "--set", "train.epochs=1", "--set", "launch.nproc_per_node=1",
           "--set", "tracking.experiment=bench-steps"]
    done = subprocess.run(cmd, cwd=ws, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit("cnnflow pipeline run failed")
    (log,) = sorted((ws / "outputs" / "kfp").glob("kfp-local-*.log"),
                    key=lambda p: p.stat().st_mtime)[-1:]
    found = {m[1]: (float(m[2]), set(filter(None, m[3].split(","))))
             for m in LINE.finditer(log.read_text())}
    missing = set(STEPS) - set(found)
    if missing:
        raise SystemExit(f"no cold-start line for {sorted(missing)} in {log}")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1, help="pipeline runs; best per step")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cnnflow-bench-steps-") as tmp:
        ws = Path(tmp)
        shutil.copytree(REPO / "data" / "raw" / "digits", ws / "data" / "raw" / "digits")
        shutil.copy(REPO / "params.yaml", ws / "params.yaml")
        cold: dict[str, tuple[float, set[str]]] = {}
        for _ in range(args.rounds):
            for step, (seconds, loaded) in pipeline_cold_starts(ws).items():
                if step not in cold or seconds < cold[step][0]:
                    cold[step] = (seconds, loaded)
    baselines = {libs: import_time(libs) for libs in set(NEEDS.values())}
    rows, worst = [], 0.0
    for step in STEPS:
        seconds, loaded = cold[step]
        base = baselines[NEEDS[step]]
        extra = sorted(loaded - {lib.split(".")[0] for lib in NEEDS[step]})
        ratio = seconds / base
        worst = max(worst, ratio)
        needs = " ".join(sorted({lib.split(".")[0] for lib in NEEDS[step]}))
        rows.append([step, seconds, needs, base, f"{ratio:.2f}", ",".join(extra) or "-"])
    table(["step", "cold start s", "needs", "import s", "ratio", "loaded beyond needs"],
          rows)
    verdict = "met" if worst <= TARGET else "ABOVE"
    print(f"ratio cold start / bare imports, worst step: {worst:.2f} "
          f"(target <= {TARGET}: {verdict})")


if __name__ == "__main__":
    main()
