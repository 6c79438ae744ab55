"""Faults: a server unreachable at start, a server that dies mid-run, and the sync."""

from __future__ import annotations

import logging
import shutil
import urllib.error
import urllib.request

import pytest
from mlflow import MlflowClient

from cnnflow.errors import CnnflowError
from cnnflow.tracking.mlflow_tracker import check_reachable, stage_run
from cnnflow.tracking.server import free_port, start_server
from cnnflow.tracking.sync import sync


def _status(url: str, host: str) -> int:
    """The HTTP status of an API call (not /health: that answers any Host) sent with the
    Host header `host`."""
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default",
        headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_unreachable_server_fails_before_anything_starts(monkeypatch, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    with pytest.raises(CnnflowError) as err:
        stage_run("train", params={"train.lr": 0.1})
    message = str(err.value)
    assert "\n" not in message and dead in message and "unreachable" in message
    with pytest.raises(CnnflowError):
        check_reachable(dead, timeout_s=1)
    assert not (tmp_path / "mlflow").exists()  # nothing was logged anywhere


def test_offline_logs_to_the_local_sqlite_store(monkeypatch, tmp_path, caplog,
                                               sqlite_template):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    (tmp_path / "mlflow").mkdir()
    shutil.copyfile(sqlite_template, tmp_path / "mlflow" / "mlflow.db")  # skip migrations
    with caplog.at_level(logging.WARNING, logger="cnnflow"):
        tracker = stage_run("train", params={"train.lr": 0.1}, offline=True)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.close()
    assert tracker.tracking_uri == "sqlite:///mlflow/mlflow.db"
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()
    assert any("offline" in r.getMessage() for r in caplog.records)
    run = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id)
    assert run.data.params == {"train.lr": "0.1"}


def test_server_killed_mid_run_loses_nothing_and_syncs(tmp_path, monkeypatch, model_dir,
                                                      mlflow_server, caplog):
    root = tmp_path / "srv"
    port = free_port()
    # started as in a cluster: the Service name must be allowed, or MLflow answers 403
    live = start_server(root / "mlflow.db", root / "artifacts", port=port,
                        allowed_hosts=f"mlflow.cnnflow.svc:5000,127.0.0.1:{port}",
                        log_path=root / "server.log")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", live.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # notice the crash at once
    spool = tmp_path / "out" / "mlflow-spool"
    try:
        assert _status(live.url, "mlflow.cnnflow.svc:5000") == 200
        assert _status(live.url, "elsewhere.example:5000") == 403
        tracker = stage_run("train", params={"train.lr": 0.1}, spool_dir=spool)
        for step in range(5):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
    finally:
        live.kill()  # SIGKILL the whole server mid-run: no goodbye
    with caplog.at_level(logging.WARNING, logger="cnnflow"):
        for step in range(5, 10):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
        tracker.set_tags({"late": "yes"})
        (tmp_path / "notes.txt").write_text("kept\n")
        tracker.log_artifact(tmp_path / "notes.txt", "extra")
        assert tracker.log_model(model_dir) is None  # spooled, not lost
        tracker.close()
    assert tracker.buffering
    spooled = [r.getMessage() for r in caplog.records if "spooled to" in r.getMessage()]
    assert len([m for m in spooled if "failed" in m]) == 1  # warned once
    assert "cnnflow tracking sync" in spooled[0]

    # before the crash: in the dead server's store; after it: in the spool
    dead = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    before = {m.step for m in dead.get_metric_history(tracker.run_id, "loss")}
    assert before == set(range(5))

    # the server does not come back: sync into another one (a new run, tagged)
    run_id = sync(spool, mlflow_server)
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.data.tags["cnnflow.synced_from_run_id"] == tracker.run_id
    assert run.data.tags["cnnflow.stage"] == "train" and run.data.tags["late"] == "yes"
    after = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert before | after == set(range(10))
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id, "extra")] == ["extra/notes.txt"]
    assert "model.json" in {a.path for a in client.list_artifacts(run_id)}
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    assert len(models) == 1
    with pytest.raises(CnnflowError, match="already synced"):
        sync(spool, mlflow_server)


def test_sync_replays_into_the_original_run_when_it_exists(tracking_uri, monkeypatch):
    tracker = stage_run("train", params={"train.lr": 0.1})
    tracker.log_metrics({"loss": 1.0}, 0)

    def refuse(*args, **kwargs):
        raise ConnectionError("server went away")

    with monkeypatch.context() as patch:
        patch.setattr(tracker.client, "log_batch", refuse)
        tracker.log_metrics({"loss": 0.5}, 1)
        tracker.log_params({"late.param": 3})
    tracker.close()  # the server is back, but a spooling tracker stays spooling
    assert tracker.buffering
    assert sync(tracker.spool_dir) == tracker.run_id
    client = MlflowClient(tracking_uri)
    steps = [m.step for m in client.get_metric_history(tracker.run_id, "loss")]
    assert sorted(steps) == [0, 1]
    assert client.get_run(tracker.run_id).data.params["late.param"] == "3"
