"""Fan-out: several SAEs trained from one activation stream, so the LM forward is paid once.

    sae-dist 'sae.fanout_n_latents=[1536,3072,6144]'                     # LM in this process
    sae-dist 'sae.fanout_n_latents=[1536,3072,6144]' cluster.producers=2 # fed by Ray producers

Every member sees the same batches in the same order (one shuffle buffer, one scale), so a member's
result equals what it would get trained alone on that stream. Each member is built and finished by the
lifecycle's steps (sae_dist.lifecycle), around one shared loop. Single process (parallel.fp=1), no
checkpoints: a fan-out is a short comparison run, not a resumable job.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from sae_dist.config import Config, ConfigError
from sae_dist.data import BatchStream, Source, build_source, heldout_batches
from sae_dist.data.heldout import covering
from sae_dist.lifecycle import build, finish, prepare, resume_or_initialise
from sae_dist.parallel import single_process
from sae_dist.pipeline.launch import build_stream_source
from sae_dist.trainer import estimate_scale


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


def train_fanout(cfg: Config, source: Source | None = None) -> list[dict[str, Any]]:
    """Trains every size in sae.fanout_n_latents from one stream (`source`, else the configured one in
    this process); returns each member's held-out metrics."""
    members = member_configs(cfg)
    device = prepare(cfg)
    if source is None and cfg.cluster.producers:
        source = build_stream_source(cfg)
    source = source or build_source(cfg, "train")
    scale = estimate_scale(iter(BatchStream(source, min(cfg.trainer.batch_tokens, cfg.trainer.scale_tokens), 0)),
                           source.d_model, cfg.trainer.scale_tokens)
    jobs = []
    for m in members:
        job = build(m, source, single_process(m.parallel, m.sae.n_latents), device, checkpoints=False)
        resume_or_initialise(job, scale)
        job.tracker.log_params({"fanout": True})
        jobs.append(job)
    stream = BatchStream(source, cfg.trainer.batch_tokens, cfg.data.shuffle_buffer_tokens, cfg.trainer.seed)
    total, t0 = jobs[0].trainer.total_steps, time.perf_counter()
    for step, batch in enumerate(stream):
        if step >= total:
            break
        x = batch.to(device, non_blocking=True) * scale  # one copy to the device for every member
        for job in jobs:
            job.trainer.train_step(x)
    fit_s = time.perf_counter() - t0  # every member's, together
    heldout = list(covering(heldout_batches(cfg), cfg.trainer.eval_tokens))  # read (and run the LM) once
    results = []
    for job in jobs:
        results.append(finish(job, heldout, fit_s, job.trainer.state.tokens))
        job.tracker.finish()
    return results

