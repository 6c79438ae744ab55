"""`cnnflow mlflow-server` on production storage, as a user starts it: the console script
in a subprocess on a loopback port, the store in a real PostgreSQL (initdb + pg_ctl in a
temporary directory), the artifacts in a bucket of an S3 emulator (moto's server mode),
and MLflow's basic-auth app with its users in PostgreSQL too (the cluster's
mlflow/cluster/basic_auth.ini) or in sqlite (mlflow/local/basic_auth.ini).
Bad storage is one line and a non-zero exit, before any server starts."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.servers import MlflowServer as Server
from tests.servers import free_port, postgres_server, s3_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a server start, migrations

ROOT = Path(__file__).resolve().parents[2]
CNNFLOW = str(Path(sys.executable).with_name("cnnflow"))
BUCKET = "cnnflow-test"
ADMIN_PASSWORD = "cnnflow-admin-Pa55word"
CLIENT_PASSWORD = "cnnflow-client-Pa55word"


@pytest.fixture(scope="module")
def pg():
    with postgres_server() as server:
        server.create_database("mlflow")
        server.create_database("mlflow_auth")
        yield server


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


def _env(pg, s3, **extra: str) -> dict[str, str]:
    """The user's shell: S3 credentials and endpoint, the database password in PGPASSWORD
    (not in the URI), no tracking identity inherited from the test process."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CNNFLOW_", "KFP_", "DVC_", "MLFLOW_", "PG"))}
    return {**env, **s3.env, "PGPASSWORD": pg.password, **extra}


def _rows(pg, sql: str, *args) -> list[tuple]:
    conn = pg.connect("mlflow")
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def test_runs_metrics_and_versions_land_in_postgres_and_artifacts_in_the_bucket(
        pg, s3, tmp_path, monkeypatch):
    store = f"postgresql://{pg.user}@127.0.0.1:{pg.port}/mlflow"
    server = Server(["--store", store, "--artifacts", f"s3://{BUCKET}/mlflow",
                     "--workers", "2"], _env(pg, s3), tmp_path)
    try:
        banner = server.wait_ready()
        assert banner.strip() == (f"MLflow server at {server.url} (store postgresql+psycopg2://"
                                  f"{pg.user}@127.0.0.1:{pg.port}/mlflow, artifacts "
                                  f"s3://{BUCKET}/mlflow); Ctrl-C stops it")
        import mlflow
        from mlflow import MlflowClient

        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        client = MlflowClient(server.url)
        experiment = client.create_experiment("pg-test")
        run = client.create_run(experiment)
        run_id = run.info.run_id
        client.log_metric(run_id, "val.accuracy", 0.875, step=3)
        (tmp_path / "notes.txt").write_text("trained on digits\n")
        client.log_artifact(run_id, str(tmp_path / "notes.txt"), "report")
        client.set_terminated(run_id)
        client.create_registered_model("cnnflow-pg")
        version = client.create_model_version("cnnflow-pg", f"{run.info.artifact_uri}/report",
                                              run_id=run_id)
        client.set_registered_model_alias("cnnflow-pg", "champion", version.version)
        back = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="report",
                                                   dst_path=str(tmp_path / "back"))
        assert (Path(back) / "notes.txt").read_text() == "trained on digits\n"
    finally:
        code = server.stop()
    assert code == 0 and server.lines[-1] == "MLflow server stopped\n", server.lines[-5:]
    # in PostgreSQL: the run, its metric, the version and its alias
    assert _rows(pg, "SELECT key, value, step FROM metrics WHERE run_uuid = %s",
                 run_id) == [("val.accuracy", 0.875, 3)]
    assert _rows(pg, "SELECT status, artifact_uri FROM runs WHERE run_uuid = %s", run_id) == [
        ("FINISHED", f"mlflow-artifacts:/{experiment}/{run_id}/artifacts")]
    assert _rows(pg, "SELECT name, version, run_id FROM model_versions") == [
        ("cnnflow-pg", 1, run_id)]
    assert _rows(pg, "SELECT name, alias, version FROM registered_model_aliases") == [
        ("cnnflow-pg", "champion", 1)]
    # in the bucket: the artifact, under the prefix, with its content
    key = f"mlflow/{experiment}/{run_id}/artifacts/report/notes.txt"
    assert s3.keys(BUCKET) == [key]
    body = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body == b"trained on digits\n"


def _bad(args: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run([CNNFLOW, "mlflow-server", "--port", str(free_port()), *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    return proc.stderr.strip()


def test_bad_storage_is_one_line_before_any_server_starts(pg, s3, tmp_path):
    env = _env(pg, s3)
    store = f"postgresql://{pg.user}@127.0.0.1:{pg.port}/mlflow"
    bucket = ["--artifacts", f"s3://{BUCKET}/mlflow"]
    closed = free_port()
    assert _bad(["--store", f"postgresql://{pg.user}@127.0.0.1:{closed}/mlflow", *bucket],
                env, tmp_path) == (
        f"cnnflow: error: --store postgresql://{pg.user}@127.0.0.1:{closed}/mlflow: "
        f"PostgreSQL at 127.0.0.1:{closed} is unreachable: Connection refused")
    assert _bad(["--store", store, *bucket], {**env, "PGPASSWORD": "wrong"}, tmp_path) == (
        f"cnnflow: error: --store {store}: PostgreSQL at 127.0.0.1:{pg.port} refused the "
        f"password for user '{pg.user}' (give it in the URI or in PGPASSWORD)")
    in_uri = _bad(["--store", pg.uri("mlflow", password="not-it"), *bucket], env, tmp_path)
    assert "not-it" not in in_uri and f"{pg.user}:***@" in in_uri and "refused" in in_uri
    assert _bad(["--store", store.replace("/mlflow", "/nodb"), *bucket], env, tmp_path) == (
        f"cnnflow: error: --store {store.replace('/mlflow', '/nodb')}: database \"nodb\" "
        f"does not exist on PostgreSQL at 127.0.0.1:{pg.port} (create it first)")
    assert _bad(["--store", store, "--artifacts", "s3://no-such-bucket/mlflow"], env,
                tmp_path) == (
        f"cnnflow: error: --artifacts s3://no-such-bucket/mlflow: bucket 'no-such-bucket' "
        f"does not exist at {s3.endpoint} (create it first)")
    assert not list(tmp_path.iterdir())  # nothing written


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
    if auth:
        import base64

        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("config", ["mlflow/cluster/basic_auth.ini",
                                    "mlflow/local/basic_auth.ini"])
def test_with_auth_a_client_without_credentials_is_refused(config, pg, s3, tmp_path,
                                                            monkeypatch):
    """The cluster config keeps its users in PostgreSQL (PGHOST/PGPORT/PGUSER/PGPASSWORD,
    as the Deployment sets them from Secret mlflow-db); the local one in sqlite."""
    (tmp_path / "mlflow").mkdir()
    env = _env(pg, s3, PGHOST=pg.host, PGPORT=str(pg.port), PGUSER=pg.user,
               MLFLOW_AUTH_ADMIN_USERNAME="admin", MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD)
    server = Server(["--store", "mlflow/mlflow.db", "--artifacts", "mlflow/artifacts",
                     "--auth", str(ROOT / config)], env, tmp_path)
    try:
        assert server.wait_ready().rstrip().endswith(", login required); Ctrl-C stops it")
        assert _status(server.url) == 401
        assert _status(server.url, ("admin", "wrong-password-1")) == 401
        assert _status(server.url, ("admin", ADMIN_PASSWORD)) == 200
        import mlflow
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(server.url)
        with pytest.raises(MlflowException, match="401"):
            mlflow.MlflowClient().search_experiments()
        # the README's command: the admin creates the user pipeline steps log in as
        readme = next(line.strip() for line in (ROOT / "README.md").read_text().splitlines()
                      if "/api/2.0/mlflow/users/create" in line)
        command = (readme.replace("<admin password>", ADMIN_PASSWORD)
                   .replace("<client password>", CLIENT_PASSWORD)
                   .replace("http://127.0.0.1:5000", server.url))
        created = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                 timeout=60)
        assert created.returncode == 0, created.stderr
        assert '"username": "cnnflow"' in created.stdout.replace('":"', '": "')
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "cnnflow")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", CLIENT_PASSWORD)
        client = mlflow.MlflowClient()
        run = client.create_run(client.create_experiment("auth-test"))
        client.log_metric(run.info.run_id, "loss", 0.5)
        assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.5}
    finally:
        assert server.stop() == 0
    if "cluster" in config:
        conn = pg.connect("mlflow_auth")
        with conn.cursor() as cur:
            cur.execute("SELECT username, is_admin FROM users ORDER BY id")
            assert cur.fetchall() == [("admin", True), ("cnnflow", False)]
        conn.close()
    else:
        assert (tmp_path / "mlflow" / "basic_auth.db").is_file()
