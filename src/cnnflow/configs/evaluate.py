"""The `evaluate` section of params.yaml, used by `cnnflow.evaluate`."""

from __future__ import annotations

from dataclasses import dataclass

from cnnflow.errors import check_config as _check


@dataclass(kw_only=True)
class EvaluateConfig:
    """Score the test split, register the model, maybe promote it."""

    model: str = ""
    """"" = train.out_dir; or a train output in object storage (s3://bucket/model, read
    once its _SUCCESS marker is there), models:/<name>@<alias>, models:/<name>/<version>,
    runs:/<id>/model."""
    out_dir: str = "reports"
    top_k: int = 3
    batch_size: int = 256
    max_misclassified: int = 36
    """Images in reports/plots/misclassified.png."""
    register: bool = True
    """Register the evaluated model version as @challenger with its test metrics."""
    promote: bool = True
    margin: float = 0.0
    """Test-accuracy gain the challenger needs over the champion (0.002 = 0.2 points)."""
    promote_across_datasets: bool = False
    """Promote a challenger trained on another dataset version (figures not comparable)."""

    def __post_init__(self) -> None:
        for name in ("top_k", "batch_size"):
            _check(getattr(self, name) >= 1, f"evaluate.{name}", "an int >= 1",
                   getattr(self, name))
        _check(self.max_misclassified >= 0, "evaluate.max_misclassified", "an int >= 0",
               self.max_misclassified)
        _check(0 <= self.margin < 1, "evaluate.margin", "a number in [0, 1)", self.margin)
