"""One training job: the lifecycle's steps (sae_dist.lifecycle) on this process's mesh. The Hydra driver
(`sae_dist.cli`) calls `train`; so does each Ray trainer actor, passing the producers' stream as `source`.

    sae-dist                                                          # one process
    torchrun --nproc-per-node 4 -m sae_dist parallel.dp=2 parallel.fp=2   # a (dp x fp) mesh
    sae-dist cluster.producers=2 parallel.fp=2                        # Ray: sae_dist.pipeline.group

On a mesh every rank runs this same function: each replica draws its own chunks; rank 0 alone estimates
the scale, tracks and writes the results. SIGTERM/SIGINT stop it after a checkpoint (sae_dist.preempt).
"""

from __future__ import annotations

import atexit
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from sae_dist.config import Config
from sae_dist.data import Source, build_source, heldout_batches
from sae_dist.lifecycle import build, finish, fit, prepare, resume_or_initialise
from sae_dist.parallel import init_from_env
from sae_dist.parallel.engine import engine_name
from sae_dist.preempt import PreemptedError, Preemption
from sae_dist.tracking import Tracker


def train(
    cfg: Config, tracker: Tracker | None = None, source: Source | None = None, heldout: Iterable[Tensor] | None = None
) -> dict[str, Any]:
    """Trains (or resumes) the configured SAE; returns the held-out metrics and the export folder.
    `source` and `heldout` (chunks) replace the configured data. Raises PreemptedError, after
    checkpointing, when a signal stopped it."""
    device = prepare(cfg)
    own_group = not torch.distributed.is_initialized()
    mesh = init_from_env(cfg.parallel, cfg.sae.n_latents, device, group=engine_name(cfg) == "deepspeed")
    cfg.output_dir = mesh.broadcast(cfg.output_dir)  # Hydra's timestamped dir may differ per rank
    job = build(cfg, source or build_source(cfg, "train"), mesh, device, tracker)
    status = "FAILED"
    try:
        with Preemption(cfg.checkpoint.preempt_grace_s) as preemption:
            resume_or_initialise(job)
            fit_s, tokens = fit(job, preemption)
        results = finish(job, heldout if heldout is not None else heldout_batches(cfg), fit_s, tokens)
        status = "FINISHED"
        return results | {"engine": engine_name(cfg)}
    except PreemptedError:
        status = "KILLED"
        raise
    finally:
        job.tracker.finish(status)
        if own_group and mesh.distributed:
            if mesh.dims.world_size == 1:
                torch.distributed.destroy_process_group()  # the one-process group DeepSpeed needed
            else:  # torchrun's group serves every job of a --multirun: it ends at exit
                atexit.register(_destroy_group)


def _destroy_group() -> None:
    """Ends the process group before the interpreter's own teardown, which can race gloo's threads and
    abort a rank that finished cleanly (SIGABRT, "terminate called without an active exception"), so that
    torchrun reports a failed job. No barrier: on a failed job the other ranks may never come."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
