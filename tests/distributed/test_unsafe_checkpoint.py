"""A crafted checkpoint in checkpoint.dir is refused on resume, never run.

Resume is automatic: `cnnflow train` loads the newest `step-*` entry by itself. Each
payload below would create a marker file if unpickled; the run must fail with one line
naming the file, and the marker must not exist.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from tests.cli import cnnflow
from tests.distributed.harness import write_params

pytestmark = [pytest.mark.distributed]


class _Payload:
    """Unpickling this creates `marker` (os.system, as a real exploit would run)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write(kind: str, ckpt, marker) -> object:
    """The crafted entry of `kind`; returns the file the error must name."""
    ckpt.mkdir(parents=True)
    if kind == "file":
        path = ckpt / "step-99999999.pt"
        torch.save({"model": _Payload(marker)}, path)
        return path
    directory = ckpt / "step-99999999"
    directory.mkdir()
    if kind == "meta":
        torch.save({"state": _Payload(marker)}, directory / "meta.pt")
        return directory / "meta.pt"
    torch.save({"state": {"step": 1}}, directory / "meta.pt")  # plain, as rank 0 writes it
    with open(directory / ".metadata", "wb") as f:  # DCP's own pickle, crafted
        pickle.dump(_Payload(marker), f)
    return directory / ".metadata"


@pytest.mark.parametrize("kind", ["file", "meta", "dcp_metadata"])
def test_crafted_checkpoint_is_refused_and_never_runs(digits_shards, tmp_path, kind):
    marker = tmp_path / "PWNED"
    crafted = _write(kind, tmp_path / "ckpt", marker)
    params = write_params(tmp_path / "p.yaml", digits_shards, tmp_path,
                          ["train.max_steps=2", "model.width=8"])
    proc = cnnflow("train", "--params", str(params), cwd=tmp_path)
    assert not marker.exists(), "the checkpoint's code ran"
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("cnnflow: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{crafted}: refused: not a plain-tensor checkpoint" in errors[0], errors[0]
    assert not (tmp_path / "out" / "model.pt").exists()  # refused, not skipped
