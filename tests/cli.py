"""Run the `cnnflow` console script as a user does, in a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cnnflow(*args: str, cwd: Path, uri: str | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess:
    """`cnnflow ARGS` in `cwd`, with no run identity inherited from the test process
    (CNNFLOW_*, KFP_*, DVC_*) and, given `uri`, MLFLOW_TRACKING_URI set to it."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CNNFLOW_", "KFP_", "DVC_"))}
    if uri is not None:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run([str(Path(sys.executable).with_name("cnnflow")), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)
