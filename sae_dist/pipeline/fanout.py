"""Fan-out: several SAEs trained from one activation stream, so the LM forward is paid once.

    sae-dist 'sae.fanout_n_latents=[1536,3072,6144]'                     # LM in this process
    sae-dist 'sae.fanout_n_latents=[1536,3072,6144]' cluster.producers=2 # fed by Ray producers

Every member sees the same batches in the same order (one shuffle buffer, one scale), so a member's
result equals what it would get trained alone on that stream. Single process (parallel.fp=1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from sae_dist import kernels
from sae_dist.config import Config, ConfigError
from sae_dist.data import BatchStream, build_source, heldout_batches
from sae_dist.export import export_saelens
from sae_dist.metrics import evaluate
from sae_dist.run import build_sae, train_device
from sae_dist.tracking import build_tracker
from sae_dist.trainer import Trainer, TrainState, estimate_scale

log = logging.getLogger(__name__)


def member_configs(cfg: Config) -> list[Config]:
    sizes = list(cfg.sae.fanout_n_latents)
    if cfg.parallel.dp * cfg.parallel.fp != 1:
        raise ConfigError(
            f"sae.fanout_n_latents with parallel.dp ({cfg.parallel.dp}) x parallel.fp ({cfg.parallel.fp}) > 1 is "
            "not supported; fan out in one process, or sweep with -m"
        )
    out = []
    for n in sizes:
        sae = dataclasses.replace(cfg.sae, n_latents=int(n), fanout_n_latents=[])
        ck = dataclasses.replace(cfg.checkpoint, run_name=f"{cfg.checkpoint.run_name}-n{n}")
        out.append(dataclasses.replace(cfg, sae=sae, checkpoint=ck, output_dir=os.path.join(cfg.output_dir, f"n{n}")))
    return out


def train_fanout(cfg: Config) -> list[dict[str, Any]]:
    """Trains every size in sae.fanout_n_latents from one stream; returns each member's held-out metrics."""
    members = member_configs(cfg)
    device = train_device(cfg)
    kernels.set_backend(cfg.trainer.kernels)
    kernels.set_select_precision(cfg.trainer.encoder_select)
    source = build_source(cfg, "train")
    scale = estimate_scale(iter(BatchStream(source, min(cfg.trainer.batch_tokens, cfg.trainer.scale_tokens), 0)),
                           source.d_model, cfg.trainer.scale_tokens)
    trainers = []
    for m in members:
        os.makedirs(m.output_dir, exist_ok=True)
        tracker = build_tracker(m.tracking.enabled, m.tracking.uri, m.tracking.experiment, m.checkpoint.run_name,
                                m.output_dir)
        tracker.log_params({"sae.n_latents": m.sae.n_latents, "activation_scale": scale, "fanout": True})
        sae = build_sae(m, source.d_model, device=device)
        trainers.append(Trainer(m, sae, TrainState(scale=scale, seed=m.trainer.seed), tracker))
    stream = BatchStream(source, cfg.trainer.batch_tokens, cfg.data.shuffle_buffer_tokens, cfg.trainer.seed)
    total = trainers[0].total_steps
    for step, batch in enumerate(stream):
        if step >= total:
            break
        x = batch.to(device, non_blocking=True) * scale  # one copy to the device for every member
        for t in trainers:
            t.train_step(x)
    results = []
    heldout = _first_tokens(heldout_batches(cfg), cfg.trainer.eval_tokens)  # read (and run the LM) once
    for m, t in zip(members, trainers):
        res = evaluate(t.sae, iter(heldout), scale, m.trainer.eval_tokens)
        t.tracker.log_metrics({f"eval/{k}": v for k, v in res.items()}, t.state.step)
        export_dir = os.path.join(m.output_dir, "sae")
        export_saelens(t.sae, scale, export_dir, {"hook_name": m.model.hook_point, "model_name": m.model.name})
        with open(os.path.join(m.output_dir, "results.json"), "w") as fh:
            json.dump(res | {"steps": t.state.step, "n_latents": m.sae.n_latents}, fh, indent=1)
        t.tracker.log_artifacts(export_dir, "sae")
        t.tracker.finish()
        results.append(res | {"n_latents": m.sae.n_latents, "export_dir": export_dir, "history": t.history})
    return results


def _first_tokens(chunks: Iterator[Tensor], tokens: int) -> list[Tensor]:
    out, have = [], 0
    for acts in chunks:
        out.append(acts[: tokens - have])
        have += out[-1].shape[0]
        if have >= tokens:
            break
    return out
