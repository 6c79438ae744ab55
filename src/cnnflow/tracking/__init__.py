"""Experiment tracking behind a small interface; MLflow is one implementation."""

from cnnflow.tracking.base import NullTracker, Tracker

__all__ = ["NullTracker", "Tracker"]
