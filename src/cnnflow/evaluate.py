"""Score a trained model on the test split: metrics, plots, and the DVC metric file.

    cnnflow evaluate                                   # outputs/train on data/shards
    cnnflow evaluate --model models:/cnnflow-digits@champion

    result = evaluate("outputs/train", "data/shards", "reports", tracker=tracker)

Writes (DVC reads `metrics.json` as a metric and the CSVs as plots):

    reports/metrics.json                  test.accuracy, test.top_k_accuracy, test.macro_f1,
                                          test.weighted_f1, test.ece, test.n, test.k
    reports/evaluation.json               the model and the dataset versions it was scored on
    reports/per_class.json                precision, recall, F1, support per class
    reports/plots/confusion_matrix.png    counts, rows = actual class
    reports/plots/confusion_matrix.json   {"classes": [...], "matrix": [[...]]}
    reports/plots/confusion.csv           actual,predicted per test sample (DVC confusion)
    reports/plots/calibration.csv         bin,confidence,accuracy,count (15 bins)
    reports/plots/reliability.png         reliability diagram with the ECE
    reports/plots/misclassified.png       a grid of wrong predictions, true -> predicted
    reports/plots/training.csv, training_curves.png   loss and accuracy per epoch (stages)

The model comes from a train output dir (model.pt + model.json) or an MLflow URI
(`models:/name@alias`, `models:/name/3`, `runs:/<id>/model`); both are scored through
the same prediction path (pixels in [0, 255] -> probabilities, see cnnflow.tracking.registry), so
a registered model scores exactly as the directory it was logged from.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnflow.errors import CnnflowError
from cnnflow.fileio import write_json as _write_json
from cnnflow.tracking.lineage import DATASET_TAG

log = logging.getLogger("cnnflow")

ECE_BINS = 15  # Guo et al. 2017 use 15 equal-width confidence bins
Predict = Callable[[torch.Tensor], np.ndarray]  # uint8 (N, C, H, W) -> (N, K) probabilities


def load_predictor(model: str | Path, tracking_uri: str | None = None
                   ) -> tuple[Predict, dict[str, Any]]:
    """(predict function, model.json metadata) for a train output dir or an MLflow URI."""
    from cnnflow.tracking import registry

    text = str(model)
    if text.startswith(("models:/", "runs:/")):
        net, meta = registry.load_model_uri(text, tracking_uri)
    else:
        raw, meta = registry.load_model_dir(model)
        net = registry.packaged(raw, meta)

    def predict(images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return net(images.to(torch.float32)).detach().cpu().numpy()

    return predict, meta


def _check_compatible(meta: dict[str, Any], manifest: dict[str, Any], model: str) -> None:
    if list(meta.get("image_shape", [])) != list(manifest["image_shape"]) or list(
            meta.get("classes", [])) != list(manifest["classes"]):
        raise CnnflowError(
            f"{model}: trained for images {meta.get('image_shape')} and classes "
            f"{meta.get('classes')}, but the shards hold {manifest['image_shape']} and "
            f"{manifest['classes']}"
        )
    if meta.get("dataset_version") != manifest["dataset_version"]:
        log.warning("%s was trained on dataset %s but is scored on %s", model,
                    str(meta.get("dataset_version"))[:12], manifest["dataset_version"][:12])


def score(predict: Predict, shards: str | Path, *, batch_size: int = 256, keep_wrong: int = 36
          ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, int, int, float]]]:
    """(probabilities (N, K), labels (N,), up to `keep_wrong` misclassified examples as
    (CHW uint8 image, true, predicted, confidence)) over the whole test split, in order."""
    from cnnflow.data.loader import build_loader

    loader = build_loader(shards, "test", batch_size=batch_size, shuffle=False,
                          drop_last=False)
    probs, labels, wrong = [], [], []
    for images, y in loader:
        p = predict(images)
        probs.append(p)
        labels.append(y.numpy())
        pred = p.argmax(1)
        for i in np.flatnonzero(pred != y.numpy())[: max(0, keep_wrong - len(wrong))]:
            wrong.append((images[i].numpy(), int(y[i]), int(pred[i]), float(p[i].max())))
    return np.concatenate(probs), np.concatenate(labels), wrong


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
                ) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error and per-bin rows; bin b holds confidences in
    (b/bins, (b+1)/bins] (the first bin also holds 0)."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else 0.0
        mean_conf = float(conf[mask].mean()) if count else 0.0
        ece += count / max(1, len(labels)) * abs(acc - mean_conf)
        rows.append({"bin": b, "lower": float(edges[b]), "upper": float(edges[b + 1]),
                     "confidence": mean_conf, "accuracy": acc, "count": count})
    return float(ece), rows


def compute_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str], top_k: int = 3
                    ) -> dict[str, Any]:
    """Accuracy, top-k, per-class P/R/F1, macro/weighted F1, confusion matrix, ECE."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    k = min(top_k, len(classes))
    pred = probs.argmax(1)
    ids = list(range(len(classes)))
    topk = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=ids, zero_division=0)
    _, _, macro, _ = precision_recall_fscore_support(labels, pred, labels=ids,
                                                     average="macro", zero_division=0)
    _, _, weighted, _ = precision_recall_fscore_support(labels, pred, labels=ids,
                                                        average="weighted", zero_division=0)
    ece, bins = calibration(probs, labels)
    return {
        "accuracy": float((pred == labels).mean()),
        "top_k_accuracy": float((topk == labels[:, None]).any(1).mean()),
        "k": k, "macro_f1": float(macro), "weighted_f1": float(weighted), "ece": ece,
        "n": len(labels),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]),
                          "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(labels, pred, labels=ids).tolist(),
        "calibration": bins,
    }


# ---------------------------------------------------------------------------- files
SCALARS = ("accuracy", "top_k_accuracy", "macro_f1", "weighted_f1", "ece", "n", "k")
PROVENANCE = ("dataset_version", "model_dataset_version", "model")


def metrics_file(metrics: dict[str, Any]) -> dict[str, float | int]:
    """metrics.json, the DVC metric: numbers only, flat `test.<name>` keys (what every
    `dvc exp show` column and `dvc metrics diff` row is named)."""
    return {f"test.{k}": metrics[k] for k in SCALARS}


def read_metrics_file(path: Path) -> dict[str, float]:
    """{name: value} of a metrics.json written by `metrics_file` (`test.` dropped)."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CnnflowError(f"{path}: not a metrics file of `cnnflow evaluate` ({exc})") from None
    if not isinstance(data, dict) or "test.accuracy" not in data:
        raise CnnflowError(f"{path}: expected the `test.accuracy` key of `cnnflow evaluate`'s "
                           f"metrics.json")
    return {k.removeprefix("test."): v for k, v in data.items()}


# ---------------------------------------------------------------------------- plots
# matplotlib.figure.Figure draws with the Agg canvas and touches no pyplot global state.


def plot_confusion(matrix: list[list[int]], classes: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    m = np.asarray(matrix)
    size = max(4.0, 0.5 * len(classes) + 2)  # inches: room for a label per class
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    ax.imshow(m, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted",
           ylabel="actual", title="confusion matrix (test)")
    ax.set_xticklabels(classes, rotation=90)
    ax.set_yticklabels(classes)
    if len(classes) <= 30:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > m.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_reliability(bins: list[dict[str, float]], ece: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    width = bins[0]["upper"] - bins[0]["lower"]
    centers = [b["lower"] + width / 2 for b in bins]
    ax.bar(centers, [b["accuracy"] for b in bins], width=width, edgecolor="black",
           label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"reliability (ECE {ece:.4f}, {len(bins)} bins)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_training(rows: list[dict[str, Any]], path: Path) -> Path:
    """Training curves per epoch: train and val loss, train and val accuracy."""
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(9, 3.6))
    loss, acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    loss.plot(epochs, [r["loss"] for r in rows], label="train")
    loss.plot(epochs, [r["val_loss"] for r in rows], label="val")
    loss.set(xlabel="epoch", ylabel="cross-entropy (nats)", title="loss")
    acc.plot(epochs, [r["train_accuracy"] for r in rows], label="train")
    acc.plot(epochs, [r["val_accuracy"] for r in rows], label="val")
    acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    for ax in (loss, acc):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_misclassified(wrong: list, classes: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig = Figure(figsize=(cols * 1.6, rows * 1.8))
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i < len(wrong):
            image, true, pred, conf = wrong[i]
            hwc = image.transpose(1, 2, 0)
            ax.imshow(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc, cmap="gray",
                      vmin=0, vmax=255)
            ax.set_title(f"{classes[true]}->{classes[pred]} {conf:.2f}", fontsize=7)
    if not wrong:
        fig.text(0.5, 0.5, "no misclassified test images", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------- stage


def write_reports(out: Path, metrics: dict[str, Any], probs: np.ndarray, labels: np.ndarray,
                  wrong: list, classes: list[str]) -> dict[str, Path]:
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "per_class": out / "per_class.json",
             "confusion_png": plots / "confusion_matrix.png",
             "confusion_json": plots / "confusion_matrix.json",
             "confusion_csv": plots / "confusion.csv",
             "calibration_csv": plots / "calibration.csv",
             "reliability_png": plots / "reliability.png",
             "misclassified_png": plots / "misclassified.png"}
    _write_json(paths["metrics"], metrics_file(metrics))
    _write_json(out / "evaluation.json", {k: metrics[k] for k in PROVENANCE})
    _write_json(paths["per_class"], metrics["per_class"])
    _write_json(paths["confusion_json"], {"classes": classes,
                                          "matrix": metrics["confusion_matrix"]})
    with open(paths["confusion_csv"], "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["actual", "predicted"])
        writer.writerows(zip((classes[i] for i in labels),
                             (classes[i] for i in probs.argmax(1)), strict=True))
    with open(paths["calibration_csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(metrics["calibration"][0]))
        writer.writeheader()
        writer.writerows(metrics["calibration"])
    plot_confusion(metrics["confusion_matrix"], classes, paths["confusion_png"])
    plot_reliability(metrics["calibration"], metrics["ece"], paths["reliability_png"])
    plot_misclassified(wrong, classes, paths["misclassified_png"])
    return paths


def evaluate(model: str | Path, shards: str | Path, out_dir: str | Path = "reports", *,
             tracker: Any = None, top_k: int = 3, batch_size: int = 256,
             max_misclassified: int = 36, tracking_uri: str | None = None,
             model_uri: str | None = None) -> dict[str, Any]:
    """Score `model` on the test split of `shards`; write reports; log them to `tracker`.
    `model_uri` is where the model came from when `model` is a local copy (an s3://
    train output): evaluation.json and errors name it, not the copy.

    Returns metrics.json's content plus `per_class`, `confusion_matrix`, `calibration`.
    """
    from cnnflow.data.manifest import read_manifest

    if top_k < 1:
        raise CnnflowError(f"evaluate.top_k: expected an int >= 1, got {top_k}")
    manifest = read_manifest(shards)
    predict, meta = load_predictor(model, tracking_uri)
    named = model_uri or str(model)
    _check_compatible(meta, manifest, named)
    classes = list(manifest["classes"])
    probs, labels, wrong = score(predict, shards, batch_size=batch_size,
                                 keep_wrong=max_misclassified)
    metrics = compute_metrics(probs, labels, classes, top_k)
    metrics.update(dataset_version=manifest["dataset_version"],
                   model_dataset_version=meta.get("dataset_version"), model=named)
    out = Path(out_dir)
    paths = write_reports(out, metrics, probs, labels, wrong, classes)
    log.info("test accuracy %.4f top-%d %.4f macro F1 %.4f ECE %.4f on %d images -> %s",
             metrics["accuracy"], metrics["k"], metrics["top_k_accuracy"],
             metrics["macro_f1"], metrics["ece"], metrics["n"], paths["metrics"])
    if tracker is not None:
        _log(tracker, metrics, paths, shards)
    return metrics


def _log(tracker: Any, metrics: dict[str, Any], paths: dict[str, Path], shards) -> None:
    keys = ("accuracy", "top_k_accuracy", "macro_f1", "weighted_f1", "ece")
    values = {f"test/{k}": metrics[k] for k in keys}
    for cls, row in metrics["per_class"].items():
        name = re.sub(r"[^\w\-. /]", "_", cls)  # MLflow's metric-name alphabet
        values.update({f"test/f1.{name}": row["f1"], f"test/recall.{name}": row["recall"],
                       f"test/precision.{name}": row["precision"]})
    tracker.log_metrics(values, step=0)
    tracker.set_tags({DATASET_TAG: metrics["dataset_version"]})
    tracker.log_dataset(shards, context="test")
    tracker.log_artifact(paths["metrics"], "reports")
    tracker.log_artifact(paths["per_class"], "reports")
    tracker.log_artifact(paths["metrics"].parent / "plots", "reports")
