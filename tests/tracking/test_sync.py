"""`cnnflow tracking sync` treats a spool as untrusted input: every file it names must lie
inside the spool, checked for all events before the first upload; and the target is the
user's (`--tracking-uri`, `$MLFLOW_TRACKING_URI`), the spool's own URI only when asked."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cnnflow import cli
from cnnflow.errors import CnnflowError
from cnnflow.tracking.sync import Spool, sync
from tests.cli import cnnflow


def _spool(directory: Path, run_id: str, experiment: str, uri: str | None) -> Spool:
    """A spool as MlflowTracker writes it: one tags event, then one good artifact (lines 1
    and 2); a test appends its crafted event as line 3."""
    spool = Spool(directory, {"run_id": run_id, "tracking_uri": uri,
                              "experiment_name": experiment, "run_name": "train"})
    spool.write("tags", tags={"late": "yes"})
    notes = directory.parent / "notes.txt"
    notes.write_text("kept\n")
    spool.write("artifact", file=spool.keep(notes), artifact_path="extra")
    return spool


def _absolute(spool: Spool, secret: Path) -> tuple[dict, str]:
    return {"file": str(secret), "artifact_path": "extra"}, f"file {str(secret)!r} is outside"


def _dotdot(spool: Spool, secret: Path) -> tuple[dict, str]:
    return ({"file": "files/../../secret.txt", "artifact_path": None},
            "file 'files/../../secret.txt' is outside")


def _symlink(spool: Spool, secret: Path) -> tuple[dict, str]:
    link = spool.dir / "files" / "000009" / "notes.txt"
    link.parent.mkdir(parents=True)
    link.symlink_to(secret)
    return {"file": "files/000009/notes.txt", "artifact_path": "extra"}, \
        "file 'files/000009/notes.txt' is outside"


def _symlink_in_dir(spool: Spool, secret: Path) -> tuple[dict, str]:
    model = spool.dir / "files" / "000009" / "model"
    (model / "weights").mkdir(parents=True)
    (model / "model.json").write_text("{}\n")
    (model / "weights" / "model.pt").symlink_to(secret)
    return {"file": "files/000009/model", "name": "model"}, \
        "file 'files/000009/model' holds 'weights/model.pt', which is outside"


def _escaping_artifact_path(spool: Spool, secret: Path) -> tuple[dict, str]:
    return ({"file": "files/000000/notes.txt", "artifact_path": "../escape"},
            "artifact_path '../escape' is not a relative path inside the run's artifacts;")


CRAFTED = {"absolute": ("artifact", _absolute), "dotdot": ("artifact", _dotdot),
           "symlink": ("artifact", _symlink), "symlink-in-dir": ("model", _symlink_in_dir),
           "artifact-path": ("artifact", _escaping_artifact_path)}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_file_outside_the_spool_is_refused_before_anything_is_uploaded(
        case, server_uri, tmp_path):
    client = MlflowClient(server_uri)
    experiment = f"sync-crafted-{case}"
    run = client.create_run(client.create_experiment(experiment))
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours\n")
    spool = _spool(tmp_path / "spool", run.info.run_id, experiment, server_uri)
    kind, craft = CRAFTED[case]
    fields, problem = craft(spool, secret)
    spool.write(kind, **fields)
    events = (spool.dir / "events.jsonl").read_bytes()

    with pytest.raises(CnnflowError) as err:
        sync(spool.dir)
    assert str(err.value) == (f"{spool.dir}/events.jsonl line 3: {problem} "
                              + ("" if case == "artifact-path" else f"the spool {spool.dir}; ")
                              + "nothing was uploaded")
    # the events before the bad one were not replayed either
    after = client.get_run(run.info.run_id)
    assert "late" not in after.data.tags
    assert client.list_artifacts(run.info.run_id) == []
    assert not (spool.dir / "synced.json").exists()
    assert (spool.dir / "events.jsonl").read_bytes() == events  # the spool is kept as is


def test_the_cli_refuses_a_crafted_spool_in_one_line_and_creates_no_run(mlflow_server,
                                                                        tmp_path):
    """The reported attack: a spool naming /etc/hostname. The spooled run does not exist on
    the server, so a sync would create one; the refusal creates none (not even the
    experiment)."""
    experiment = "sync-crafted-cli"
    spool = _spool(tmp_path / "spool", "0" * 32, experiment, "http://attacker.invalid:5000")
    spool.write("artifact", file="/etc/hostname", artifact_path=None)

    done = cnnflow("tracking", "sync", str(spool.dir), cwd=tmp_path, uri=mlflow_server)
    assert done.returncode == 2
    assert done.stderr == (f"cnnflow: error: {spool.dir}/events.jsonl line 3: file "
                           f"'/etc/hostname' is outside the spool {spool.dir}; nothing was "
                           f"uploaded\n")
    assert done.stdout == ""
    assert MlflowClient(mlflow_server).get_experiment_by_name(experiment) is None


# ------------------------------------------------------------------ where it uploads to


@pytest.fixture
def stores(tmp_path, sqlite_template) -> dict[str, str]:
    """Three sqlite stores: the one the spool recorded, the user's, and another."""
    uris = {}
    for name in ("recorded", "user", "third"):
        db = tmp_path / name / "mlflow.db"
        db.parent.mkdir()
        shutil.copyfile(sqlite_template, db)
        uris[name] = f"sqlite:///{db}"
    return uris


def _params_spool(directory: Path, recorded: str) -> Path:
    spool = Spool(directory, {"run_id": "a" * 32, "tracking_uri": recorded,
                              "experiment_name": "sync-uri"})
    spool.write("params", params={"train.lr": "0.1"})
    return spool.dir


def _synced_runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sync-uri")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def test_the_environment_beats_the_uri_the_spool_recorded(stores, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stores["user"])
    spool = _params_spool(tmp_path / "spool", stores["recorded"])
    run_id = sync(spool)
    (run,) = _synced_runs(stores["user"])
    assert run.info.run_id == run_id
    assert run.data.params == {"train.lr": "0.1"}
    assert run.data.tags["cnnflow.synced_from_run_id"] == "a" * 32
    assert _synced_runs(stores["recorded"]) == []
    assert json.loads((spool / "synced.json").read_text()) == {
        "run_id": run_id, "tracking_uri": stores["user"],
        "recorded_tracking_uri": stores["recorded"], "events": 1}


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`cnnflow ARGS` in this process (the console script's own entry point)."""
    monkeypatch.setattr(cli, "_setup_logging", lambda: None)  # keep pytest's log capture
    monkeypatch.setattr(sys, "argv", ["cnnflow", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@pytest.mark.parametrize("flag", ["--to-recorded-uri", "--tracking-uri", "--uri"])
def test_the_cli_flags_choose_the_target(flag, stores, monkeypatch, capsys, tmp_path):
    """The environment names the user's store; `--to-recorded-uri` overrides it with the
    spool's own, `--tracking-uri` (alias `--uri`) with another."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stores["user"])
    spool = _params_spool(tmp_path / "spool", stores["recorded"])
    if flag == "--to-recorded-uri":
        target, args = stores["recorded"], [flag]
    else:
        target, args = stores["third"], [flag, stores["third"]]
    code, out, err = _main(monkeypatch, capsys, "tracking", "sync", str(spool), *args)
    assert (code, err) == (0, "")
    (run,) = _synced_runs(target)
    assert out == (f"synced {spool} into run {run.info.run_id} at {target} (the spool "
                   f"recorded {stores['recorded']})\n")
    assert run.data.params == {"train.lr": "0.1"}
    assert [name for name, uri in stores.items() if _synced_runs(uri)] == [
        "recorded" if flag == "--to-recorded-uri" else "third"]


def test_without_a_target_it_says_what_to_pass(monkeypatch, capsys, tmp_path):
    recorded = f"sqlite:///{tmp_path / 'recorded' / 'mlflow.db'}"
    spool = _params_spool(tmp_path / "spool", recorded)
    code, out, err = _main(monkeypatch, capsys, "tracking", "sync", str(spool))
    assert (code, out) == (2, "")
    assert err == (f"cnnflow: error: {spool}: no tracking URI to sync into; pass "
                   f"--tracking-uri URI or set MLFLOW_TRACKING_URI, or pass --to-recorded-uri "
                   f"to use the one the spool recorded ({recorded})\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool"]  # no store was created
    assert not (spool / "synced.json").exists()

    code, out, err = _main(monkeypatch, capsys, "tracking", "sync", str(spool),
                           "--tracking-uri", recorded, "--to-recorded-uri")
    assert (code, out) == (2, "")
    assert err == (f"cnnflow: error: --tracking-uri {recorded} and --to-recorded-uri "
                   f"exclude each other: pass one\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool"]
