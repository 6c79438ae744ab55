"""The training pipeline: prepare -> shard -> train (PyTorchJob) -> evaluate, then finish.

    from cnnflow.kfp.cnn_training import cnn_training, build_pipeline
    kfp.compiler.Compiler().compile(cnn_training, "pipelines/compiled/cnn_training.yaml")
    build_pipeline(local=True)(**arguments)      # under kfp.local: see cnnflow.pipeline
    build_pipeline(image="registry.example/team/cnnflow:1.2")   # another image

Parameters: one per params.yaml key (`prepare.seed` -> `prepare_seed`; int, float, bool,
str, list), with the dataclass defaults of `Params()`, plus `workspace` (default
/workspace, where every step mounts the PVC launch.volume_claim). The signature is
generated from `flatten(Params())`, so a new config key is a new pipeline parameter.

Per step: caching on for prepare and shard (deterministic: same parameters, same bytes),
off for train, evaluate and finish; CPU/memory requests and limits sized for what the step
itself does (the train step only follows the PyTorchJob, whose pods request launch.cpu,
launch.memory and launch.gpus); retries with exponential backoff for transient failures
(cluster only: under kfp.local a failure is not transient, and retrying it just repeats
it); KFP_RUN_ID and CNNFLOW_RUNNER in the environment (kfp.local: `run_local` exports
KFP_RUN_ID, since kfp.local does not resolve placeholders in environment values). The
cached steps get no run-specific input, or no run would ever hit the cache. `finish` is
the exit handler: it closes the MLflow parent run FINISHED or FAILED whatever happened
(under KFP's MLflow plugin the backend owns and closes it: see cnnflow.kfp.steps).

One image: `image` (default `components.BASE_IMAGE`, the local tag cnnflow:0.1.0) is every
step's container image and the default of the `launch_image` parameter, the training
job's image, so the steps and the pods run the same code. A run may still pass another
launch_image; `cnnflow pipeline submit --image` sets both.

Pod security (cluster): every step runs as uid/gid 1000, runAsNonRoot
(`kubernetes.set_security_context`, what kfp-kubernetes 2.17 offers); the KFP 2.17
backend's compiler adds allowPrivilegeEscalation: false, capabilities drop ALL and seccomp
RuntimeDefault to every container it runs. kfp-kubernetes has no readOnlyRootFilesystem
setting, so the steps' root filesystem stays writable (the training pods' is read-only);
manifests/README.md says what the namespace enforces. MLflow's login comes from the Secret
launch.mlflow_secret names (default mlflow-client; keys username, password) as
MLFLOW_TRACKING_USERNAME/PASSWORD, the object store's from launch.storage_secret (default
cnnflow-storage; AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), both
optional, as the training pods get them (the Secret names are the compiled defaults).

Why not `dsl.TaskConfig` passthrough (kfp >= 2.15) for the job's resources and env: the
job's resources are run parameters (launch.cpu, launch.memory, launch.gpus, per replica)
that `cnnflow launch`, the local backend and kfp.local render identically, while
TaskConfig is filled only by a KFP backend's driver, from the train step's own
compile-time requests, which would then be the pods' (or, with apply_to_task, both).
Its ENV passthrough would carry the plugin's credential `secretKeyRef`s to the pods
(today only MLFLOW_WORKSPACE and MLFLOW_TRACKING_AUTH travel, in `launch.identity`); that
needs the job renderer to accept `valueFrom` entries and is not done.
"""

from __future__ import annotations

import inspect
from typing import Any

from kfp import dsl, kubernetes

from cnnflow.configs.launch import CREDENTIAL_KEYS, STORAGE_KEYS, LaunchConfig, check_image
from cnnflow.kfp import components as c
from cnnflow.kfp.params import WORKSPACE, encode, kfp_name, pipeline_parameters

NAME = "cnn-training"
DESCRIPTION = ("cnnflow: versioned data -> WebDataset shards -> distributed training "
               "(PyTorchJob) -> evaluation, registry and promotion gate, tracked in MLflow")
MOUNT_PATH = "/workspace"  # = launch.mount_path's default and the image's WORKDIR

# (cpu request, cpu limit, memory request, memory limit) of the step's own container
RESOURCES = {
    "prepare": ("1", "2", "2Gi", "4Gi"),
    "shard": ("1", "2", "2Gi", "4Gi"),
    "train": ("500m", "1", "1Gi", "2Gi"),  # follows the job; the pods do the work
    "evaluate": ("1", "2", "2Gi", "4Gi"),
    "finish": ("250m", "500m", "512Mi", "1Gi"),
}
CACHED = {"prepare", "shard"}
RETRIES = {"prepare": 2, "shard": 2, "train": 1, "evaluate": 2, "finish": 2}
RUN_AS = 1000  # the image's user (Dockerfile) and the training pods' uid/gid
# What each step's params string carries (see cnnflow.kfp.params)
SECTIONS: dict[str, tuple[str, ...] | None] = {
    "prepare": ("prepare", "tracking"),
    "shard": ("prepare", "shard", "tracking"),
    "train": None,
    "evaluate": None,
    "finish": ("tracking", "launch"),
}


def signature(image: str = c.BASE_IMAGE) -> inspect.Signature:
    """`(prepare_source: str = 'digits', ..., workspace: str = '/workspace')`, with
    `launch_image` defaulting to `image`."""
    defaults = {kfp_name("launch.image"): image}
    return inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          default=defaults.get(name, default), annotation=kind)
        for name, (kind, default) in pipeline_parameters().items()
    ])


def _configure(task: dsl.PipelineTask, step: str, *, local: bool, claim: Any,
               image: str) -> None:
    task.set_display_name(step)
    task.set_caching_options(step in CACHED)
    task.set_env_variable("CNNFLOW_RUNNER", "kfp-local" if local else "kfp")
    if local:
        # resources, retries, the placeholder env value and the PVC are the cluster's;
        # kfp.local ignores them (each kfp setter costs a stack inspection, ~20 ms)
        return
    task.set_container_image(image)
    kubernetes.set_security_context(task, run_as_user=RUN_AS, run_as_group=RUN_AS,
                                    run_as_non_root=True)
    cpu, cpu_limit, memory, memory_limit = RESOURCES[step]
    task.set_cpu_request(cpu).set_cpu_limit(cpu_limit)
    task.set_memory_request(memory).set_memory_limit(memory_limit)
    task.set_env_variable("KFP_RUN_ID", dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    if RETRIES[step]:
        task.set_retry(num_retries=RETRIES[step], backoff_duration="30s", backoff_factor=2.0,
                       backoff_max_duration="600s")
    kubernetes.mount_pvc(task, pvc_name=claim, mount_path=MOUNT_PATH)
    # MLflow's login and the object store's, as the training pods get them: optional
    defaults = LaunchConfig()
    for secret, keys in ((defaults.mlflow_secret, CREDENTIAL_KEYS),
                         (defaults.storage_secret, STORAGE_KEYS)):
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=keys,
                                     optional=True)


def build_pipeline(local: bool = False, image: str = c.BASE_IMAGE):
    """The pipeline (a kfp GraphComponent). `local=True`: for kfp.local (CNNFLOW_RUNNER=
    kfp-local; no image, resources, security context, retries or PVC, which kfp.local
    ignores); the DAG, components and parameters are the same. `image`: the steps' image
    and launch_image's default (checked: a tag or digest)."""
    check_image(image, "--image")
    sig = signature(image)

    def cnn_training(*args: Any, **kwargs: Any) -> None:
        values = sig.bind(*args, **kwargs)
        values.apply_defaults()
        v = values.arguments
        ws = {"workspace": v[WORKSPACE]}
        common = {**ws, "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}  # uncached steps

        def params(step: str) -> str:
            return encode(v, SECTIONS[step])

        done = c.finish(params=params("finish"), **common)
        tasks = {"finish": done}
        with dsl.ExitHandler(done, name="stages"):
            tasks["prepare"] = c.prepare(params=params("prepare"), **ws)
            tasks["shard"] = c.shard(params=params("shard"),
                                     prepared=tasks["prepare"].outputs["dataset"], **ws)
            tasks["train"] = c.train(params=params("train"),
                                     shards=tasks["shard"].outputs["shards"], **common)
            tasks["evaluate"] = c.evaluate(params=params("evaluate"),
                                           shards=tasks["shard"].outputs["shards"],
                                           model=tasks["train"].outputs["model"], **common)
        for step, task in tasks.items():
            _configure(task, step, local=local, claim=v["launch_volume_claim"],
                       image=image)

    cnn_training.__signature__ = sig
    cnn_training.__doc__ = DESCRIPTION
    return dsl.pipeline(name=NAME, description=DESCRIPTION)(cnn_training)


def __getattr__(name: str) -> Any:
    """`cnn_training`, the cluster pipeline, built on first use (building it costs ~0.5 s,
    which `cnnflow pipeline run` does not need)."""
    if name == "cnn_training":
        globals()[name] = pipeline = build_pipeline()
        return pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
