"""The trained model as an MLflow model, its registered versions and the promotion gate.

    info = log_model("outputs/train", run_id=run_id, tracking_uri=uri)   # from train
    version = register(info.model_uri, "cnnflow-digits", metrics=test)   # -> @challenger
    decision = promote("cnnflow-digits", margin=0.002)                   # maybe @champion

Format (a deliberate choice, see DESIGN.md): the logged model is `PixelClassifier` =
normalisation + network + softmax, exported with `serialization_format="pt2"`
(`torch.export`). It is pickle-free, needs no cnnflow code to load, and both
`mlflow.pyfunc.load_model` and `mlflow.pytorch.load_model` load it. Its input is raw
pixel values in [0, 255] as float32 (N, C, H, W); its output is (N, classes) class
probabilities. `mlflow.pytorch.load_model` returns the exported graph module: it predicts,
but cannot `.train()`; to fine-tune, rebuild from `model.json` + `model.pt` instead.
`model.json` is also the MLflow model's `metadata`, so a `models:/` URI carries the
classes, dataset version and normalisation with it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnflow.errors import CnnflowError
from cnnflow.models import model_from_config_dict
from cnnflow.tracking.lineage import DATASET_TAG

log = logging.getLogger("cnnflow")

MODEL_NAME = "model"  # the logged model's name inside its run
CHALLENGER, CHAMPION = "challenger", "champion"
ACCURACY_TAG = "test.accuracy"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# The train run's tags a registered version carries: code, data, runner, scale, image
LINEAGE_TAGS = ("cnnflow.git_commit", "cnnflow.git_dirty", "cnnflow.runner",
                "cnnflow.world_size", "cnnflow.shards_sha256", "cnnflow.image",
                "cnnflow.kfp_run_id", "cnnflow.dvc.lock_hash", "mlflow.source.git.commit")


class PixelClassifier(nn.Module):
    """Raw pixels in, probabilities out: the whole prediction path in one exportable module.

    Normalising inside the logged model means a client (curl, pyfunc) sends pixels as they
    are and can never apply other statistics than those the network was trained with.
    The arithmetic is `normalize_batch`'s, op for op, so predictions match training's.
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(torch.float32).div(255.0).sub(self.mean).div(self.std)
        return torch.softmax(self.model(x), dim=1)


def read_model_meta(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "model.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CnnflowError(f"{path}: not found; expected a train output dir "
                           "(model.pt + model.json) or a models:/ URI") from None
    except ValueError as exc:
        raise CnnflowError(f"{path}: not valid JSON ({exc})") from None


def load_model_dir(model_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The network (eval mode, CPU) and model.json of a train output directory."""
    meta = read_model_meta(model_dir)
    model = model_from_config_dict(meta["model"])
    state = torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval(), meta


def packaged(model: nn.Module, meta: dict[str, Any]) -> PixelClassifier:
    norm = meta["normalize"]
    return PixelClassifier(model, norm["mean"], norm["std"]).eval()


def model_signature(meta: dict[str, Any]):
    """float32 (-1, C, H, W) pixels -> float32 (-1, classes) probabilities."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    h, w, c = meta["image_shape"]
    n = len(meta["classes"])
    return ModelSignature(
        # unnamed: a named tensor makes the serving input a dict, which the pytorch
        # pyfunc refuses; unnamed, `{"inputs": [[[[...]]]]}` is the batch itself
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, w))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n))]),
    )


def input_example(meta: dict[str, Any]) -> np.ndarray:
    """Two mid-grey images: batch 2, because torch.export fixes a size-1 batch dim."""
    h, w, c = meta["image_shape"]
    return np.full((2, c, h, w), 128.0, dtype=np.float32)


def pip_requirements() -> list[str]:
    import mlflow

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}"]


def log_model(model_dir: str | Path, *, run_id: str, tracking_uri: str,
              name: str = MODEL_NAME):
    """Log model_dir's model into run `run_id` (pt2, signature, example); return ModelInfo.

    pip requirements are given, not inferred: inference re-imports the model in a
    subprocess, which costs ~10 s per log for a list we already know.
    """
    import mlflow

    from cnnflow.tracking.mlflow_tracker import fluent_target

    model, meta = load_model_dir(model_dir)
    with fluent_target(tracking_uri, run_id=run_id):
        return mlflow.pytorch.log_model(
            packaged(model, meta), name=name, signature=model_signature(meta),
            input_example=input_example(meta), serialization_format="pt2",
            pip_requirements=pip_requirements(), metadata=meta, run_id=run_id,
        )


# ---------------------------------------------------------------------------- registry


def validate_model_name(name: str) -> str:
    """MLflow's rules (non-empty, no '/' or ':', path-normal) plus no '@', which would
    make `models:/<name>@<alias>` ambiguous."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise CnnflowError(f"model name {name!r}: {exc.message.splitlines()[0]}") from None
    if "@" in name or name != name.strip():
        raise CnnflowError(f"model name {name!r}: must not contain '@' or surrounding spaces")
    return name


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    from cnnflow.tracking.mlflow_tracker import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _one_line(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def get_version(client, name: str, version: str | int | None = None, alias: str | None = None):
    """A ModelVersion by number or alias, or a one-line CnnflowError naming what is missing."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        raise CnnflowError(f"registered model {name!r} does not exist") from None
    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        what = f"version {version}" if version is not None else f"alias @{alias}"
        raise CnnflowError(f"registered model {name!r} has no {what}") from None


def set_alias(client, name: str, alias: str, version: str | int) -> None:
    get_version(client, name, version=version)  # a clear error for a missing version
    client.set_registered_model_alias(name, alias, str(version))


def resolve_model_uri(ref: str) -> str:
    """A run id -> `runs:/<id>/model`; `models:/` and `runs:/` URIs pass through."""
    if _RUN_ID.match(ref):
        return f"runs:/{ref}/{MODEL_NAME}"
    if ref.startswith(("models:/", "runs:/")):
        return ref
    raise CnnflowError(f"{ref!r}: expected a 32-hex MLflow run id, runs:/ or models:/ URI")


def model_info(uri: str):
    """get_model_info with a one-line error for a URI that names nothing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.models.get_model_info(uri)
    except (MlflowException, OSError) as exc:
        raise CnnflowError(f"{uri}: no such model ({_one_line(exc)})") from None


def load_model_uri(uri: str, tracking_uri: str | None = None) -> tuple[nn.Module, dict]:
    """(exported PixelClassifier graph, model.json metadata) of a `models:/` or `runs:/` URI."""
    from cnnflow.tracking.mlflow_tracker import fluent_target

    client, resolved = _client(tracking_uri)
    with fluent_target(resolved):
        alias_or_version = _parse_registry_uri(uri)
        if alias_or_version:
            name, version, alias = alias_or_version
            get_version(client, name, version=version, alias=alias)
        meta = model_info(uri).metadata or {}
        return _load_pickle_free(uri), meta


def _load_pickle_free(uri: str) -> nn.Module:
    """mlflow.pytorch.load_model with MLflow's MLFLOW_ALLOW_PICKLE_DESERIALIZATION off for
    the call: a pt2 archive is checked to be pickle-free and a pickled model (anyone with
    write access to the artifacts could have put one there) is refused before it loads."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    saved = os.environ.get(name)
    os.environ[name] = "false"
    try:
        return mlflow.pytorch.load_model(uri)
    except MlflowException as exc:
        if "pickle" not in exc.message:
            raise
        raise CnnflowError(f"{uri}: refused: the model is stored as a pickle, which can run "
                           "code when loaded; cnnflow logs and loads pt2 (torch.export) "
                           "models only") from None
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _parse_registry_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """models:/name/3 -> (name, "3", None); models:/name@champion -> (name, None, alias)."""
    if not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, None, alias
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, version, None
    return None  # models:/<model_id>: a logged model, not a registry entry


def register(run_id_or_model_uri: str, name: str, *, metrics: dict[str, float] | None = None,
             tags: dict[str, str] | None = None, alias: str = CHALLENGER,
             tracking_uri: str | None = None) -> dict[str, Any]:
    """Register the model as a new version of `name`, tag it, point `alias` at it.

    Version tags: the dataset version (from the model's metadata), the git commit of the
    run that logged it, and `test.<metric>` for each test metric (what `promote` compares).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from cnnflow.tracking.mlflow_tracker import fluent_target

    validate_model_name(name)
    uri = resolve_model_uri(run_id_or_model_uri)
    client, resolved = _client(tracking_uri)
    with fluent_target(resolved):
        info = model_info(uri)
        meta = info.metadata or {}
        version_tags = {DATASET_TAG: str(meta.get("dataset_version", ""))}
        if info.run_id:
            run_tags = client.get_run(info.run_id).data.tags
            for key, value in run_tags.items():
                if key in LINEAGE_TAGS or key.startswith("cnnflow.parallel."):
                    version_tags[key] = value
            version_tags["cnnflow.train_run_id"] = info.run_id
        for key, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                version_tags[f"test.{key}"] = repr(float(value))  # evaluate()'s scalars
        version_tags.update(tags or {})
        source = info.model_uri if info.model_uri.startswith("models:/") else uri
        try:
            mv = mlflow.register_model(source, name, tags=version_tags,
                                       await_registration_for=0)
        except MlflowException as exc:
            raise CnnflowError(f"register {uri} as {name!r}: {_one_line(exc)}") from None
    set_alias(client, name, alias, mv.version)
    log.info("registered %s as %s version %s (@%s)", uri, name, mv.version, alias)
    return {"name": name, "version": str(mv.version), "alias": alias, "model_uri": source,
            "run_id": info.run_id, "model_id": getattr(info, "model_id", None),
            "tags": version_tags}


def _accuracy(mv, label: str) -> float:
    try:
        return float(mv.tags[ACCURACY_TAG])
    except (KeyError, ValueError):
        raise CnnflowError(
            f"{label} version {mv.version} has no {ACCURACY_TAG} tag; register it with the "
            "test metrics of `cnnflow evaluate`"
        ) from None


def promote(name: str, version: str | int | None = None, *, margin: float = 0.0,
            promote_across_datasets: bool = False, run_id: str | None = None,
            tracking_uri: str | None = None, echo: bool = True) -> dict[str, Any]:
    """Move @champion to the challenger (`version`, default @challenger) when it wins.

    Rules: no champion -> promote. Same dataset version -> promote only if the challenger's
    test accuracy exceeds the champion's by strictly more than `margin` (absolute, e.g.
    0.002 = 0.2 points). Different dataset version -> the figures are not comparable:
    keep the champion, unless `promote_across_datasets`, which promotes the challenger as
    the first model on the new data. The decision, the reason and both accuracies are
    returned, set as tags on the challenger version (and on run `run_id`), and printed.
    """
    validate_model_name(name)
    client, _ = _client(tracking_uri)
    challenger = get_version(client, name, version=version,
                             alias=None if version is not None else CHALLENGER)
    acc = _accuracy(challenger, "challenger")
    data = challenger.tags.get(DATASET_TAG, "")
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # noqa: BLE001 - MLflow raises for a missing alias; none is the answer
        champion = None
    result: dict[str, Any] = {
        "name": name, "challenger_version": str(challenger.version),
        "challenger_accuracy": acc, "dataset_version": data, "margin": margin,
        "champion_version": None, "champion_accuracy": None, "champion_dataset_version": None,
    }
    if champion is None:
        decision, reason = "promoted", "no champion yet"
    else:
        champ_acc = _accuracy(champion, "champion")
        champ_data = champion.tags.get(DATASET_TAG, "")
        result.update(champion_version=str(champion.version), champion_accuracy=champ_acc,
                      champion_dataset_version=champ_data)
        if str(champion.version) == str(challenger.version):
            decision, reason = "kept", "the challenger already is the champion"
        elif champ_data != data:
            decision = "promoted" if promote_across_datasets else "kept"
            reason = (f"dataset version differs ({champ_data[:12]} -> {data[:12]}); "
                      f"promote_across_datasets={promote_across_datasets}")
        elif acc - champ_acc > margin:
            decision, reason = "promoted", f"beats the champion by {acc - champ_acc:+.4f}"
        else:
            decision = "kept"
            reason = f"{acc - champ_acc:+.4f} vs champion is not more than margin {margin}"
    result.update(decision=decision, reason=reason)
    if decision == "promoted":
        client.set_registered_model_alias(name, CHAMPION, str(challenger.version))
    tags = {"cnnflow.promotion.decision": decision, "cnnflow.promotion.reason": reason,
            "cnnflow.promotion.champion_version": str(result["champion_version"]),
            "cnnflow.promotion.champion_accuracy": str(result["champion_accuracy"]),
            "cnnflow.promotion.challenger_accuracy": str(acc)}
    for key, value in tags.items():
        client.set_model_version_tag(name, str(challenger.version), key, value)
        if run_id:
            client.set_tag(run_id, key, value)
    against = ("no champion" if champion is None else
               f"champion v{champion.version} accuracy {result['champion_accuracy']:.4f}")
    line = (f"{name}: challenger v{challenger.version} accuracy {acc:.4f}, {against}: "
            f"{decision} ({reason})")
    log.info(line)
    if echo:
        print(line)
    return result
