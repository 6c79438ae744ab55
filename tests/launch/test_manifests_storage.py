"""manifests/: MLflow on PostgreSQL with its artifacts in a bucket and a login required,
credentials from Secrets only, PostgreSQL itself in overlays/postgres. Rendered with
`kubectl kustomize` and validated like every manifest (test_manifests.py); the server's
argv is parsed by the real `cnnflow mlflow-server` command line."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cnnflow import cli
from cnnflow.launch.validate import pod_specs
from cnnflow.tracking import server
from tests.launch.test_manifests import by_kind, render

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["base", "overlays/local", "overlays/gpu", "overlays/postgres"]


def _mlflow(docs: dict) -> dict:
    return docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e.get("valueFrom") or {"value": e["value"]} for e in container["env"]}


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_in_the_repository_only_references(target):
    docs = render(target)
    assert not [d for d in docs if d["kind"] == "Secret"]
    text = "\n".join(str(d) for d in docs)
    assert not re.search(r"(?i)password['\"]?\s*[:=]\s*['\"]?[^'\"\s{]", text.replace(
        "'password'", "").replace("MLFLOW_AUTH_ADMIN_PASSWORD", ""))
    env = _env(_mlflow(by_kind(docs))["containers"][0])
    refs = {name: (v["secretKeyRef"]["name"], v["secretKeyRef"]["key"])
            for name, v in env.items() if "secretKeyRef" in v}
    assert refs == {
        "PGHOST": ("mlflow-db", "host"), "PGPORT": ("mlflow-db", "port"),
        "PGDATABASE": ("mlflow-db", "database"), "PGUSER": ("mlflow-db", "user"),
        "PGPASSWORD": ("mlflow-db", "password"),
        "AWS_ACCESS_KEY_ID": ("mlflow-s3", "AWS_ACCESS_KEY_ID"),
        "AWS_SECRET_ACCESS_KEY": ("mlflow-s3", "AWS_SECRET_ACCESS_KEY"),
        "MLFLOW_AUTH_ADMIN_USERNAME": ("mlflow-admin", "username"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ("mlflow-admin", "password"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": ("mlflow-admin", "flask-secret-key")}


def test_the_server_runs_cnnflow_mlflow_server_on_postgres_a_bucket_and_basic_auth(
        monkeypatch, capsys):
    """Kubernetes expands $(VAR) from the container's env; the result is parsed by the real
    CLI (run_server replaced), so every flag the manifest passes exists."""
    docs = by_kind(render("base"))
    spec = _mlflow(docs)
    container = spec["containers"][0]
    env = _env(container)
    assert env["MLFLOW_ARTIFACTS"] == {"configMapKeyRef": {"name": "mlflow-storage",
                                                          "key": "artifacts"}}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["configMapKeyRef"]["optional"] is True
    storage = docs[("ConfigMap", "mlflow-storage")]["data"]
    assert storage == {"artifacts": "s3://cnnflow-mlflow/artifacts"}
    values = {"PGUSER": "mlflow", "PGHOST": "postgres", "PGPORT": "5432",
              "PGDATABASE": "mlflow", "MLFLOW_ARTIFACTS": storage["artifacts"]}
    args = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in container["args"]]
    assert container["command"] == ["cnnflow", "mlflow-server"]
    calls = []
    monkeypatch.setattr(server, "run_server", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(cli, "_setup_logging", lambda: None)
    monkeypatch.setattr(sys, "argv", ["cnnflow", "mlflow-server", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0, capsys.readouterr().err
    (store, artifacts), kw = calls[0]
    assert store == "postgresql://mlflow@postgres:5432/mlflow"  # no password: PGPASSWORD
    assert artifacts == "s3://cnnflow-mlflow/artifacts"
    assert kw["workers"] == 2 and kw["host"] == "0.0.0.0" and kw["port"] == 5000
    assert kw["auth_config"] == "/etc/mlflow/basic_auth.ini"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/mlflow")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    auth = docs[("ConfigMap", volume["configMap"]["name"])]["data"]["basic_auth.ini"]
    assert auth == (ROOT / "mlflow" / "cluster" / "basic_auth.ini").read_text()
    assert not [v for v in spec["volumes"] if "persistentVolumeClaim" in v]  # no disk
    assert container["startupProbe"]["httpGet"]["path"] == "/health"


def test_the_postgres_overlay_runs_a_statefulset_with_its_own_volume():
    docs = by_kind(render("overlays/postgres"))
    sts = docs[("StatefulSet", "postgres")]
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = _env(container)
    assert {k: v["secretKeyRef"]["key"] for k, v in env.items() if "secretKeyRef" in v} == {
        "POSTGRES_USER": "user", "POSTGRES_PASSWORD": "password", "POSTGRES_DB": "database"}
    assert all(v["secretKeyRef"]["name"] == "mlflow-db" for v in env.values()
               if "secretKeyRef" in v)
    assert pod["securityContext"]["runAsUser"] == 999 and container["resources"]["limits"]
    claim = sts["spec"]["volumeClaimTemplates"][0]
    data = next(m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert data["mountPath"] == "/var/lib/postgresql/data"
    assert env["PGDATA"]["value"].startswith(data["mountPath"] + "/")
    assert docs[("Service", "postgres")]["spec"]["ports"][0]["port"] == 5432
    init = docs[("ConfigMap", "postgres-init")]["data"]["mlflow-auth.sh"]
    assert "CREATE DATABASE mlflow_auth" in init
    policy = docs[("NetworkPolicy", "postgres-from-mlflow")]["spec"]
    assert policy["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]
    assert ("StatefulSet", "postgres") not in by_kind(render("base"))


def test_the_readmes_secrets_hold_every_key_the_manifests_read():
    """`kubectl create secret` as the README writes it (placeholders filled, client-side
    dry run: no cluster), against every secretKeyRef in the postgres overlay: the MLflow
server's and the example training job's."""
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()
             if line.strip().startswith("kubectl -n cnnflow create secret generic ")]
    created = {}
    for line in lines:
        command = re.sub(r"<[^>]+>", "x", line) + " --dry-run=client -o json"
        proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        secret = json.loads(proc.stdout)
        assert secret["metadata"]["namespace"] == "cnnflow"
        assert all(base64.b64decode(v) for v in secret["data"].values())
        created[secret["metadata"]["name"]] = set(secret["data"])
    read: dict[str, set[str]] = {}
    for doc in render("overlays/postgres"):
        for _, spec in pod_specs(doc):
            for c in spec["containers"]:
                for e in c.get("env", []):
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    if ref:
                        read.setdefault(ref["name"], set()).add(ref["key"])
    # the server's, and the training pods' (MLflow's login, the data bucket's keys)
    secrets = {"mlflow-db", "mlflow-s3", "mlflow-admin", "mlflow-client", "cnnflow-storage"}
    assert set(read) == secrets
    assert all(read[name] <= created[name] for name in read), (read, created)
    assert set(created) == secrets
