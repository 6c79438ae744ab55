"""The local backend: a rendered PyTorchJob run as one process group per replica.

Training runs use the real `python -m cnnflow.train` (and torchrun) on the digits shards;
the restart semantics use tiny python commands, whose behaviour is easy to script.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cnnflow.config import load_params
from cnnflow.configs.launch import LaunchConfig
from cnnflow.launch import launch_training
from cnnflow.launch.local import LocalJob, run_local
from cnnflow.launch.operator import IMAGE_CMD
from cnnflow.launch.pytorchjob import render_job
from cnnflow.launch.validate import ManifestError

from .conftest import params_text

TINY = ["train.epochs=1", "train.max_steps=4", "train.batch_size=32", "model.width=8",
        "train.log_every=1"]


def _train(tmp_path, digits_shards, **cfg):
    # As on the cluster: shards on the volume, at the default <mount_path>/data/shards, and
    # the final config (as the train step resolves it for the pods) in the ConfigMap.
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "shards").symlink_to(digits_shards)
    name = f"run-{len(cfg)}-{cfg.get('nodes', 1)}"
    out, ckpt = ws / "runs" / name / "train", ws / "runs" / name / "checkpoints"
    text = params_text([*TINY, f"train.shards={ws / 'data' / 'shards'}", f"train.out_dir={out}",
                        f"checkpoint.dir={ckpt}"])
    rendered = render_job(LaunchConfig(tracking_uri="", **cfg), name=name, params_yaml=text)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(rendered.to_yaml())
    lines: list[str] = []
    rc = run_local(job_file, mounts={"/workspace": str(ws)}, echo=lines.append)
    return rc, lines, out


@pytest.mark.distributed
@pytest.mark.slow
def test_two_replicas_one_process_each(tmp_path, digits_shards):
    rc, lines, out = _train(tmp_path, digits_shards, nodes=2)
    assert rc == 0, "\n".join(lines[-30:])
    assert (out / "model.pt").is_file()
    # the operator's env: RANK = replica index, WORLD_SIZE = 2 x 1
    assert any(line.startswith("[master-0] ") and "rank 0/2 joined gloo" in line for line in lines)
    assert any(line.startswith("[worker-0] ") and "rank 1/2 joined gloo" in line for line in lines)
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines() if x]
    assert len(steps) == 4


@pytest.mark.distributed
@pytest.mark.slow
def test_one_replica_two_processes_with_torchrun(tmp_path, digits_shards):
    """Through `launch_training`, the train step's entry: render + run with cfg.backend."""
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "shards").symlink_to(digits_shards)
    params = load_params(None, ["tracking.enabled=false", *TINY, "launch.backend=local",
                                "launch.nodes=1", "launch.nproc_per_node=2",
                                f"launch.local_mounts=[/workspace={ws}]"])
    lines: list[str] = []
    result = launch_training(params, shards=str(ws / "data" / "shards"), workspace=ws,
                             run_id="torchrun-run", echo=lines.append)
    assert result.out_dir == f"{ws}/runs/{result.name}/train"
    assert (Path(result.out_dir) / "model.pt").is_file()
    assert all(line.startswith("[master-0] ") for line in lines)
    assert any("rank 1/2 joined gloo" in line for line in lines)  # PET_NPROC_PER_NODE=2


@pytest.mark.distributed
@pytest.mark.slow
def test_elastic_workers_rendezvous_through_pet_variables(tmp_path):
    """Two elastic Workers, torchrun c10d rendezvous from the operator's PET_* only."""
    (tmp_path / "rank.py").write_text(
        "import os, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "print('rank', dist.get_rank(), 'of', dist.get_world_size(), flush=True)\n"
        "dist.destroy_process_group()\n")
    job = render_job(LaunchConfig(nodes=2, elastic_min_nodes=2, elastic_max_nodes=2),
                     name="elastic-run").documents()[0]
    c = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python"] and c["args"][:2] == ["-m", "cnnflow.train.torchrun"]
    c["args"] = ["-m", "cnnflow.train.torchrun", "--nproc-per-node=1", "/workspace/rank.py"]
    lines: list[str] = []
    assert run_local(job, mounts={"/workspace": str(tmp_path)}, echo=lines.append) == 0
    ranks = sorted(line for line in lines if " rank " in line and " of 2" in line)
    assert len(ranks) == 2 and {r.split()[2] for r in ranks} == {"0", "1"}, lines[-20:]


def _job(tmp_path, code: str, *, nodes: int = 1, restart_policy: str = "OnFailure",
         backoff_limit: int = 3, deadline: int = 600) -> dict:
    """A rendered job whose `pytorch` container runs `python -c code` instead of training."""
    cfg = LaunchConfig(nodes=nodes, restart_policy=restart_policy,
                       backoff_limit=backoff_limit, active_deadline_s=deadline)
    job = render_job(cfg, name="restart-test").documents()[0]
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        container = spec["template"]["spec"]["containers"][0]
        container["command"] = ["python", "-c", code]
        container["args"] = ["/workspace/marker"]
    return job


FAIL_FIRST = ("import os, sys, pathlib; m = pathlib.Path(sys.argv[1] + os.environ['RANK']); "
              "first = not m.exists(); m.touch(); print('attempt', 'first' if first else 'again');"
              " sys.exit(3 if first else 0)")


def test_on_failure_restarts_the_replica_then_succeeds(tmp_path):
    lines: list[str] = []
    job = _job(tmp_path, FAIL_FIRST, restart_policy="OnFailure")
    rc = run_local(job, mounts={"/workspace": str(tmp_path)}, echo=lines.append)
    assert rc == 0
    assert lines == ["[master-0] attempt first", "[master-0] attempt again"]
    assert (tmp_path / "marker0").exists()  # /workspace was mapped to tmp_path


def test_never_fails_the_job_and_terminates_the_others(tmp_path):
    # The worker fails once the master has printed (the master's marker file says so); the
    # master would run for a minute: the job must stop it (SIGTERM, which it records).
    code = ("import os, pathlib, signal, sys, time\n"
            "rank, marker = os.environ['RANK'], pathlib.Path(sys.argv[1])\n"
            "print('up', rank, flush=True)\n"
            "if rank == '0':\n"
            "    def term(*_):\n"
            "        pathlib.Path(sys.argv[1] + '.terminated').touch()\n"
            "        sys.exit(143)\n"
            "    signal.signal(signal.SIGTERM, term)\n"
            "    marker.touch()\n"
            "    time.sleep(60)\n"
            "end = time.monotonic() + 60\n"
            "while not marker.exists() and time.monotonic() < end:\n"
            "    time.sleep(0.01)\n"
            "sys.exit(5)\n")
    lines: list[str] = []
    result = LocalJob(_job(tmp_path, code, nodes=2, restart_policy="Never"),
                      mounts={"/workspace": str(tmp_path)}, echo=lines.append,
                      kill_grace_s=2).run()
    assert not result.succeeded and result.exit_code == 5
    assert result.reason == "replica worker-0 exited with code 5 (restartPolicy Never)"
    assert sorted(lines) == ["[master-0] up 0", "[worker-0] up 1"]
    assert (tmp_path / "marker.terminated").exists()  # the master was stopped, not waited for


def test_backoff_limit_caps_restarts(tmp_path):
    lines: list[str] = []
    job = _job(tmp_path, "import sys; print('boom'); sys.exit(2)", backoff_limit=2)
    result = LocalJob(job, mounts={"/workspace": str(tmp_path)}, echo=lines.append).run()
    assert not result.succeeded and result.restarts == 2
    assert result.reason == "replica master-0 exited with code 2 (backoffLimit=2 reached)"
    assert lines == ["[master-0] boom"] * 3


def test_exit_code_policy_retries_only_signal_exits(tmp_path):
    # 137 (128 + SIGKILL, an OOM kill or a preemption) is retryable; 1..127 are not.
    code = ("import os, sys, pathlib; m = pathlib.Path(sys.argv[1]); first = not m.exists();"
            " m.touch(); sys.exit(137 if first else 1)")
    result = LocalJob(_job(tmp_path, code, restart_policy="ExitCode"),
                      mounts={"/workspace": str(tmp_path)}, echo=lambda s: None).run()
    assert result.restarts == 1 and result.exit_code == 1
    assert "restartPolicy ExitCode" in result.reason


def test_active_deadline_stops_the_job(tmp_path):
    job = _job(tmp_path, "import time; time.sleep(60)", deadline=1)
    result = LocalJob(job, mounts={"/workspace": str(tmp_path)}, echo=lambda s: None,
                      kill_grace_s=2).run()
    assert not result.succeeded
    assert result.reason == "exceeded runPolicy.activeDeadlineSeconds=1"


def test_operator_environment_and_volume_mapping(tmp_path):
    rendered = render_job(LaunchConfig(nodes=3, nproc_per_node=2), name="envjob",
                          params_yaml="x: 1\n", parent_run_id="p-1")
    job = LocalJob(rendered, mounts={"cnnflow-data": str(tmp_path / "ws")})
    by_label = {r.label: r for r in job.replicas}
    assert list(by_label) == ["master-0", "worker-0", "worker-1"]
    master, worker = by_label["master-0"].env, by_label["worker-1"].env
    port = master["MASTER_PORT"]
    assert {k: master[k] for k in ("MASTER_ADDR", "WORLD_SIZE", "RANK", "PET_NNODES",
                                   "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR",
                                   "PET_MASTER_PORT", "PYTHONUNBUFFERED")} == {
        "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "6", "RANK": "0", "PET_NNODES": "3",
        "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": "2", "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": port, "PYTHONUNBUFFERED": "0"}
    assert (worker["RANK"], worker["PET_NODE_RANK"], worker["MASTER_PORT"]) == ("2", "2", port)
    assert master["CNNFLOW_PARENT_RUN_ID"] == "p-1"
    argv = by_label["master-0"].argv
    assert argv[:3] == [sys.executable, "-m", "cnnflow.train.torchrun"]  # torchrun, exit 143
    params = argv[argv.index("--params") + 1]
    assert yaml.safe_load(Path(params).read_text()) == {"x": 1}  # the ConfigMap, written locally
    assert argv[3:] == ["-m", "cnnflow.train", "--params", params]  # the one channel
    assert master["HOME"].startswith(str(job.workdir))  # emptyDir /tmp -> per replica


def test_elastic_job_gets_only_pet_variables(tmp_path):
    rendered = render_job(LaunchConfig(nodes=2, elastic_min_nodes=1, elastic_max_nodes=3),
                          name="elastic")
    job = LocalJob(rendered, mounts={"/workspace": str(tmp_path)})
    env = job.replicas[0].env
    assert [r.label for r in job.replicas] == ["worker-0", "worker-1"]
    assert "RANK" not in env and "WORLD_SIZE" not in env and "MASTER_ADDR" not in env
    assert env["PET_NNODES"] == "1:3" and env["PET_RDZV_BACKEND"] == "c10d"
    assert env["PET_RDZV_ID"] == "elastic" and env["PET_MAX_RESTARTS"] == "3"
    assert env["PET_RDZV_ENDPOINT"].startswith("127.0.0.1:")
    assert "--nproc-per-node=1" in job.replicas[0].argv


def test_unmapped_claim_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match=r"volume 'data' \(claim cnnflow-data, mountPath "
                       r"/workspace\) has no local directory: map it with /workspace=DIR"):
        LocalJob(render_job(LaunchConfig(), name="nomap"))


# -------------------------------------------------- jobs shaped like the operator's examples

ENV_JSON = ("import json, os, sys; print(json.dumps({k: os.environ.get(k, '<unset>') "
            "for k in sys.argv[1:]}))")
RANK = "import os; print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'])"


def _containers(job: dict) -> list[dict]:
    return [s["template"]["spec"]["containers"][0]
            for s in job["spec"]["pytorchReplicaSpecs"].values()]


def test_job_without_run_policy_gets_the_operators_defaults(tmp_path):
    """No runPolicy: cleanPodPolicy None, no backoffLimit (restarts unlimited), no deadline."""
    job = _job(tmp_path, FAIL_FIRST)
    del job["spec"]["runPolicy"]
    lines: list[str] = []
    local = LocalJob(job, mounts={"/workspace": str(tmp_path)}, echo=lines.append)
    assert local.doc["spec"]["runPolicy"] == {"cleanPodPolicy": "None"}
    assert (local.backoff_limit, local.deadline_s) == (None, None)
    result = local.run()
    assert (result.succeeded, result.exit_code, result.restarts) == (True, 0, 1)
    assert lines == ["[master-0] attempt first", "[master-0] attempt again"]


NO_RDZV_ID_WARNING = (
    "PyTorchJob norid: spec.elasticPolicy.rdzvId not set: the operator sets no PET_RDZV_ID "
    "and torchrun uses the rendezvous id 'none'; a unique rdzvId is safer (two jobs with the "
    "same rendezvous endpoint would join each other)")


@pytest.mark.distributed
@pytest.mark.slow
def test_elastic_job_without_rdzv_id_runs_with_torchruns_default(tmp_path, warnings_logged):
    (tmp_path / "ids.py").write_text(
        "import os\n"
        "print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'], 'id',\n"
        "      os.environ['TORCHELASTIC_RUN_ID'], os.environ.get('PET_RDZV_ID', '<unset>'))\n")
    job = render_job(LaunchConfig(nodes=2, elastic_min_nodes=2, elastic_max_nodes=2),
                     name="norid").documents()[0]
    del job["spec"]["elasticPolicy"]["rdzvId"]
    (c,) = _containers(job)
    c["args"] = ["-m", "cnnflow.train.torchrun", "--nproc-per-node=1", "/workspace/ids.py"]
    lines: list[str] = []
    local = LocalJob(job, mounts={"/workspace": str(tmp_path)}, echo=lines.append)
    assert [(r.label, "PET_RDZV_ID" in r.env) for r in local.replicas] == [
        ("worker-0", False), ("worker-1", False)]
    result = local.run()
    assert (result.succeeded, result.exit_code) == (True, 0), lines[-20:]
    ranks = sorted(line.split("] ", 1)[1] for line in lines if "] rank " in line)
    assert ranks == ["rank 0 of 2 id none <unset>", "rank 1 of 2 id none <unset>"]
    assert warnings_logged == [NO_RDZV_ID_WARNING]


HPA_METRICS = [{"type": "Resource", "resource": {
    "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}]


def test_elastic_metrics_are_accepted_and_ignored_locally(tmp_path, warnings_logged):
    job = render_job(LaunchConfig(nodes=2, elastic_min_nodes=1, elastic_max_nodes=3),
                     name="hpa").documents()[0]
    job["spec"]["elasticPolicy"]["metrics"] = HPA_METRICS
    local = LocalJob(job, mounts={"/workspace": str(tmp_path)})
    assert [(r.label, r.env["PET_NNODES"]) for r in local.replicas] == [
        ("worker-0", "1:3"), ("worker-1", "1:3")]
    assert warnings_logged == [
        "PyTorchJob hpa: spec.elasticPolicy.metrics ignored locally (they drive the "
        "HorizontalPodAutoscaler on a cluster): 2 Worker replicas, no autoscaling"]


def test_worker_replicas_default_to_one(tmp_path):
    job = _job(tmp_path, RANK, nodes=2)
    del job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"]
    lines: list[str] = []
    assert run_local(job, mounts={"/workspace": str(tmp_path)}, echo=lines.append) == 0
    assert sorted(lines) == ["[master-0] rank 0 of 2", "[worker-0] rank 1 of 2"]


def test_args_without_command_are_refused_for_an_unknown_entrypoint(tmp_path):
    job = _job(tmp_path, "print('never')")
    (c,) = _containers(job)
    del c["command"]
    c["image"], c["args"] = "kubeflow/pytorch-dist-mnist:latest", ["--backend", "gloo"]
    with pytest.raises(ManifestError) as exc:
        LocalJob(job, mounts={"/workspace": str(tmp_path)})
    assert str(exc.value) == (
        "PyTorchJob restart-test: spec.pytorchReplicaSpecs.Master: container 'pytorch' has "
        "no command, and the ENTRYPOINT of image 'kubeflow/pytorch-dist-mnist:latest' (which "
        "would get its args) is unknown locally: add command (the entrypoint to run, e.g. "
        "[python, train.py])")


def test_cnnflow_image_args_run_as_the_command(tmp_path):
    """cnnflow's image has no ENTRYPOINT: args replace its CMD; with neither, CMD runs."""
    job = _job(tmp_path, "print('never')")
    (c,) = _containers(job)
    del c["command"]
    c["image"] = "registry.local:5000/team/cnnflow:0.1.0"
    c["args"] = ["python", "-c", "print('args ran')"]
    lines: list[str] = []
    assert run_local(job, mounts={"/workspace": str(tmp_path)}, echo=lines.append) == 0
    assert lines == ["[master-0] args ran"]
    del c["args"]
    assert LocalJob(job, mounts={"/workspace": str(tmp_path)}).replicas[0].argv == [
        sys.executable, "-m", "cnnflow.train", "--help"]
    # a script that is not executable (args[0] run directly): one line, not a traceback
    (tmp_path / "train.py").write_text("print('hi')\n")
    c["args"] = ["/workspace/train.py"]
    with pytest.raises(ManifestError) as exc:
        LocalJob(job, mounts={"/workspace": str(tmp_path)}, echo=lambda s: None).run()
    assert str(exc.value) == (f"PyTorchJob restart-test: master-0: cannot run "
                              f"'{tmp_path}/train.py' here: Permission denied")


def test_image_cmd_is_the_dockerfiles():
    dockerfile = Path(__file__).resolve().parents[2] / "Dockerfile"
    instructions = [line.split(maxsplit=1) for line in dockerfile.read_text().splitlines()
                    if line.strip() and not line.startswith((" ", "#"))]
    assert "ENTRYPOINT" not in [words[0] for words in instructions]
    (cmd,) = [words[1] for words in instructions if words[0] == "CMD"]
    assert tuple(json.loads(cmd)) == IMAGE_CMD


def test_value_from_resolves_pod_fields_and_names_the_rest(tmp_path, monkeypatch,
                                                           warnings_logged):
    job = _job(tmp_path, ENV_JSON, nodes=2)
    job["metadata"]["namespace"] = "team-a"
    refs = {"POD": {"fieldRef": {"fieldPath": "metadata.name"}},
            "NS": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            "IP": {"fieldRef": {"fieldPath": "status.podIP"}},
            "NODE": {"fieldRef": {"fieldPath": "spec.nodeName"}},
            "MODE": {"configMapKeyRef": {"name": "settings", "key": "mode"}},
            "TOKEN": {"secretKeyRef": {"name": "creds", "key": "token"}},
            "CPU": {"resourceFieldRef": {"resource": "limits.cpu"}},
            "UID": {"fieldRef": {"fieldPath": "metadata.uid"}},
            "OTHER": {"configMapKeyRef": {"name": "absent", "key": "k"}}}
    for c in _containers(job):
        c["env"] += [{"name": k, "valueFrom": v} for k, v in refs.items()]
        c["args"] = list(refs)
    settings = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
                "data": {"mode": "fast"}}
    monkeypatch.setenv("TOKEN", "from-this-host")  # unset in the pod: not inherited either
    lines: list[str] = []
    assert run_local([settings, job], mounts={"/workspace": str(tmp_path)},
                     echo=lines.append) == 0
    got = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in lines}
    unset = dict.fromkeys(["TOKEN", "CPU", "UID", "OTHER"], "<unset>")
    fixed = {"NS": "team-a", "IP": "127.0.0.1", "NODE": socket.gethostname(), "MODE": "fast"}
    assert got == {"[master-0]": {"POD": "restart-test-master-0", **fixed, **unset},
                   "[worker-0]": {"POD": "restart-test-worker-0", **fixed, **unset}}
    assert warnings_logged == [
        f"PyTorchJob restart-test: {label}: env TOKEN, CPU, UID, OTHER not set: valueFrom "
        "configMapKeyRef, fieldRef metadata.uid, resourceFieldRef, secretKeyRef cannot be "
        "resolved locally" for label in ("master-0", "worker-0")]


# Each replica starts a child in a session of its own (as torchrun starts its workers),
# says so in a file, and waits. The master exits 143 on SIGTERM/SIGINT, leaving its child
# behind; the worker ignores both: only the grace period's SIGKILL ends it.
SPAWNS = ("import os, pathlib, signal, subprocess, sys, time\n"
          "rank = os.environ['RANK']\n"
          "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
          "                         start_new_session=True)\n"
          "def stop(signum, frame):\n"
          "    pathlib.Path(sys.argv[1] + '.got-' + str(signum)).touch()\n"
          "    sys.exit(128 + signum)\n"
          "for s in (signal.SIGTERM, signal.SIGINT):\n"
          "    signal.signal(s, stop if rank == '0' else signal.SIG_IGN)\n"
          "pathlib.Path(sys.argv[1] + '.ready-' + rank).write_text(str(child.pid))\n"
          "time.sleep(120)\n")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_to_launch_local_reaches_every_replica_and_leaves_no_process(tmp_path, sig):
    job = _job(tmp_path, SPAWNS, nodes=2, restart_policy="ExitCode")
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        spec["template"]["spec"]["terminationGracePeriodSeconds"] = 2
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    cmd = [sys.executable, "-m", "cnnflow.cli", "launch", str(tmp_path / "job.yaml"),
           "--local", "--mount", f"/workspace={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ready = [tmp_path / "marker.ready-0", tmp_path / "marker.ready-1"]
    deadline = time.monotonic() + 120  # a hang guard: the loop waits for the files
    while proc.poll() is None and not all(p.exists() for p in ready) and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(p.exists() for p in ready), proc.communicate()[0][-3000:]
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert {int(p.read_text()) for p in ready} <= {p.pid for p in tree}
    assert len(tree) >= 4  # two replicas, two grandchildren
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, out[-3000:]
    assert (tmp_path / f"marker.got-{int(sig)}").exists()  # forwarded to the replica
    assert f"{signal.Signals(sig).name}: sent to every replica, SIGKILL after 2s" in out
    survivors = [p for p in tree if _alive(p)]
    assert not survivors, [p.cmdline() for p in survivors]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
