"""Evaluation: metric arithmetic on known arrays, the report files, the MLflow record."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from mlflow import MlflowClient

from cnnflow.errors import CnnflowError
from cnnflow.evaluate import calibration, compute_metrics, evaluate
from cnnflow.tracking.mlflow_tracker import stage_run


def test_metrics_on_known_predictions():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]])
    labels = np.array([0, 1, 1, 0])
    m = compute_metrics(probs, labels, ["a", "b", "c"], top_k=2)
    assert m["accuracy"] == 0.5
    assert m["top_k_accuracy"] == 0.75  # sample 3's label 0 is its third choice
    assert m["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert m["weighted_f1"] == pytest.approx((0.5 * 2 + 2 / 3 * 2) / 4)


def test_ece_matches_a_hand_computed_value():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])
    ece, bins = calibration(probs, labels, bins=15)
    # bin of 0.95: accuracy 0.5 vs 0.95; bin of 0.55: accuracy 1.0 vs 0.55
    assert ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    assert sum(b["count"] for b in bins) == 4 and len(bins) == 15


def test_evaluate_writes_reports_and_logs_them(tracking_uri, shards, model_dir, tmp_path):
    tracker = stage_run("evaluate")
    result = evaluate(model_dir, shards, tmp_path / "reports", tracker=tracker)
    tracker.close()
    reports = tmp_path / "reports"
    flat = json.loads((reports / "metrics.json").read_text())
    # the DVC metric: numbers only, flat keys, the returned values
    assert flat == {f"test.{k}": result[k] for k in ("accuracy", "top_k_accuracy", "macro_f1",
                                                     "weighted_f1", "ece", "n", "k")}
    assert all(isinstance(v, (int, float)) for v in flat.values())
    assert flat["test.n"] == 179 and flat["test.accuracy"] > 0.8  # digits test split
    assert flat["test.top_k_accuracy"] >= flat["test.accuracy"]
    provenance = json.loads((reports / "evaluation.json").read_text())
    assert provenance["model"] == str(model_dir)
    assert provenance["dataset_version"] == provenance["model_dataset_version"]
    for name in ("confusion_matrix.png", "reliability.png", "misclassified.png"):
        assert (reports / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    matrix = json.loads((reports / "plots" / "confusion_matrix.json").read_text())
    assert np.asarray(matrix["matrix"]).sum() == 179
    with open(reports / "plots" / "confusion.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 179
    assert sum(r["actual"] == r["predicted"] for r in rows) / 179 == result["accuracy"]
    with open(reports / "plots" / "calibration.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 15

    client = MlflowClient(tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.data.metrics["test/accuracy"] == result["accuracy"]
    assert run.data.metrics["test/ece"] == result["ece"]
    assert run.data.metrics["test/f1.0"] == result["per_class"]["0"]["f1"]
    assert run.data.tags["cnnflow.dataset_version"] == result["dataset_version"]
    names = {a.path for a in client.list_artifacts(tracker.run_id, "reports/plots")}
    assert "reports/plots/confusion_matrix.png" in names
    (dataset,) = run.inputs.dataset_inputs
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "test"


def test_evaluate_refuses_a_model_for_other_images(shards, model_dir, tmp_path):
    meta = json.loads((model_dir / "model.json").read_text())
    meta["image_shape"] = [28, 28, 1]
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.json").write_text(json.dumps(meta))
    (other / "model.pt").write_bytes((model_dir / "model.pt").read_bytes())
    with pytest.raises(CnnflowError, match="trained for images"):
        evaluate(other, shards, tmp_path / "r")
    with pytest.raises(CnnflowError, match="model.json: not found"):
        evaluate(tmp_path / "nothing", shards, tmp_path / "r")
