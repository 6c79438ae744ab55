"""One KFP component per stage: thin shells that call one `cnnflow.kfp.steps` function.

Only the stdlib and kfp are imported here; each body imports cnnflow (installed in the
base image, and in the environment kfp.local's SubprocessRunner uses). `params` is the
encoded parameter string (`cnnflow.kfp.params.encode`), `workspace` the directory the
stages run in (the PVC's mount path in the cluster). The KFP run id, which ties every
step's MLflow run to the pipeline's parent run, comes in $KFP_RUN_ID
(`dsl.PIPELINE_JOB_ID_PLACEHOLDER`) and, for the uncached steps, also as the input
`kfp_run_id` (placeholders in inputs are resolved by every KFP backend >= 2.4; kfp.local
resolves inputs but not environment values). prepare and shard take no run-specific input:
it would give every run a new cache key, and caching them is the point. The runner (`kfp`
or `kfp-local`) comes in $CNNFLOW_RUNNER, a constant the pipeline sets per runner.

    prepare.python_func(params="prepare.seed=0", workspace=".",
                        dataset=dsl.Dataset(uri="/tmp/ds"))
"""

# No `from __future__ import annotations`: kfp reads the annotations as types.
import functools

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

BASE_IMAGE = "cnnflow:0.1.0"
"""The project image (= launch.image's default; a test keeps them equal)."""

component = functools.partial(dsl.component, base_image=BASE_IMAGE, install_kfp_package=False)


@component
def prepare(params: str, workspace: str, dataset: Output[Dataset]):
    """Read the source, split it, write the versioned data set under the workspace."""
    from cnnflow.kfp.steps import prepare_step

    prepare_step(params, workspace=workspace, dataset=dataset)


@component
def shard(params: str, workspace: str, prepared: Input[Dataset], shards: Output[Dataset]):
    """Write checksummed WebDataset shards of the prepared data set."""
    from cnnflow.kfp.steps import shard_step

    shard_step(params, workspace=workspace, prepared=prepared, shards=shards)


@component
def train(params: str, workspace: str, kfp_run_id: str,
          shards: Input[Dataset], model: Output[Model]):
    """Run distributed training as a PyTorchJob (launch.backend: kubernetes or local)."""
    from cnnflow.kfp.steps import train_step

    train_step(params, workspace=workspace, kfp_run_id=kfp_run_id,
               shards=shards, model=model)


@component
def evaluate(params: str, workspace: str, kfp_run_id: str,
             shards: Input[Dataset], model: Input[Model], metrics: Output[Metrics],
             report: Output[Markdown]) -> str:
    """Score the test split, register @challenger, run the promotion gate: the decision."""
    from cnnflow.kfp.steps import evaluate_step

    return evaluate_step(params, workspace=workspace, kfp_run_id=kfp_run_id,
                         shards=shards, model=model, metrics=metrics, report=report)


@component
def finish(params: str, workspace: str, kfp_run_id: str,
           status: dsl.PipelineTaskFinalStatus) -> str:
    """Exit handler: close the pipeline's MLflow parent run FINISHED or FAILED."""
    from cnnflow.kfp.steps import finish_step

    return finish_step(params, workspace=workspace, kfp_run_id=kfp_run_id,
                       state=status.state, error=status.error_message or "")
