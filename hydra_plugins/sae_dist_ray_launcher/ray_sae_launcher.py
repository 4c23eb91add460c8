"""A Hydra launcher that runs each sweep member as a Ray task on a running cluster.

    sae-dist -m sae.n_latents=16384,65536,262144 hydra/launcher=ray_sae cluster.address=auto \
        hydra.sweep.dir=multirun/dict-size hydra.launcher.num_gpus=1
    ray job submit --address http://<head>:8265 -- \
        sae-dist -m sae.n_latents=16384,65536 hydra/launcher=ray_sae hydra.sweep.dir=/shared/sweeps/a

The launching process (a laptop attached with `ray://head:10001`, or a Ray job) owns the tasks: when it
dies they die with it, and the same command resumes the sweep (sae_dist/sweep.py). A member that drives
its own trainer group (cluster=ray or cluster.producers>0) takes no CPU of its own (num_cpus: null);
one that trains in the task takes one. Member folders, checkpoints and the MLflow store must be where
every node sees them (a shared file system, checkpoint=s3, an MLflow server) on a multi-node cluster.
"""

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class RaySaeLauncherConf:
    _target_: str = "hydra_plugins.sae_dist_ray_launcher.ray_sae_launcher.RaySaeLauncher"
    address: str = "${oc.select:cluster.address,''}"
    """Ray cluster to run on: `auto`, `ray://head:10001`, host:port; empty = RAY_ADDRESS or a new local one."""
    num_cpus: Optional[float] = None
    """CPUs per member task; null = 1, or 0 for a member that drives a trainer group of its own."""
    num_gpus: float = 0
    """GPUs per member task (a member training in the task on a GPU node: 1)."""
    max_retries: int = 1
    """Ray re-runs a member whose worker died this many times; it resumes from its checkpoints."""
    timeout_s: float = 7 * 24 * 3600.0
    """Longest wait for the whole sweep before the launcher stops with an error naming this setting."""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    """Ray runtime_env of the member tasks, e.g. {env_vars: {HF_HOME: /cache}}."""


ConfigStore.instance().store(group="hydra/launcher", name="ray_sae", node=RaySaeLauncherConf, provider="sae-dist")


def _run_member(hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig,
                singleton_state: dict[Any, Any]) -> JobReturn:
    """The member, inside its Ray task: Hydra's own run_job, as the basic launcher would call it."""
    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(config)
    return run_job(hydra_context=hydra_context, task_function=task_function, config=config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


def _member_cpus(config: DictConfig, num_cpus: float | None) -> float:
    if num_cpus is not None:
        return num_cpus
    drives_group = config.cluster.kind == "ray" or config.cluster.producers > 0
    return 0.0 if drives_group else 1.0


class RaySaeLauncher(Launcher):
    def __init__(self, address: str = "", num_cpus: float | None = None, num_gpus: float = 0,
                 max_retries: int = 1, timeout_s: float = 7 * 24 * 3600.0,
                 runtime_env: dict[str, Any] | None = None) -> None:
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.max_retries, self.timeout_s = max_retries, timeout_s
        self.runtime_env = dict(runtime_env or {})
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()  # workers may start in another folder
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address=self.address or None, runtime_env=OmegaConf.to_container(OmegaConf.create(self.runtime_env)) or None)
        log.info("Launching %d jobs as Ray tasks on %s", len(job_overrides), self.address or "RAY_ADDRESS/local")
        task = ray.remote(_run_member)
        refs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = f"{config.hydra.job.name}_{idx}"
                config.hydra.job.num = idx
                config.hydra.sweep.dir = str(sweep_dir)
                # the member's folder name resolves here, where the sweep callback ran, not on the worker
                config.hydra.sweep.subdir = str(OmegaConf.select(config, "hydra.sweep.subdir"))
            options = {"num_cpus": _member_cpus(config, self.num_cpus), "num_gpus": self.num_gpus,
                       "max_retries": self.max_retries, "name": f"sae-dist member {idx}"}
            refs.append(task.options(**options).remote(self.hydra_context, self.task_function, config,
                                                       Singleton.get_state()))
        return self._wait(refs)

    def _wait(self, refs: list[Any]) -> list[JobReturn]:
        import ray

        deadline, pending = time.monotonic() + self.timeout_s, list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(
                    f"{len(pending)} of {len(refs)} sweep members still running after {self.timeout_s:.0f} s "
                    "(hydra.launcher.timeout_s); raise it, or rerun the same command later to resume the sweep"
                )
        return ray.get(refs, timeout=60)  # all are ready: this only fetches the results
