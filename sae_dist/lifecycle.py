"""A training job's life in named steps, shared by every runner:

    prepare -> build -> resume_or_initialise -> fit -> finish (evaluate, export, results, plots, tracking)

`sae_dist.run.train` runs them in one process, under torchrun and in each Ray trainer actor (the runners
differ only in where the source and the mesh come from); `sae_dist.pipeline.fanout` builds and finishes
several SAEs around one shared loop. Each step takes the `Job` the steps before it made.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae_dist import archs, kernels
from sae_dist.checkpoint import Checkpointer, CheckpointError, check_storage
from sae_dist.config import Config, flatten
from sae_dist.data import BatchStream, Source
from sae_dist.data.heldout import KEY as HELDOUT_KEY
from sae_dist.data.heldout import covering, heldout_spec
from sae_dist.export import fold_scale_
from sae_dist.metrics import evaluate, weight_metrics
from sae_dist.parallel import Mesh, ReplicaSource, apply_feature_parallel
from sae_dist.parallel.dims import resolve_device
from sae_dist.parallel.engine import build_engine, check_supported
from sae_dist.parallel.export import export_on_mesh
from sae_dist.plots import plot_training
from sae_dist.preempt import PreemptedError, Preemption
from sae_dist.sae import SparseAutoencoder
from sae_dist.tracking import NullTracker, Tracker, build_tracker
from sae_dist.trainer import Trainer, TrainState, auto_lr, estimate_scale

log = logging.getLogger(__name__)


@dataclass
class Job:
    """What one rank trains, with what."""

    cfg: Config
    mesh: Mesh
    source: Source
    """The training activations this rank reads (before dealing data replicas their share)."""
    trainer: Trainer
    tracker: Tracker
    checkpointer: Checkpointer | None

    @property
    def sae(self) -> SparseAutoencoder:
        return self.trainer.sae


def prepare(cfg: Config) -> torch.device:
    """Before any costly work: the kernels' settings, trainer.device resolved and checked with the rest of
    the config, and the storage the job will write to (a ConfigError in seconds, not after training)."""
    kernels.set_backend(cfg.trainer.kernels)
    kernels.set_select_precision(cfg.trainer.encoder_select)
    device = resolve_device(cfg.trainer.device)
    check_supported(cfg, device)
    check_storage(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL, Triton and torch.cuda calls default to the current device
    return device


def build_sae(
    cfg: Config, d_model: int, mesh: Mesh | None = None, device: torch.device | str = "cpu", n_sites: int = 0
) -> SparseAutoencoder:
    """This rank's shard (the whole SAE without a mesh) on `device`; every sharding starts from the same
    weights on every device (they are drawn on the host). `n_sites`: the data's sites per token (a
    crosscoder's vectors are all of them, concatenated)."""
    n_local, offset = (mesh.dims.n_local, mesh.latent_offset) if mesh else (cfg.sae.n_latents, 0)
    family = archs.get(cfg.sae.arch)
    width, d_out = family.width(d_model, n_sites), family.out_width(d_model, n_sites)
    sae = SparseAutoencoder(cfg.sae, width, d_out=d_out, n_local=n_local, encoder_chunk=cfg.trainer.encoder_chunk,
                            seed=cfg.trainer.seed, latent_offset=offset).to(device)
    return apply_feature_parallel(sae, mesh) if mesh else sae


def build(
    cfg: Config, source: Source, mesh: Mesh, device: torch.device, tracker: Tracker | None = None,
    checkpoints: bool = True,
) -> Job:
    """The SAE shard, its optimizer engine, the checkpointer (unless `checkpoints` is False) and the
    tracker (a null one off rank 0)."""
    torch.manual_seed(cfg.trainer.seed)
    sites = getattr(source, "n_sites", 0)
    archs.get(cfg.sae.arch).check_sites(cfg, sites, f"the data has {sites} sites per token (0: one)")
    archs.get(cfg.sae.arch).check_source(cfg, source)
    os.makedirs(cfg.output_dir, exist_ok=True)
    sae = build_sae(cfg, source.d_model, mesh, device, sites)
    checkpointer = None
    if checkpoints:
        checkpointer = Checkpointer(
            cfg, mesh.rank, mesh.dims.world_size, fp_rank=mesh.fp_rank, fp_size=mesh.fp, dp_rank=mesh.dp_rank,
            dp_size=mesh.dp, gather=mesh.gather_union if mesh.distributed else None,
            barrier=mesh.barrier if mesh.distributed else None,
        )
    if not mesh.is_main:
        tracker = NullTracker()
    tracker = tracker or build_tracker(
        cfg.tracking.enabled, cfg.tracking.uri, cfg.tracking.experiment, cfg.checkpoint.run_name, cfg.output_dir
    )
    engine = build_engine(cfg, sae, mesh, auto_lr(cfg))
    trainer = Trainer(cfg, sae, TrainState(seed=cfg.trainer.seed), tracker, checkpointer, engine=engine)
    return Job(cfg, mesh, source, trainer, tracker, checkpointer)


def resume_or_initialise(job: Job, scale: float | None = None) -> None:
    """Loads checkpoint.resume_from where it names a complete step; otherwise takes `scale`, or has rank 0
    estimate the activation scale from the source's first tokens. Then logs the run's parameters."""
    cfg, mesh, state = job.cfg, job.mesh, job.trainer.state
    resumed = None
    if cfg.checkpoint.resume_from and job.checkpointer is not None:
        resumed = job.checkpointer.resolve(cfg.checkpoint.resume_from)
        if resumed:
            job.checkpointer.load(job.trainer, resumed)
        else:
            log.info("no complete checkpoint under %s yet: starting fresh", job.checkpointer.run_root)
    if not resumed:
        if scale is None and mesh.is_main:
            tokens = cfg.trainer.scale_tokens
            scale = estimate_scale(iter(BatchStream(job.source, min(cfg.trainer.batch_tokens, tokens), 0)),
                                   job.source.d_model, tokens)
        state.scale = mesh.broadcast(scale)
    lm_dtype = getattr(job.source, "lm_dtype", None)
    resolved = {"lm_dtype": str(lm_dtype).removeprefix("torch.")} if lm_dtype is not None else {}
    job.tracker.log_params(flatten(cfg) | {"d_model": job.source.d_model, "activation_scale": state.scale} | resolved)


def batches(job: Job) -> BatchStream:
    """This rank's batch stream, at the trainer state's data position: data replicas draw their own
    chunks (the Ray stream deals them itself)."""
    cfg, mesh, source = job.cfg, job.mesh, job.source
    if mesh.dp > 1:
        for_replica = getattr(source, "for_replica", None)
        source = for_replica(mesh.dp_rank, mesh.dp) if for_replica else ReplicaSource(source, mesh.dp_rank, mesh.dp)
    stream = BatchStream(source, cfg.trainer.batch_tokens, cfg.data.shuffle_buffer_tokens, cfg.trainer.seed)
    if job.trainer.state.data:
        stream.load_state_dict(job.trainer.state.data)
    job.trainer.extra_metrics = getattr(source, "metrics", None)
    return stream


def fit(job: Job, preemption: Preemption | None = None) -> tuple[float, int]:
    """Trains to trainer.total_tokens -> (seconds, tokens trained by this process). On a preemption
    signal every rank stops after the same step, checkpoints it within the grace period and raises
    PreemptedError."""
    cfg, trainer = job.cfg, job.trainer
    stream = batches(job)
    log.info(
        "training %s SAE on %s: d=%d n=%d k=%d, %d tokens in %d steps, scale %.4f; %s lr %.3g, dead after %d "
        "tokens without firing", cfg.sae.arch, job.sae.b_dec.device, job.sae.d_model, cfg.sae.n_latents, cfg.sae.k,
        cfg.trainer.total_tokens, trainer.total_steps, trainer.state.scale, trainer.optimizer_name, trainer.base_lr,
        trainer.dead_tokens,
    )
    should_stop = (lambda: job.mesh.any(preemption.requested())) if preemption is not None else None
    t0, tokens0 = time.perf_counter(), trainer.state.tokens
    trainer.fit(iter(stream), stream.state_dict, should_stop)
    if trainer.stopped:
        assert preemption is not None
        saved = None
        if job.checkpointer is not None:
            try:
                saved = job.checkpointer.save(trainer, deadline=preemption.deadline())
            except CheckpointError as err:
                # the step's save missed the grace period (a big shard, slow storage): it stays invisible,
                # and the run is still a preempted one, to resume from the last complete checkpoint
                saved = job.checkpointer.last_saved
                log.error("the preemption checkpoint of step %d was not written within checkpoint.preempt_grace_s "
                          "(%s); resume from the last complete one: %s", trainer.state.step, err, saved or "none")
        raise PreemptedError(trainer.state.step, saved, preemption.signum or signal.SIGTERM)
    return time.perf_counter() - t0, trainer.state.tokens - tokens0


def export_meta(cfg: Config) -> dict[str, Any]:
    """What the export records of where the activations came from (dashboards and SAELens read it) and
    of its held-out set (`sae-dist eval` reads it)."""
    meta = {"hook_name": cfg.model.hook_point, "model_name": cfg.model.name, "context_size": cfg.model.context_size,
            HELDOUT_KEY: heldout_spec(cfg)}
    if cfg.model.sites:  # a multi-site dictionary: every site, and (SAELens's transcoder fields) in and out
        from sae_dist.data.lm import parse_site

        paths = [parse_site(s)[0] for s in cfg.model.sites]
        meta |= {"sites": list(cfg.model.sites), "hook_name": paths[0], "hook_name_out": paths[-1]}
    return meta


def trained_fraction(trainer: Any) -> float:
    """Fraction of the dictionary that fired (entered a top-k, or was active) on at least one token of the
    whole training run, from the trainer's firing counters (restored on resume; a latent resampled by
    sae.resample_every counts as fired). Unlike the held-out dead fraction it has no floor from the
    held-out set's size: 16,384 held-out tokens of k firings each can show at most 16,384 k latents alive."""
    ever = (trainer.tokens_since_fired < trainer.state.tokens).sum().float()
    return float(trainer.sae.comm.sum_scalar(ever)) / trainer.sae.n_latents


def finish(job: Job, heldout: Iterable[Tensor], fit_s: float, tokens: int) -> dict[str, Any]:
    """The SAELens export, then the held-out metrics of that export (the SAE folded into the export's
    float32 values, in place, so that `sae-dist eval` of the export prints the same figures), results.json,
    the training plot and the tracked artifacts (every rank calls this) -> the results, with the export
    folder. The trainer's SAE is in raw-activation units afterwards: nothing trains it again."""
    cfg, mesh, trainer, tracker = job.cfg, job.mesh, job.trainer, job.tracker
    state, sae = trainer.state, job.sae
    if cfg.trainer.param_dtype != "fp32":  # evaluate and export the fp32 masters
        sae.float().load_state_dict(trainer.engine.weight_tensors())
    export_dir = os.path.join(cfg.output_dir, "sae")
    export_on_mesh(sae, mesh, state.scale, export_dir, export_meta(cfg))
    results = evaluate(fold_scale_(sae, state.scale), covering(heldout, cfg.trainer.eval_tokens), 1.0,
                       cfg.trainer.eval_tokens) | weight_metrics(sae) | {"trained_fraction": trained_fraction(trainer)}
    tracker.log_metrics({f"eval/{k}": v for k, v in results.items()}, state.step)
    # every rank's peak resident memory over this process (training, export, this eval), in GiB
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    peak_rss = mesh.gather_union({str(mesh.rank): round(peak_kib / 2**20, 3)})
    if mesh.is_main:
        with open(os.path.join(cfg.output_dir, "results.json"), "w") as fh:
            json.dump(results | {"steps": state.step, "train_tokens": state.tokens, "n_latents": cfg.sae.n_latents,
                                 "train_s": round(fit_s, 2),
                                 # end to end over this process's training: data, steps, checkpoints
                                 "train_tokens_per_s": round(tokens / max(fit_s, 1e-9), 1),
                                 "peak_rss_gib": dict(sorted(peak_rss.items(), key=lambda kv: int(kv[0]))),
                                 "heldout": heldout_spec(cfg)}, fh, indent=1)
        plots_dir = os.path.join(cfg.output_dir, "plots")
        os.makedirs(plots_dir, exist_ok=True)
        if plot_training(trainer.logged, os.path.join(plots_dir, "training.png")):
            tracker.log_artifacts(plots_dir, "plots")
    mesh.barrier()
    tracker.log_artifacts(export_dir, "sae")
    return results | {"export_dir": export_dir, "history": trainer.history, "steps": state.step, "rank": mesh.rank,
                      "n_latents": cfg.sae.n_latents}
