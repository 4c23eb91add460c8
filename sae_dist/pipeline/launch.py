"""Starting the pipeline's actors: a local Ray cluster by default, or an existing one (cluster=ray)."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from sae_dist.config import Config
from sae_dist.pipeline.producer import ActivationProducer
from sae_dist.pipeline.resources import check_cluster, describe, local_node
from sae_dist.pipeline.stream import PipelineTimeoutError, RayStreamSource

log = logging.getLogger(__name__)


def init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if cfg.cluster.kind == "ray":
        ray.init(address=cfg.cluster.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=cfg.cluster.num_cpus or None, include_dashboard=False, log_to_driver=False)


def start_producers(cfg: Config, split: str = "train") -> list[Any]:
    """`cluster.producers` LM shard actors; Ray restarts a dead one and retries its pending chunks.
    Refuses (ConfigError) before starting any when the cluster cannot hold them."""
    import ray

    if cfg.cluster.kind == "local" and not ray.is_initialized():
        check_cluster(cfg, ranks=0, nodes=[local_node(cfg.cluster.num_cpus)])
    init_ray(cfg)
    cfg = check_cluster(cfg, ranks=0)  # a no-op check for a trainer group's config, resolved and checked whole
    n = cfg.cluster.producers
    actor = ray.remote(num_cpus=cfg.cluster.producer_cpus, max_restarts=-1, max_task_retries=-1)(ActivationProducer)
    threads = max(1, math.ceil(cfg.cluster.producer_cpus))
    producers: list[Any] = [
        actor.options(name=f"sae-dist-producer-{split}-{i}-of-{n}", get_if_exists=True).remote(
            cfg.model, cfg.data, i, n, split, threads, cfg.cluster.cache_url
        )
        for i in range(n)
    ]
    refs = [p.width.remote() for p in producers]
    ready, waiting = ray.wait(refs, num_returns=n, timeout=cfg.cluster.timeout_s)
    if waiting:
        late = [i for i, ref in enumerate(refs) if ref not in ready]
        free = describe(ray.available_resources())
        for p in producers:  # a pending actor would start later and load the LM for nobody
            ray.kill(p, no_restart=True)
        raise PipelineTimeoutError(
            f"producer(s) {late} of {n} not started (placed on a node and {cfg.model.name} loaded) after "
            f"{cfg.cluster.timeout_s:g} s (cluster.timeout_s); each asks for cluster.producer_cpus="
            f"{cfg.cluster.producer_cpus:g} CPUs and the cluster has {free} "
            "free: raise cluster.timeout_s, or free the cluster / lower cluster.producer_cpus"
        )
    ray.get(ready, timeout=cfg.cluster.timeout_s)  # raises a producer's start-up error
    return producers


def max_in_flight(cfg: Config) -> int:
    """cluster.max_in_flight, or for 0 the chunks of one shuffle block plus one per producer: the
    trainer takes a whole block at once and then trains on it, so with fewer in flight the producers
    would sit idle through that training (measured: 24% idle with 2 in flight, scripts/bench_pipeline.py)."""
    if cfg.cluster.max_in_flight:
        return cfg.cluster.max_in_flight
    chunk_tokens = cfg.model.batch_contexts * cfg.model.context_size  # an upper bound: specials are dropped
    block = max(cfg.data.shuffle_buffer_tokens, cfg.trainer.batch_tokens)
    return math.ceil(block / chunk_tokens) + 1 + max(1, cfg.cluster.producers)


def build_stream_source(cfg: Config, producers: list[Any] | None = None, dp_rank: int = 0, dp_size: int = 1) -> RayStreamSource:
    import ray

    producers = producers or start_producers(cfg)
    try:
        d_model = ray.get(producers[0].width.remote(), timeout=cfg.cluster.timeout_s)
    except ray.exceptions.GetTimeoutError as err:
        raise PipelineTimeoutError(
            f"producer 0 did not report its width within {cfg.cluster.timeout_s:g} s (cluster.timeout_s); "
            "raise cluster.timeout_s"
        ) from err
    return RayStreamSource(
        producers, int(d_model), cfg.model.batch_contexts, max_in_flight(cfg), cfg.cluster.timeout_s,
        dp_rank, dp_size, len(cfg.model.sites),
    )
