"""The `cnnflow` command line: a thin shell over the stage functions.

    cnnflow prepare                      # params.yaml's prepare section
    cnnflow prepare --set prepare.seed=3 --set prepare.source=synthetic
    cnnflow shard && cnnflow verify

Every command reads `--params` (default params.yaml; the built-in defaults when the file
does not exist and `--params` was not given) and applies `--set section.key=value`
overrides. A user mistake prints one line `cnnflow: error: ...` and exits 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cnnflow.config import Params, load_params
from cnnflow.errors import CnnflowError
from cnnflow.progress import setup_logging as _setup_logging

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Versioned data -> shards -> distributed training -> evaluation -> registry.",
)
log = logging.getLogger("cnnflow")


def _version(value: bool) -> None:
    if value:
        from cnnflow import __version__

        typer.echo(f"cnnflow {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")]
          = False) -> None:
    """Versioned data -> shards -> distributed training -> evaluation -> registry."""

ParamsOpt = Annotated[
    Path | None,
    typer.Option("--params", "-p", help="params.yaml to read (default: ./params.yaml)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a key: --set prepare.seed=3 (repeatable)."),
]


def _params(path: Path | None, overrides: list[str] | None) -> Params:
    if path is None:
        default = Path("params.yaml")
        path = default if default.is_file() else None
    return load_params(path, overrides or [])


@app.command()
def prepare(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Read the configured source, split it and write the versioned data set."""
    from cnnflow.stages import run_prepare

    p = _params(params, set_)
    cfg = p.prepare
    meta = run_prepare(p)
    counts = ", ".join(f"{s} {meta['splits'][s]['count']}" for s in ("train", "val", "test"))
    version = meta["version"][:12]
    typer.echo(f"prepared {meta['source']} -> {cfg.out_dir} (version {version}; {counts})")


@app.command()
def raw(
    out_dir: Annotated[Path, typer.Argument(help="Where to write the IDX files.")] = Path(
        "data/raw/digits"
    ),
) -> None:
    """Materialise the embedded digits as raw IDX files (the pipeline's versioned input)."""
    from cnnflow.data.raw import export_digits

    for path in export_digits(out_dir):
        typer.echo(f"wrote {path}")


@app.command()
def shard(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Write WebDataset tar shards of the prepared data set with a checksummed manifest."""
    from cnnflow.stages import run_shard

    p = _params(params, set_)
    manifest = run_shard(p)
    shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    typer.echo(
        f"sharded {manifest['dataset_version'][:12]} -> {p.shard.out_dir} ({shards} shards)"
    )


@app.command()
def verify(
    shards: Annotated[
        str | None, typer.Argument(help="Shard dir, file:// or s3:// URI (default: shard.out_dir).")
    ] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Check every shard's size, sample count and sha256 against manifest.json."""
    from cnnflow.data.manifest import verify_shards

    target = shards or _params(params, set_).shard.out_dir
    manifest = verify_shards(target)
    summary = {s: v["samples"] for s, v in manifest["splits"].items()}
    version = manifest["dataset_version"][:12]
    typer.echo(f"verified {target}: dataset {version}, samples {json.dumps(summary)}")


@app.command()
def train(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Train the configured model on the shards (one process, torchrun or a PyTorchJob)."""
    from cnnflow.stages import run_train

    p = _params(params, set_)
    summary = run_train(p)
    if summary["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        last = summary["history"][-1] if summary["history"] else {}
        typer.echo(
            f"trained {summary['steps']} steps -> {p.train.out_dir}/model.pt"
            + (f" (val accuracy {last['val_accuracy']:.4f})" if last else "")
        )


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(
        "--model", help="Train output dir or models:/name@alias (default: evaluate.model, "
                        "else train.out_dir).")] = "",
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Score the test split, write reports/, register @challenger, run the promotion gate."""
    from cnnflow.stages import run_evaluate

    p = _params(params, set_)
    result = run_evaluate(p, model)
    m = result["metrics"]
    typer.echo(f"test accuracy {m['accuracy']:.4f} (macro F1 {m['macro_f1']:.4f}, "
               f"ECE {m['ece']:.4f}) -> {p.evaluate.out_dir}/metrics.json")
    if "registered" in result:
        r = result["registered"]
        typer.echo(f"registered {r['name']} version {r['version']} as @{r['alias']}")


@app.command()
def register(
    model: Annotated[str, typer.Argument(help="A run id, runs:/<id>/model or models:/ URI.")],
    name: Annotated[str, typer.Option("--name", help="Default: tracking.model_name.")] = "",
    metrics: Annotated[Path | None, typer.Option(
        "--metrics", help="metrics.json of `cnnflow evaluate` (tags the version).")] = None,
    alias: Annotated[str, typer.Option("--alias")] = "challenger",
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Register a logged model as a new version (tagged with its test metrics)."""
    from cnnflow.tracking import registry

    p = _params(params, set_)
    values = {}
    if metrics is not None:
        from cnnflow.evaluate import read_metrics_file

        values = read_metrics_file(metrics)
    r = registry.register(model, name or p.tracking.model_name, metrics=values, alias=alias,
                          tracking_uri=p.tracking.uri or None)
    typer.echo(f"registered {r['name']} version {r['version']} as @{r['alias']}")


@app.command()
def promote(
    name: Annotated[str, typer.Option("--name", help="Default: tracking.model_name.")] = "",
    version: Annotated[str, typer.Option(
        "--version", help="Default: the version @challenger points at.")] = "",
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Move @champion to the challenger when it beats the champion (evaluate.margin)."""
    from cnnflow.tracking import registry

    p = _params(params, set_)
    registry.promote(name or p.tracking.model_name, version or None,
                     margin=p.evaluate.margin,
                     promote_across_datasets=p.evaluate.promote_across_datasets,
                     tracking_uri=p.tracking.uri or None)


@app.command()
def lineage(
    model: Annotated[str, typer.Argument(help="models:/<name>@<alias> or models:/<name>/<n>.")],
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Where a registered version came from: code, data, runner, scale, runs, and the
    command that reruns it."""
    from cnnflow.tracking.provenance import lineage_lines, model_lineage

    p = _params(params, set_)
    for line in lineage_lines(model_lineage(model, p.tracking.uri or None)):
        typer.echo(line)


tracking_app = typer.Typer(help="MLflow tracking utilities.", no_args_is_help=True)
app.add_typer(tracking_app, name="tracking")


@tracking_app.command("sync")
def tracking_sync(
    spool: Annotated[Path, typer.Argument(help="A spool dir written while MLflow was down.")],
    uri: Annotated[str, typer.Option(
        "--tracking-uri", "--uri", help="Where to upload (default: $MLFLOW_TRACKING_URI).")] = "",
    to_recorded_uri: Annotated[bool, typer.Option(
        "--to-recorded-uri", help="Upload to the URI the spool's meta.json recorded instead "
                                  "(only for a spool you trust).")] = False,
) -> None:
    """Upload what a run kept locally while the tracking server was unreachable. Every file
    the spool names must lie inside it; a spool that names any other is refused whole."""
    from cnnflow.tracking.sync import DONE, sync

    run_id = sync(spool, uri or None, to_recorded_uri=to_recorded_uri)
    done = json.loads((spool / DONE).read_text())
    typer.echo(f"synced {spool} into run {run_id} at {done['tracking_uri']} (the spool "
               f"recorded {done['recorded_tracking_uri'] or 'no URI'})")


@app.command("mlflow-server")
def mlflow_server(
    store: Annotated[str, typer.Option(
        "--store", help="The backend store: a sqlite file (the local default) or "
                        "postgresql://USER@HOST:PORT/DB (password from PGPASSWORD or the "
                        "URI).")] = "mlflow/mlflow.db",
    artifacts: Annotated[str, typer.Option(
        "--artifacts", help="Where the server puts artifacts: a directory, or "
                            "s3://BUCKET/PREFIX (endpoint from MLFLOW_S3_ENDPOINT_URL, "
                            "credentials as boto3 finds them).")] = "mlflow/artifacts",
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 5000,
    allowed_hosts: Annotated[str, typer.Option(
        "--allowed-hosts", help="Comma-separated Host headers to accept, with the port "
                                "(mlflow.cnnflow.svc:5000, or :*), instead of MLflow's "
                                "default (localhost and private IPs).")] = "",
    workers: Annotated[int, typer.Option(
        "--workers", help="Worker processes (> 1 needs PostgreSQL).")] = 1,
    auth: Annotated[str, typer.Option(
        "--auth", help="Require a login: MLflow's basic-auth app with this config "
                       "(basic_auth.ini; admin from MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD "
                       "on first start).")] = "",
) -> None:
    """Run a real MLflow server on the local store (Ctrl-C stops it)."""
    from cnnflow.tracking.server import run_server

    run_server(store, artifacts, host=host, port=port, allowed_hosts=allowed_hosts or None,
               workers=workers, auth_config=auth or None)


@app.command()
def launch(
    job: Annotated[str, typer.Argument(
        help="A PyTorchJob or TrainJob YAML file; or `render` (print the train step's job, "
             "launch.kind) or `train` "
             "(render it and run it with launch.backend).")],
    local: Annotated[bool, typer.Option(
        "--local", help="Run the YAML file's job as local processes.")] = False,
    mount: Annotated[list[str] | None, typer.Option(
        "--mount", help="mountPath=DIR for the local backend (repeatable).")] = None,
    kubeconfig: Annotated[Path | None, typer.Option("--kubeconfig")] = None,
    run_id: Annotated[str, typer.Option("--run-id", help="Makes the job name unique.")] = "",
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run training as a Kubeflow PyTorchJob or TrainJob: on a cluster, or as local
    processes."""
    from cnnflow.launch.commands import launch_command

    typer.echo(launch_command(job, _params(params, set_), local=local, mounts=mount or [],
                              kubeconfig=str(kubeconfig) if kubeconfig else None,
                              run_id=run_id), nl=False)


ImageOpt = Annotated[str, typer.Option(
    "--image", help="Image of every step and of the training job (launch.image), with a tag "
                    "or digest; default: the local tag cnnflow:0.1.0 (compile) or "
                    "launch.image (submit).")]

pipeline_app = typer.Typer(
    help="The Kubeflow pipeline: compile it, run it with kfp.local, submit it to a cluster.",
    no_args_is_help=True,
)
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("compile")
def pipeline_compile(
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="YAML to write (the committed copy is the default).")] = Path(
        "pipelines/compiled/cnn_training.yaml"),
    image: ImageOpt = "",
) -> None:
    """Compile the training pipeline (commit pipelines/compiled/cnn_training.yaml)."""
    from cnnflow.pipeline import compile_pipeline

    typer.echo(f"compiled the pipeline -> {compile_pipeline(out, image=image)}")


@pipeline_app.command("run")
def pipeline_run(
    workspace: Annotated[Path, typer.Option(
        "--workspace", help="Directory the stages run in: the PVC of a cluster run.")] = Path("."),
    cache: Annotated[bool, typer.Option(
        "--cache/--no-cache", help="kfp.local caching of prepare and shard.")] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Show kfp.local's whole log live (it always goes to a file "
                                "under outputs/kfp/).")] = False,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the whole pipeline with kfp.local, each step in a fresh process; training runs
    with launch.backend."""
    from cnnflow.pipeline import run_local, summary_lines

    p = _params(params, set_)
    r = run_local(p, workspace=workspace, cache=cache, verbose=verbose)
    for line in summary_lines(r, p):
        typer.echo(line)


@pipeline_app.command("submit")
def pipeline_submit(
    host: Annotated[str, typer.Option("--host", help="KFP API endpoint, e.g. "
                                                     "http://localhost:8080.")],
    experiment: Annotated[str, typer.Option("--experiment")] = "cnnflow",
    run_name: Annotated[str, typer.Option("--run-name", help="Default: a timestamp.")] = "",
    namespace: Annotated[str, typer.Option(
        "--namespace", help="KFP namespace (multi-user installs).")] = "",
    service_account: Annotated[str, typer.Option(
        "--service-account", help="Service account the steps run as (default: KFP's); the "
                                  "train step needs the cnnflow-launcher Role's rights.")] = "",
    image: ImageOpt = "",
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Start a run on a KFP endpoint and print its URL (launch.backend=kubernetes unless
    --set says otherwise)."""
    from cnnflow.pipeline import submit

    p = _params(params, ["launch.backend=kubernetes", *(set_ or [])])
    typer.echo(submit(p, host=host, experiment=experiment, run_name=run_name,
                      namespace=namespace or None, service_account=service_account or None,
                      image=image))


def main_train() -> None:
    """`python -m cnnflow.train [--params F] [--set k=v]`: the launchers' entrypoint."""
    sys.argv = [sys.argv[0], "train", *sys.argv[1:]]
    main()


def main() -> None:
    """Console-script entry: user mistakes become one line on stderr and exit code 2."""
    _setup_logging()
    try:
        app()
    except CnnflowError as exc:
        print(f"cnnflow: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("cnnflow: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # a full disk or an I/O error no stage named: still one line
        from cnnflow.fileio import storage_error_line

        line = storage_error_line(exc)
        if line is None:
            raise
        print(f"cnnflow: error: {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
