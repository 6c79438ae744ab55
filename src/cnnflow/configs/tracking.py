"""The `tracking` section of params.yaml, used by `cnnflow.tracking` (MLflow)."""

from __future__ import annotations

from dataclasses import dataclass

from cnnflow.errors import check_config as _check


@dataclass(kw_only=True)
class TrackingConfig:
    """MLflow tracking: where runs go, what happens when the server is missing."""

    enabled: bool = True
    """false = NullTracker (nothing logged)."""
    uri: str = ""
    """Tracking URI; "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow/mlflow.db (cwd)."""
    experiment: str = "cnnflow"
    offline: bool = False
    """Log to the local sqlite store and never contact a server (says where in the log)."""
    check_timeout_s: float = 5.0
    """Seconds to wait for the server's /health before failing, before any training."""
    log_system_metrics: bool = False
    """CPU/memory/disk/network (and GPU) sampled every 10 s, logged every minute."""
    spool_dir: str = ""
    """Where tracking calls go if the server dies mid-run ("" = <out dir>/mlflow-spool)."""
    model_name: str = "cnnflow"
    """Registered model name (no '/', ':', '@'; MLflow path rules)."""

    def __post_init__(self) -> None:
        _check(self.check_timeout_s > 0, "tracking.check_timeout_s", "> 0 seconds",
               self.check_timeout_s)
        _check(bool(self.experiment.strip()), "tracking.experiment", "a non-empty name",
               self.experiment)
        _check(bool(self.model_name) and not any(c in self.model_name for c in "/:@"),
               "tracking.model_name", "a name without '/', ':' or '@'", self.model_name)
