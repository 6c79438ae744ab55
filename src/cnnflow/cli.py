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

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Versioned data -> shards -> distributed training -> evaluation -> registry.",
)
log = logging.getLogger("cnnflow")

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


def _setup_logging() -> None:
    level = os.environ.get("CNNFLOW_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def prepare(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Read the configured source, split it and write the versioned data set."""
    from cnnflow.data.prepare import prepare as run_prepare

    cfg = _params(params, set_).prepare
    meta = run_prepare(cfg)
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
    from cnnflow.data.shards import write_shards

    p = _params(params, set_)
    manifest = write_shards(
        p.prepare.out_dir,
        p.shard.out_dir,
        samples_per_shard=p.shard.samples_per_shard,
        workers=p.shard.workers,
    )
    shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    typer.echo(
        f"sharded {manifest['dataset_version'][:12]} -> {p.shard.out_dir} ({shards} shards)"
    )


@app.command()
def verify(
    shards: Annotated[
        str | None, typer.Argument(help="Shard directory or file:// URI (default: shard.out_dir).")
    ] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Check every shard's size, sample count and sha256 against manifest.json."""
    from cnnflow.data.shards import verify_shards

    target = shards or _params(params, set_).shard.out_dir
    manifest = verify_shards(target)
    summary = {s: v["samples"] for s, v in manifest["splits"].items()}
    version = manifest["dataset_version"][:12]
    typer.echo(f"verified {target}: dataset {version}, samples {json.dumps(summary)}")


@app.command()
def train(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Train the configured model on the shards (one process, torchrun or a PyTorchJob)."""
    from cnnflow.train.trainer import train as run_train

    p = _params(params, set_)
    summary = run_train(p)
    if summary["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        last = summary["history"][-1] if summary["history"] else {}
        typer.echo(
            f"trained {summary['steps']} steps -> {p.train.out_dir}/model.pt"
            + (f" (val accuracy {last['val_accuracy']:.4f})" if last else "")
        )


@app.command()
def launch(
    job: Annotated[str, typer.Argument(
        help="A PyTorchJob YAML file; or `render` (print the train step's job) or `train` "
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
    """Run training as a Kubeflow PyTorchJob: on a cluster, or as local processes."""
    import yaml

    from cnnflow.config import to_dict
    from cnnflow.launch import launch_training, local_mounts

    p = _params(params, set_)
    text = yaml.safe_dump(to_dict(p), sort_keys=False)
    parent = os.environ.get("CNNFLOW_PARENT_RUN_ID", "")
    mounts = dict(m.split("=", 1) for m in mount) if mount else local_mounts(p.launch)
    if job == "render":
        from cnnflow.launch.pytorchjob import render_job

        rendered = render_job(p.launch, run_id=run_id, params_yaml=text, parent_run_id=parent)
        typer.echo(rendered.to_yaml(), nl=False)
    elif job == "train":
        api = None
        if p.launch.backend == "kubernetes":
            from cnnflow.launch.kubernetes import api_client

            api = api_client(str(kubeconfig) if kubeconfig else None)
        result = launch_training(p.launch, params_yaml=text, run_id=run_id,
                                 parent_run_id=parent, api=api, mounts=mounts)
        typer.echo(f"PyTorchJob {result.name} succeeded -> {result.out_dir}")
    elif local:
        from cnnflow.launch.local import run_local

        raise typer.Exit(run_local(job, mounts=mounts))
    else:
        from cnnflow.launch.kubernetes import api_client, launch_job
        from cnnflow.launch.validate import load_documents

        api = api_client(str(kubeconfig) if kubeconfig else None)
        outcome = launch_job(load_documents(job), api=api, keep=p.launch.keep_job)
        typer.echo(f"PyTorchJob {outcome.namespace}/{outcome.name} succeeded")


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


if __name__ == "__main__":
    main()
