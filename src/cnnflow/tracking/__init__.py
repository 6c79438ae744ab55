"""Experiment tracking behind a small interface; MLflow is one implementation.

base (Tracker, NullTracker, FanOutTracker), files (FileTracker: train.out_dir's files),
mlflow_tracker (MlflowTracker, runs), lineage (tags), sync (spool upload), server.
"""

from cnnflow.tracking.base import FanOutTracker, NullTracker, Tracker
from cnnflow.tracking.files import FileTracker

__all__ = ["FanOutTracker", "FileTracker", "NullTracker", "Tracker"]
