"""Experiment tracking: MLflow on rank 0, a null tracker everywhere else (no `if rank == 0` in the loop)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker(Tracker):
    """Logs nothing."""


class MlflowTracker(Tracker):
    def __init__(self, uri: str, experiment: str, run_name: str, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        tags = (tags or {}) | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
        self.run = mlflow.start_run(run_name=run_name, tags=tags or None, nested=parent_run_id is not None)
        self.run_id = self.run.info.run_id
        log.info("MLflow run %s at %s", self.run_id, uri)

    def log_params(self, params: dict[str, Any]) -> None:
        clean = {k: ("" if v is None else str(v))[:500] for k, v in params.items()}
        items = list(clean.items())
        for i in range(0, len(items), 90):
            self.mlflow.log_params(dict(items[i : i + 90]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifacts(local_dir, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


MEMBER_FILE = "sweep_member.json"
"""In a sweep member's output folder (written by sae_dist.sweep): parent run id, run name and tags."""


def default_uri(output_dir: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(output_dir, "mlflow.db"))


def build_tracker(enabled: bool, uri: str, experiment: str, run_name: str, output_dir: str, rank: int = 0) -> Tracker:
    if not enabled or rank != 0:
        return NullTracker()
    member: dict[str, Any] = {}
    if os.path.exists(os.path.join(output_dir, MEMBER_FILE)):
        with open(os.path.join(output_dir, MEMBER_FILE)) as fh:
            member = json.load(fh)
    return MlflowTracker(uri or default_uri(output_dir), experiment, member.get("run_name", run_name),
                         member.get("parent_run_id"), member.get("tags"))
