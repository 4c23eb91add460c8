"""Sweeps (Hydra multirun): one MLflow parent run per sweep, one child run per member, a sweep report,
and a sweep that resumes after a kill.

    sae-dist -m sae.n_latents=16384,65536,262144 hydra.sweep.dir=multirun/dict-size  # members in turn
    sae-dist -m sae.n_latents=16384,65536,262144 hydra.sweep.dir=multirun/dict-size  # again: resumes
    sae-dist -m sae.n_latents=16384,65536 hydra/launcher=ray_sae cluster.address=auto  # Ray tasks

`SweepCallback` (conf/config.yaml, `hydra.callbacks`) opens the parent run before the first member and
records it in `<sweep dir>/sweep.json`; `run_member` (called by the driver for every job) skips a member
whose `results.json` exists, resumes the others from their newest checkpoint, and leaves
`sweep_member.json` in the member's folder for `tracking.build_tracker` (parent run id, run name, tags).
At the end the callback logs the report (`sae_dist.sweep_report`) as artifacts of the parent.

Re-running finds the same members only under the same sweep folder: fix `hydra.sweep.dir` (the default
one carries the start time).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sae_dist.config import Config
from sae_dist.tracking import MEMBER_FILE, default_uri

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
MEMBER_TAG = "sae_dist.sweep_member"
"""MLflow tag on each child run: the member's folder under the sweep folder (e.g. `0_sae.n_latents=64`)."""
SWEPT_TAG = "sae_dist.swept"
"""MLflow tag on each child run: JSON of the member's swept values."""


def swept_values(task_overrides: list[str]) -> dict[str, str]:
    """`key -> value` of the overrides in a multirun command line that sweep (`k=a,b`, `range(...)`...):
    the sweep-level overrides give the values as written; a member's give its own value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return {o.key_or_group: str(o.value()) if o.is_sweep_override() else o.get_value_element_as_str() for o in parsed}


_swept_keys: list[str] | None = None  # set on the launching machine by SweepCallback.on_multirun_start


def member_dirname(*, _root_: DictConfig) -> str:
    """A member's folder name after its swept values only (`sae.n_latents=64`), used by
    `hydra.sweep.subdir` as `${hydra.job.num}_${sae_dist_member:}`: Hydra's override_dirname names every
    override and outgrows a file name on long command lines. Resolved on the launching machine."""
    if _swept_keys is None:
        return str(_root_.hydra.job.override_dirname)
    values = swept_values(list(_root_.hydra.overrides.task))
    return ",".join(f"{k}={values[k]}".replace("/", "_") for k in _swept_keys if k in values) or "job"


OmegaConf.register_new_resolver("sae_dist_member", member_dirname, replace=True)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def _write_json(path: str, obj: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


class SweepCallback(Callback):
    """Owns the sweep's MLflow parent run. Runs on the launching machine only (Hydra's contract)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        sweep_dir = os.path.abspath(str(config.hydra.sweep.dir))
        os.makedirs(sweep_dir, exist_ok=True)
        path = os.path.join(sweep_dir, SWEEP_FILE)
        record = _read_json(path)
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        swept = [o.key_or_group for o in parsed if o.is_sweep_override()]
        global _swept_keys
        _swept_keys = swept
        record.update(sweep_dir=sweep_dir, swept_keys=swept)
        if config.tracking.enabled:
            uri = str(config.tracking.uri) or default_uri(sweep_dir)
            record.update(tracking_uri=uri, experiment=str(config.tracking.experiment))
            record["parent_run_id"] = _open_parent(uri, record["experiment"], sweep_dir, swept, record.get("parent_run_id"))
        _write_json(path, record)
        log.info("sweep folder %s: the same command with hydra.sweep.dir=%s resumes this sweep", sweep_dir, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        from sae_dist.sweep_report import collect_rows, write_report

        sweep_dir = os.path.abspath(str(config.hydra.sweep.dir))
        record = _read_json(os.path.join(sweep_dir, SWEEP_FILE))
        if not record.get("parent_run_id"):
            return
        client = MlflowClient(record["tracking_uri"])
        parent = record["parent_run_id"]
        rows = collect_rows(client, parent)
        report_dir = os.path.join(sweep_dir, "report")
        write_report(rows, report_dir, record["swept_keys"], str(config.tracking.get("frontier", "fvu")))
        client.log_artifacts(parent, report_dir, "report")
        if rows:
            client.log_metric(parent, "sweep.best_fvu", min(r["fvu"] for r in rows))
            client.log_metric(parent, "sweep.members", len(rows))
        client.set_terminated(parent, "FINISHED")
        log.info("sweep report (%d members) in %s and on MLflow run %s", len(rows), report_dir, parent)


def _open_parent(uri: str, experiment: str, sweep_dir: str, swept: list[str], previous: str | None) -> str:
    """The parent run: the one this sweep folder already has (a resumed sweep), else a new one."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if previous:
        try:
            client.update_run(previous, status="RUNNING")
        except MlflowException:
            log.warning("parent run %s of %s is not in %s: opening a new one", previous, sweep_dir, uri)
        else:
            stale = client.search_runs(
                [client.get_run(previous).info.experiment_id],
                f"tags.mlflow.parentRunId = '{previous}' and attributes.status = 'RUNNING'",
            )
            for run in stale:  # members of the killed invocation; their rerun opens a new child run
                client.set_terminated(run.info.run_id, "KILLED")
            log.info("resuming sweep: parent MLflow run %s (%d unfinished child runs marked KILLED)", previous, len(stale))
            return previous
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        where = os.path.dirname(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        exp_id = client.create_experiment(experiment, artifact_location=where and f"file://{where}/mlartifacts")
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=f"sweep {os.path.basename(sweep_dir)}",
                            tags={"sae_dist.sweep_dir": sweep_dir, "sae_dist.swept_keys": ",".join(swept)})
    log.info("sweep: parent MLflow run %s at %s", run.info.run_id, uri)
    return run.info.run_id


def run_member(cfg: Config, train_fn: Callable[[Config], dict[str, Any]]) -> dict[str, Any]:
    """`train_fn(cfg)`; in a multirun member, first: skip it if it finished before (its stored
    results), else resume it from its newest checkpoint and tie its MLflow run to the sweep's parent."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return train_fn(cfg)
    hc = HydraConfig.get()
    sweep_dir = os.path.abspath(str(hc.sweep.dir))
    name = os.path.relpath(os.path.abspath(cfg.output_dir), sweep_dir)
    done = os.path.join(cfg.output_dir, "results.json")
    if os.path.exists(done):
        log.info("sweep member %s finished before (%s): skipped", name, done)
        return _read_json(done) | {"export_dir": os.path.join(cfg.output_dir, "sae")}
    ck = cfg.checkpoint
    ck.resume_from = ck.resume_from or "latest"
    if ck.url:  # a shared store: members and sweeps need folders of their own
        ck.run_name = "/".join([ck.run_name, os.path.normpath(str(hc.sweep.dir)).lstrip("/"), name])
    record = _read_json(os.path.join(sweep_dir, SWEEP_FILE))
    if cfg.tracking.enabled and record.get("parent_run_id"):
        cfg.tracking.uri = cfg.tracking.uri or record["tracking_uri"]
        mine = swept_values(list(hc.overrides.task))
        values = {k: mine[k] for k in record["swept_keys"] if k in mine}
        os.makedirs(cfg.output_dir, exist_ok=True)
        _write_json(os.path.join(cfg.output_dir, MEMBER_FILE), {
            "parent_run_id": record["parent_run_id"],
            "run_name": ",".join(f"{k}={v}" for k, v in values.items()) or name,
            "tags": {MEMBER_TAG: name, SWEPT_TAG: json.dumps(values)},
        })
    log.info("sweep member %s: resume_from=%s, checkpoints under %s/%s", name, ck.resume_from,
             ck.url or os.path.join(cfg.output_dir, "checkpoints"), ck.run_name)
    results = train_fn(cfg)
    if not os.path.exists(done):  # rank 0 ran on another node: keep the skip marker where the driver looks
        _write_json(done, {k: v for k, v in results.items() if isinstance(v, (int, float, str))})
    return results
