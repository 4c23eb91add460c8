"""Experiment tracking: MLflow on rank 0, a null tracker everywhere else (no `if rank == 0` in the loop)."""

from __future__ import annotations

import json
import logging
import os
import time
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
    """One MLflow run through a client of its own, not mlflow's process-wide active run: a fan-out
    keeps one run per member open at once, each in its own store."""

    def __init__(self, uri: str, experiment: str, run_name: str, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        tags = (tags or {}) | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
        self.run_id = self.client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id
        log.info("MLflow run %s at %s", self.run_id, uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        clean = [Param(k, ("" if v is None else str(v))[:500]) for k, v in params.items()]
        for i in range(0, len(clean), 90):
            self.client.log_batch(self.run_id, params=clean[i : i + 90])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Scalars as they are; a list (a multi-site family's fvu_per_site) as one metric per entry,
        `<key>.<i>` (MLflow metrics are scalars)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        flat: dict[str, float] = {}
        for k, v in metrics.items():
            if isinstance(v, (list, tuple)):
                flat |= {f"{k}.{i}": float(x) for i, x in enumerate(v)}
            else:
                flat[k] = float(v)
        batch = [Metric(k.replace("/", "."), v, now, step) for k, v in flat.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


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
