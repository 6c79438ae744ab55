"""Every MLflow run is closed and where it belongs, for the CLI runner: a single command is
its own top-level run, FINISHED or FAILED with its one-line error as a tag."""

from __future__ import annotations

from tests.cli import cnnflow


def test_cli_commands_are_their_own_closed_runs(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ok = cnnflow("prepare", "--set", "prepare.source=synthetic", "--set",
                  "prepare.num_images=200", "--set", "prepare.workers=1", cwd=tmp_path, uri=uri)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "empty").mkdir()
    bad = cnnflow("prepare", "--set", "prepare.source=imagefolder", "--set",
                   f"prepare.path={tmp_path / 'empty'}", "--set",
                   f"prepare.out_dir={tmp_path / 'other'}", cwd=tmp_path, uri=uri)
    assert bad.returncode == 2
    (line,) = bad.stderr.strip().splitlines()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cnnflow").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    assert all("mlflow.parentRunId" not in r.data.tags for r in runs)
    assert all(r.data.tags["cnnflow.runner"] == "cli" for r in runs)
    (failed,) = [r for r in runs if r.info.status == "FAILED"]
    assert f"cnnflow: error: {failed.data.tags['cnnflow.error']}" == line
