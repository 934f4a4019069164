"""Experiment tracking seam: MLflow, a local SQLite store under the run's output by default.

Invariant: tracking never decides anything about training; a run records params once, metrics
per epoch (step = epoch) and artifacts at the end, and every MLflow failure surfaces as an
`MLError` naming the tracking URI. MLflow 3 refuses its old `./mlruns` file store, so the
embedded default is `sqlite:///OUT/mlflow.db` with artifacts in `OUT/mlartifacts`: still one
local file, no server; `--tracking-uri http://host:5000` points at a tracking server instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import MLError

__all__ = ["EXPERIMENT", "Tracker", "default_tracking_uri"]

EXPERIMENT = "edgewise-train"


def default_tracking_uri(out_dir: Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


class Tracker:
    """One MLflow run; use as a context manager."""

    def __init__(self, uri: str, out_dir: Path, run_name: str) -> None:
        self.uri = uri
        self.out_dir = Path(out_dir)
        self.run_name = run_name
        self.run_id: str | None = None
        self._client = None

    def __enter__(self) -> Tracker:
        try:
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            logging.getLogger("alembic").setLevel(logging.WARNING)
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
            exp = self._client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                artifacts = None
                if self.uri.startswith("sqlite:"):
                    artifacts = (self.out_dir.resolve() / "mlartifacts").as_uri()
                exp_id = self._client.create_experiment(EXPERIMENT, artifact_location=artifacts)
            else:
                exp_id = exp.experiment_id
            self.run_id = self._client.create_run(exp_id, run_name=self.run_name).info.run_id
        except Exception as exc:  # mlflow raises MlflowException, sqlalchemy, requests errors
            raise MLError(f"MLflow tracking at {self.uri} failed: {exc}") from exc
        return self

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        try:
            getattr(self._client, method)(self.run_id, *args, **kwargs)
        except Exception as exc:
            raise MLError(f"MLflow tracking at {self.uri} failed: {exc}") from exc

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(flat), 100):
            self._call("log_batch", params=flat[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._call("log_batch", metrics=[Metric(k, float(v), now, step)
                                         for k, v in metrics.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self._call("log_artifacts", str(path), artifact_path)
        else:
            self._call("log_artifact", str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self._call("set_tag", key, value)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._client is not None and self.run_id is not None:
            status = "FINISHED" if exc_type is None else (
                "KILLED" if exc_type is KeyboardInterrupt else "FAILED")
            # never mask the training error with a tracking one
            with contextlib.suppress(Exception):
                self._client.set_terminated(self.run_id, status=status)
