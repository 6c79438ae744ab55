"""`cnnflow mlflow-server --allowed-hosts`: the argv `mlflow server` gets, and the CLI's
wiring. (A live server started with it answers its Service name and refuses others:
test_faults' crash test.)"""

from __future__ import annotations

import sys

import pytest

from cnnflow import cli
from cnnflow.errors import CnnflowError
from cnnflow.tracking import server
from cnnflow.tracking.server import server_command


def test_the_server_command_passes_the_allowed_hosts(tmp_path):
    cmd = server_command(tmp_path / "mlflow.db", tmp_path / "artifacts", "0.0.0.0", 5000,
                         allowed_hosts="mlflow.cnnflow.svc:5000, 127.0.0.1:5000")
    assert cmd == [sys.executable, "-m", "mlflow", "server", "--host", "0.0.0.0", "--port",
                   "5000", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "--serve-artifacts", "--artifacts-destination", str(tmp_path / "artifacts"),
                   "--workers", "1", "--allowed-hosts", "mlflow.cnnflow.svc:5000,127.0.0.1:5000"]
    default = server_command(tmp_path / "mlflow.db", tmp_path / "artifacts")
    assert default == cmd[:5] + ["127.0.0.1"] + cmd[6:-2]  # MLflow's own default list


def test_an_empty_allowed_host_is_refused(tmp_path):
    with pytest.raises(CnnflowError) as err:
        server_command(tmp_path / "mlflow.db", tmp_path / "artifacts",
                       allowed_hosts="mlflow.cnnflow.svc:5000,,localhost:5000")
    assert str(err.value) == ("--allowed-hosts 'mlflow.cnnflow.svc:5000,,localhost:5000': "
                              "expected comma-separated host names (host:port or host:*), "
                              "got an empty one")


@pytest.mark.parametrize("args, allowed", [([], None),
                                           (["--allowed-hosts", "mlflow.cnnflow.svc:*"],
                                            "mlflow.cnnflow.svc:*")])
def test_the_cli_hands_the_allowed_hosts_to_run_server(args, allowed, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(server, "run_server", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(cli, "_setup_logging", lambda: None)
    monkeypatch.setattr(sys, "argv", ["cnnflow", "mlflow-server", "--host", "0.0.0.0",
                                      *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0, capsys.readouterr().err
    assert calls == [(("mlflow/mlflow.db", "mlflow/artifacts"),
                      {"host": "0.0.0.0", "port": 5000, "allowed_hosts": allowed,
                       "workers": 1, "auth_config": None})]


def test_postgres_store_bucket_workers_and_auth_in_the_server_command():
    cmd = server_command("postgresql://mlflow@db:5432/mlflow", "s3://bucket/mlflow",
                         workers=4, auth=True)
    assert cmd[cmd.index("--backend-store-uri") + 1] == "postgresql+psycopg2://mlflow@db:5432/mlflow"
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    assert cmd[cmd.index("--workers") + 1] == "4"
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth"
    with pytest.raises(CnnflowError, match=r"^--workers 0: expected at least 1$"):
        server_command("mlflow.db", "artifacts", workers=0)


def test_a_bad_auth_config_is_one_line(tmp_path):
    from cnnflow.tracking.server_checks import check_auth_config

    with pytest.raises(CnnflowError) as err:
        check_auth_config(tmp_path / "nope.ini")
    assert str(err.value) == (f"--auth {tmp_path / 'nope.ini'}: no such file (expected "
                              f"MLflow's basic_auth.ini)")
    ini = tmp_path / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n")
    with pytest.raises(CnnflowError, match=r"expected \[mlflow\] database_uri = \.\.\."):
        check_auth_config(ini)
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   "database_uri = postgresql://u:secret@db/auth\n")
    with pytest.raises(CnnflowError) as err:
        check_auth_config(ini)
    assert "secret" not in str(err.value)
    assert str(err.value) == (f"--auth {ini}: database_uri postgresql://u:***@db/auth: write "
                              f"postgresql+psycopg2:// (the driver installed; SQLAlchemy's "
                              f"default for postgresql:// is psycopg 3)")
