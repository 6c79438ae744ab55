"""What the training operator (kubeflow.org/v1, v1.9) adds to a PyTorchJob before and
when it creates the pods, and how a pod's command and env resolve on this machine.

- `with_defaults`: SetDefaults_PyTorchJob (pytorch_defaults.go): runPolicy.cleanPodPolicy
  None (backoffLimit, activeDeadlineSeconds stay unset: no limit), replicas 1 and
  restartPolicy OnFailure per replica type, elasticPolicy min/maxReplicas from each other
  or from the Worker replicas, nprocPerNode "auto" unless elasticPolicy.nProcPerNode.
- `pod_env`: the variables envvar.go, master.go and elastic.go set, with local addresses.
- `container_env`: the container's `env`; `valueFrom` resolves for fieldRef
  metadata.name (the pod's name, `<job>-<replica type>-<index>`), metadata.namespace (the
  job's, or "default"), status.podIP (127.0.0.1), spec.nodeName (this host) and for
  configMapKeyRef into a ConfigMap of the job file; any other is left unset and named.
- `container_argv`: Kubernetes runs `command` + `args`; without `command` the image's
  ENTRYPOINT gets `args` (or runs with its CMD). Other images' ENTRYPOINTs are unknown
  here, so such a container is refused. cnnflow's image (`cnnflow:TAG`, also under a
  registry path) sets no ENTRYPOINT (see the Dockerfile), so its `args` replace CMD and run
  as the command themselves; with neither, its CMD `IMAGE_CMD` runs.
"""

from __future__ import annotations

import copy
import socket
from collections.abc import Mapping
from typing import Any

from cnnflow.launch.validate import ManifestError

IMAGE_NAME = "cnnflow"
IMAGE_CMD = ("python", "-m", "cnnflow.train", "--help")  # the Dockerfile's CMD
RETRYABLE_EXIT_CODES = frozenset({130, 137, 138, 143})
"""What restartPolicy ExitCode retries (pkg/util/train IsRetryableExitCode): SIGINT,
SIGKILL and SIGTERM exits, and 138 (SIGUSR1) for user-defined retryable errors; every
other code (1, 2, 126, 127, 128, 139, ...) is a permanent failure."""
FIELD_REFS = ("metadata.name", "metadata.namespace", "status.podIP", "spec.nodeName")


def with_defaults(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of a (validated) PyTorchJob with the operator's defaults filled in."""
    job = copy.deepcopy(doc)
    spec = job["spec"]
    spec["runPolicy"] = spec.get("runPolicy") or {}
    spec["runPolicy"].setdefault("cleanPodPolicy", "None")
    for rspec in spec["pytorchReplicaSpecs"].values():
        if rspec.get("replicas") is None:
            rspec["replicas"] = 1
        rspec["restartPolicy"] = rspec.get("restartPolicy") or "OnFailure"
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        lo, hi = elastic.get("minReplicas"), elastic.get("maxReplicas")
        if lo is None and hi is None:
            lo = hi = spec["pytorchReplicaSpecs"]["Worker"]["replicas"]
        elastic["minReplicas"] = lo if lo is not None else hi
        elastic["maxReplicas"] = hi if hi is not None else lo
    if spec.get("nprocPerNode") is None and (elastic or {}).get("nProcPerNode") is None:
        spec["nprocPerNode"] = "auto"
    return job


def pod_env(job: dict[str, Any], rtype: str, index: int, master_port: int,
            rdzv_port: int) -> dict[str, str]:
    """The operator's variables for pod `index` of `rtype` of a defaulted job."""
    spec = job["spec"]
    specs, nproc, e = spec["pytorchReplicaSpecs"], spec.get("nprocPerNode"), spec.get(
        "elasticPolicy")
    total = sum(int(s["replicas"]) for s in specs.values())
    env = {"PYTHONUNBUFFERED": "0"}
    if "Master" in specs:
        rank = index + 1 if rtype == "Worker" else index
        per_node = int(nproc) if nproc and str(nproc).isdigit() else 1
        env.update({
            "MASTER_PORT": str(master_port), "MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(master_port), "PET_MASTER_ADDR": "127.0.0.1",
            "WORLD_SIZE": str(total * per_node), "RANK": str(rank),
            "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(rank),
        })
    if e is None:
        env["PET_NNODES"] = str(total)
        return env
    env.update({"PET_RDZV_ENDPOINT": f"127.0.0.1:{rdzv_port}",
                "PET_RDZV_BACKEND": e.get("rdzvBackend") or "c10d",
                "PET_NNODES": f"{e['minReplicas']}:{e['maxReplicas']}"})
    if e.get("maxRestarts") is not None:
        env["PET_MAX_RESTARTS"] = str(e["maxRestarts"])
    if e.get("nProcPerNode") is not None:
        env["PET_NPROC_PER_NODE"] = str(e["nProcPerNode"])
    if e.get("rdzvId") is not None:  # unset: torchrun's default id ("none") applies
        env["PET_RDZV_ID"] = e["rdzvId"]
    if e.get("rdzvConf"):
        env["PET_RDZV_CONF"] = ",".join(f"{c['key']}={c['value']}" for c in e["rdzvConf"])
    if e.get("standalone"):
        env["PET_STANDALONE"] = ""
    return env


def pod_fields(job: dict[str, Any], rtype: str, index: int) -> dict[str, str]:
    """The fieldRef paths that resolve locally, for pod `index` of `rtype`."""
    meta = job["metadata"]
    return {"metadata.name": f"{meta['name']}-{rtype.lower()}-{index}",
            "metadata.namespace": meta.get("namespace") or "default",
            "status.podIP": "127.0.0.1", "spec.nodeName": socket.gethostname()}


def container_env(entries: list[dict[str, Any]] | None, fields: Mapping[str, str],
                  config_maps: Mapping[str, Mapping[str, str]]
                  ) -> tuple[dict[str, str], dict[str, str]]:
    """({name: value}, {name: its unresolved valueFrom source}) for a container's `env`.
    An optional secretKeyRef is left unset without a word, as Kubernetes leaves it when
    the Secret is absent (there are no Secrets here): a value this process has stays."""
    env: dict[str, str] = {}
    unresolved: dict[str, str] = {}
    for entry in entries or []:
        name, source = entry["name"], entry.get("valueFrom")
        if source is None:
            env[name] = str(entry.get("value", ""))
            continue
        if (source.get("secretKeyRef") or {}).get("optional"):
            continue
        path = (source.get("fieldRef") or {}).get("fieldPath")
        ref = source.get("configMapKeyRef") or {}
        data = config_maps.get(ref.get("name"), {})
        if path in fields:
            env[name] = fields[path]
        elif ref and ref.get("key") in data:
            env[name] = data[ref["key"]]
        else:
            unresolved[name] = f"fieldRef {path}" if path else next(iter(source), "?")
    return env, unresolved


def is_project_image(image: str) -> bool:
    """`cnnflow:TAG`, `cnnflow@sha256:...`, also under a registry path."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
    return name == IMAGE_NAME


def container_argv(container: dict[str, Any], where: str) -> list[str]:
    """What the container runs (see the module docstring); `where` names the replica."""
    command, args = container.get("command") or [], container.get("args") or []
    if command:
        return [*command, *args]
    image = container.get("image", "")
    if not is_project_image(image):
        gets = " (which would get its args)" if args else ""
        raise ManifestError(
            f"{where}: container 'pytorch' has no command, and the ENTRYPOINT of image "
            f"{image!r}{gets} is unknown locally: add command (the entrypoint to run, e.g. "
            "[python, train.py])")
    return list(args or IMAGE_CMD)
