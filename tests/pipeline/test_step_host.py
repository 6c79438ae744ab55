"""The warm step host of `cnnflow pipeline run` (cnnflow.kfp.host), with real processes.

Each test starts a real host (`start_host`, the module run with this interpreter) and calls
the real component functions, as kfp.local's task processes do; the end-to-end kfp.local
run in test_kfp.py goes through the host too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnnflow.config import load_params
from cnnflow.errors import CnnflowError
from cnnflow.kfp import components as comps
from cnnflow.kfp.host import HOST_ENV, start_host
from cnnflow.kfp.params import encode, to_arguments


@pytest.fixture
def host(tmp_path, monkeypatch):
    monkeypatch.delenv(HOST_ENV, raising=False)
    for name in ("KFP_RUN_ID", "CNNFLOW_RUNNER", "CNNFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    h = start_host(tmp_path)
    yield h
    h.stop()
    assert HOST_ENV not in os.environ
    assert not h.path.exists()


def _prepare_params(*overrides: str) -> str:
    params = load_params(None, ["prepare.workers=1", *overrides])
    return encode(to_arguments(params), ["prepare", "tracking"])


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_step_runs_in_a_child_with_the_callers_streams_cwd_and_environment(
        host, tmp_path, monkeypatch, capfd):
    from kfp import dsl

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CNNFLOW_RUNNER", "kfp-local")
    monkeypatch.setenv("KFP_RUN_ID", "host-test-1")
    dataset = dsl.Dataset(uri=str(tmp_path / "artifact"))
    meta = comps.prepare.python_func(
        params=_prepare_params("prepare.source=synthetic", "prepare.num_images=120",
                               "tracking.experiment=host"),
        workspace="ws", dataset=dataset)  # relative: to the caller's working directory

    out = capfd.readouterr().out
    prepared = tmp_path / "ws" / "data" / "prepared"
    assert f"prepared synthetic -> {prepared}" in out  # the child printed on our stdout
    assert dataset.metadata["path"] == str(prepared)  # metadata came back
    assert dataset.metadata["train_count"] + dataset.metadata["val_count"] + \
        dataset.metadata["test_count"] == 120
    assert meta is None  # the component returns nothing; the step's dict stayed in the step
    written = json.loads((prepared / "dataset.json").read_text())
    assert json.loads((Path(dataset.path) / "dataset.json").read_text()) == written
    # the step ran elsewhere: `enter` changes directory and exports variables, here neither
    assert Path.cwd() == tmp_path
    assert os.environ["KFP_RUN_ID"] == "host-test-1"
    assert "CNNFLOW_PARENT_RUN_ID" not in os.environ
    # ... with our environment: it logged to our tracking URI under our run id and runner
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("host").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("cnnflow.role") == "pipeline"]
    assert parent.data.tags["cnnflow.pipeline_key"] == "host-test-1"
    assert parent.data.tags["cnnflow.runner"] == "kfp-local"
    assert {r.info.run_name for r in runs} >= {"prepare"}
    assert host.proc.poll() is None


def test_a_step_error_comes_back_as_the_same_one_line_error(host, tmp_path):
    from kfp import dsl

    missing = tmp_path / "no-such-dir"
    with pytest.raises(CnnflowError, match=str(missing)) as err:
        comps.prepare.python_func(
            params=_prepare_params("prepare.source=imagefolder", f"prepare.path={missing}",
                                   "tracking.enabled=false"),
            workspace=str(tmp_path / "ws"), dataset=dsl.Dataset(uri=str(tmp_path / "a")))
    assert "\n" not in str(err.value)
    assert host.proc.poll() is None  # the host serves the next step
    dataset = dsl.Dataset(uri=str(tmp_path / "b"))
    comps.prepare.python_func(
        params=_prepare_params("prepare.source=synthetic", "prepare.num_images=200",
                               "tracking.enabled=false"),
        workspace=str(tmp_path / "ws"), dataset=dataset)
    assert dataset.metadata["dataset_version"]


def test_a_host_that_is_gone_fails_the_step_at_once_naming_it(host, tmp_path):
    from kfp import dsl

    host.proc.terminate()
    host.proc.wait(timeout=10)
    start = time.monotonic()
    with pytest.raises(CnnflowError, match=f"step host {host.path} does not answer"):
        comps.prepare.python_func(params=_prepare_params("tracking.enabled=false"),
                                  workspace=str(tmp_path / "ws"),
                                  dataset=dsl.Dataset(uri=str(tmp_path / "a")))
    assert time.monotonic() - start < 5


def test_a_killed_caller_interrupts_its_child_and_leaves_no_half_output(host, tmp_path):
    """The caller (a task process) is SIGKILLed while its step runs in the host's child:
    the child is interrupted, and prepare's temp-then-rename leaves no output dir."""
    ws = tmp_path / "ws"
    params = _prepare_params("prepare.source=synthetic", "prepare.num_images=400000",
                             "tracking.enabled=false")
    script = (
        "from kfp import dsl\n"
        "from cnnflow.kfp import components as c\n"
        f"c.prepare.python_func(params={params!r}, workspace={str(ws)!r}, "
        f"dataset=dsl.Dataset(uri={str(tmp_path / 'a')!r}))\n")
    caller = subprocess.Popen([sys.executable, "-c", script],
                              env={**os.environ, HOST_ENV: str(host.path)})
    deadline = time.monotonic() + 60
    while not _children(host.proc.pid):
        assert caller.poll() is None, "the caller ended before the host forked its child"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (child,) = _children(host.proc.pid)
    caller.send_signal(signal.SIGKILL)
    caller.wait()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists() and \
            Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the orphaned step kept running"
        time.sleep(0.05)
    assert not (ws / "data" / "prepared").exists()
    assert host.proc.poll() is None
