"""One training job from a validated Config: data, scale, SAE, trainer, checkpoints, evaluation,
export and tracking, in that order. The Hydra driver (`sae_dist.cli`) calls `train`.

On a (dp x fp) mesh (torchrun sets the environment; see sae_dist.parallel) every rank runs this same
function: each replica draws its own chunks, rank 0 alone estimates the scale, tracks and exports.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch

from sae_dist import kernels
from sae_dist.checkpoint import Checkpointer, check_storage
from sae_dist.config import Config, flatten
from sae_dist.data import BatchStream, build_source, heldout_batches
from sae_dist.export import export_saelens
from sae_dist.metrics import evaluate
from sae_dist.parallel import Mesh, ReplicaSource, apply_feature_parallel, init_from_env
from sae_dist.parallel.dims import resolve_device
from sae_dist.parallel.launch import (
    broadcast_from_main,
    build_engine,
    check_supported,
    checkpoint_hooks,
    engine_name,
    export_sharded,
    full_sae,
)
from sae_dist.plots import plot_training
from sae_dist.sae import SparseAutoencoder
from sae_dist.tracking import NullTracker, Tracker, build_tracker
from sae_dist.trainer import Trainer, TrainState, auto_lr, estimate_scale

log = logging.getLogger(__name__)


def build_sae(
    cfg: Config, d_model: int, mesh: Mesh | None = None, device: torch.device | str = "cpu"
) -> SparseAutoencoder:
    """This rank's shard (the whole SAE without a mesh) on `device`; every sharding starts from the same
    weights on every device (they are drawn on the host)."""
    n_local, offset = (mesh.dims.n_local, mesh.latent_offset) if mesh else (cfg.sae.n_latents, 0)
    sae = SparseAutoencoder(cfg.sae, d_model, n_local=n_local, encoder_chunk=cfg.trainer.encoder_chunk,
                            seed=cfg.trainer.seed, latent_offset=offset).to(device)
    return apply_feature_parallel(sae, mesh) if mesh else sae


def train_device(cfg: Config) -> torch.device:
    """trainer.device resolved for this process and checked with the rest of the config (a ConfigError
    before any work), then made the current CUDA device where it is one."""
    device = resolve_device(cfg.trainer.device)
    check_supported(cfg, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL, Triton and torch.cuda calls default to the current device
    return device


def train(cfg: Config, tracker: Tracker | None = None) -> dict[str, Any]:
    """Trains (or resumes) the configured SAE; returns the held-out metrics and the export folder."""
    kernels.set_backend(cfg.trainer.kernels)
    kernels.set_select_precision(cfg.trainer.encoder_select)
    device = train_device(cfg)
    check_storage(cfg)
    own_group = not torch.distributed.is_initialized()
    mesh = init_from_env(cfg.parallel, cfg.sae.n_latents, device, group=engine_name(cfg) == "deepspeed")
    torch.manual_seed(cfg.trainer.seed)
    cfg.output_dir = broadcast_from_main(cfg.output_dir, mesh)  # Hydra's timestamped dir may differ per rank
    os.makedirs(cfg.output_dir, exist_ok=True)
    source = build_source(cfg, "train")
    d_model = source.d_model
    sae = build_sae(cfg, d_model, mesh, device)
    state = TrainState(seed=cfg.trainer.seed)
    gather, barrier = checkpoint_hooks(mesh) if mesh.distributed else (None, None)
    checkpointer = Checkpointer(cfg, mesh.rank, mesh.dims.world_size, fp_rank=mesh.fp_rank, fp_size=mesh.fp,
                                dp_rank=mesh.dp_rank, dp_size=mesh.dp, gather=gather, barrier=barrier)
    if not mesh.is_main:
        tracker = NullTracker()
    tracker = tracker or build_tracker(
        cfg.tracking.enabled, cfg.tracking.uri, cfg.tracking.experiment, cfg.checkpoint.run_name, cfg.output_dir
    )
    engine = build_engine(cfg, sae, mesh, auto_lr(cfg))
    trainer = Trainer(cfg, sae, state, tracker, checkpointer, engine=engine)
    resumed = None
    if cfg.checkpoint.resume_from:
        resumed = checkpointer.resolve(cfg.checkpoint.resume_from)
        if resumed:
            checkpointer.load(trainer, resumed)
        else:
            log.info("no complete checkpoint under %s yet: starting fresh", checkpointer.run_root)
    if not resumed:
        scale = None
        if mesh.is_main:
            scale_stream = BatchStream(source, min(cfg.trainer.batch_tokens, cfg.trainer.scale_tokens), 0)
            scale = estimate_scale(iter(scale_stream), d_model, cfg.trainer.scale_tokens)
        state.scale = broadcast_from_main(scale, mesh)
    resolved = {"lm_dtype": str(source.lm_dtype).removeprefix("torch.")} if hasattr(source, "lm_dtype") else {}
    tracker.log_params(flatten(cfg) | {"d_model": d_model, "activation_scale": state.scale} | resolved)
    if mesh.dp > 1:
        for_replica = getattr(source, "for_replica", None)  # the Ray stream deals replicas their own chunks
        source = for_replica(mesh.dp_rank, mesh.dp) if for_replica else ReplicaSource(source, mesh.dp_rank, mesh.dp)
    stream = BatchStream(source, cfg.trainer.batch_tokens, cfg.data.shuffle_buffer_tokens, cfg.trainer.seed)
    trainer.extra_metrics = getattr(source, "metrics", None)
    if state.data:
        stream.load_state_dict(state.data)
    log.info(
        "training %s SAE on %s: d=%d n=%d k=%d, %d tokens in %d steps, scale %.4f", cfg.sae.arch, device,
        d_model, cfg.sae.n_latents, cfg.sae.k, cfg.trainer.total_tokens, trainer.total_steps, state.scale,
    )
    status = "FAILED"
    try:
        t0, tokens0 = time.perf_counter(), state.tokens
        trainer.fit(iter(stream), stream.state_dict)
        fit_s = time.perf_counter() - t0
        if cfg.trainer.param_dtype != "fp32":  # evaluate and export the fp32 masters
            sae.float().load_state_dict(engine.weight_tensors())
        results = evaluate(sae, heldout_batches(cfg), state.scale, cfg.trainer.eval_tokens)
        tracker.log_metrics({f"eval/{k}": v for k, v in results.items()}, state.step)
        export_dir = os.path.join(cfg.output_dir, "sae")
        meta = {"hook_name": cfg.model.hook_point, "model_name": cfg.model.name,
                "context_size": cfg.model.context_size}
        # each fp shard writes its own latents where the ranks share a filesystem; else gather (small SAEs)
        if not (mesh.fp > 1 and export_sharded(sae, mesh, state.scale, export_dir, meta)):
            whole = full_sae(sae, mesh)
            if mesh.is_main:
                export_saelens(whole, state.scale, export_dir, meta)
        if mesh.is_main:
            with open(os.path.join(cfg.output_dir, "results.json"), "w") as fh:
                json.dump(results | {"steps": state.step, "train_tokens": state.tokens, "train_s": round(fit_s, 2),
                                     # end to end over this process's training: data, steps, checkpoints
                                     "train_tokens_per_s": round((state.tokens - tokens0) / max(fit_s, 1e-9), 1)},
                          fh, indent=1)
            plots_dir = os.path.join(cfg.output_dir, "plots")
            os.makedirs(plots_dir, exist_ok=True)
            if plot_training(trainer.logged, os.path.join(plots_dir, "training.png")):
                tracker.log_artifacts(plots_dir, "plots")
        mesh.barrier()
        tracker.log_artifacts(export_dir, "sae")
        status = "FINISHED"
        return results | {"export_dir": export_dir, "history": trainer.history, "steps": state.step,
                           "rank": mesh.rank, "engine": engine_name(cfg)}
    finally:
        tracker.finish(status)
        if own_group and mesh.distributed and mesh.dims.world_size == 1:
            torch.distributed.destroy_process_group()  # the one-process group DeepSpeed needed
