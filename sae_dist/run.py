"""One training job from a validated Config: data, scale, SAE, trainer, checkpoints, evaluation,
export and tracking, in that order. The Hydra driver (`sae_dist.cli`) calls `train`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from sae_dist import kernels
from sae_dist.checkpoint import Checkpointer
from sae_dist.config import Config, flatten
from sae_dist.data import BatchStream, build_source
from sae_dist.export import export_saelens
from sae_dist.metrics import evaluate
from sae_dist.sae import SparseAutoencoder
from sae_dist.tracking import Tracker, build_tracker
from sae_dist.trainer import Trainer, TrainState, estimate_scale

log = logging.getLogger(__name__)


def build_sae(cfg: Config, d_model: int) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(cfg.trainer.seed)
    return SparseAutoencoder(cfg.sae, d_model, encoder_chunk=cfg.trainer.encoder_chunk, generator=g)


def train(cfg: Config, tracker: Tracker | None = None) -> dict[str, Any]:
    """Trains (or resumes) the configured SAE; returns the held-out metrics and the export folder."""
    kernels.set_backend(cfg.trainer.kernels)
    torch.manual_seed(cfg.trainer.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)
    source = build_source(cfg, "train")
    d_model = source.d_model
    sae = build_sae(cfg, d_model)
    state = TrainState(seed=cfg.trainer.seed)
    checkpointer = Checkpointer(cfg)
    tracker = tracker or build_tracker(
        cfg.tracking.enabled, cfg.tracking.uri, cfg.tracking.experiment, cfg.checkpoint.run_name, cfg.output_dir
    )
    trainer = Trainer(cfg, sae, state, tracker, checkpointer)
    resumed = None
    if cfg.checkpoint.resume_from:
        resumed = checkpointer.resolve(cfg.checkpoint.resume_from)
        if resumed:
            checkpointer.load(trainer, resumed)
        else:
            log.info("no complete checkpoint under %s yet: starting fresh", checkpointer.run_root)
    if not resumed:
        scale_stream = BatchStream(source, min(cfg.trainer.batch_tokens, cfg.trainer.scale_tokens), 0)
        state.scale = estimate_scale(iter(scale_stream), d_model, cfg.trainer.scale_tokens)
    tracker.log_params(flatten(cfg) | {"d_model": d_model, "activation_scale": state.scale})
    stream = BatchStream(source, cfg.trainer.batch_tokens, cfg.data.shuffle_buffer_tokens, cfg.trainer.seed)
    if state.data:
        stream.load_state_dict(state.data)
    log.info(
        "training %s SAE: d=%d n=%d k=%d, %d tokens in %d steps, scale %.4f",
        cfg.sae.arch, d_model, cfg.sae.n_latents, cfg.sae.k, cfg.trainer.total_tokens, trainer.total_steps, state.scale,
    )
    status = "FAILED"
    try:
        trainer.fit(iter(stream), stream.state_dict)
        heldout = BatchStream(build_source(cfg, "heldout"), 4096, 0)
        results = evaluate(sae, iter(heldout), state.scale, cfg.trainer.eval_tokens)
        tracker.log_metrics({f"eval/{k}": v for k, v in results.items()}, state.step)
        export_dir = os.path.join(cfg.output_dir, "sae")
        export_saelens(sae, state.scale, export_dir, {"hook_name": cfg.model.hook_point, "model_name": cfg.model.name,
                                                       "context_size": cfg.model.context_size})
        with open(os.path.join(cfg.output_dir, "results.json"), "w") as fh:
            json.dump(results | {"steps": state.step, "train_tokens": state.tokens}, fh, indent=1)
        tracker.log_artifacts(export_dir, "sae")
        status = "FINISHED"
        return results | {"export_dir": export_dir, "history": trainer.history, "steps": state.step}
    finally:
        tracker.finish(status)
