"""What the pipeline's actors ask Ray for, and a refusal before any of them starts when the cluster
cannot hold them: an actor Ray cannot place waits forever, and a trainer group's rendezvous with it.

    cfg = check_cluster(cfg, ranks, gpus_per_rank)   # cluster.*_cpus=0 (auto) resolved, then checked
    check_cluster(cfg, ranks, nodes=[local_node(cfg.cluster.num_cpus)])   # before starting a local cluster
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from sae_dist.config import Config
from sae_dist.errors import ConfigError


def auto_cpus(kind: str, cluster_cpus: float, actors: int) -> float:
    """CPUs each actor reserves for cluster.*_cpus=0: on a local cluster `actors` share its CPUs (at
    most 1 each); on kind=ray 1. Rounded down to Ray's 1e-4 resource unit so the shares never
    overbook (3 x 0.6667 > 2)."""
    if kind == "ray" or actors == 0:
        return 1.0
    return math.floor(min(1.0, cluster_cpus / actors) * 10_000) / 10_000


def resolve_cpus(cfg: Config, ranks: int, cluster_cpus: float) -> Config:
    """`cfg` with cluster.producer_cpus and cluster.trainer_cpus made concrete (auto resolved against
    `ranks` trainer actors and the cluster's CPUs); unchanged where both are set."""
    c = cfg.cluster
    share = auto_cpus(c.kind, cluster_cpus, c.producers + ranks)
    cluster = dataclasses.replace(c, producer_cpus=c.producer_cpus or share, trainer_cpus=c.trainer_cpus or share)
    return dataclasses.replace(cfg, cluster=cluster)


def node_resources() -> list[dict[str, float]]:
    """Total resources of each live node of the Ray cluster this process is attached to."""
    import ray

    return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]


def local_node(num_cpus: int = 0) -> dict[str, float]:
    """The one node of the local cluster init_ray would start (cluster.num_cpus, 0 = this machine's),
    so a job it cannot hold is refused before one starts (seconds); the check after it starts, on what
    Ray detected, is the one that counts."""
    import torch

    return {"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def check_placeable(
    cfg: Config, ranks: int, gpus_per_rank: float, total: dict[str, float], nodes: list[dict[str, float]]
) -> None:
    """ConfigError unless the cluster (`total`, and one node for each actor) holds the producers and
    `ranks` trainer actors of `cfg` (cluster.*_cpus already resolved)."""
    c, p = cfg.cluster, cfg.parallel
    producers = f"cluster.producers ({c.producers}) x cluster.producer_cpus ({c.producer_cpus:g})"
    trainers = f"parallel.dp ({p.dp}) x parallel.fp ({p.fp}) x cluster.trainer_cpus ({c.trainer_cpus:g})"
    terms = [t for t, n in ((producers, c.producers), (trainers, ranks)) if n]
    largest = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    for name, cpus, count in (("producer_cpus", c.producer_cpus, c.producers), ("trainer_cpus", c.trainer_cpus, ranks)):
        if count and cpus > largest + 1e-9:
            raise ConfigError(
                f"cluster.{name} ({cpus:g}) is more than any one node has (largest: {largest:g} CPUs of "
                f"{len(nodes)} node(s)), and an actor runs on one node; set cluster.{name} <= {largest:g} "
                "(0 = auto)"
            )
    need = c.producers * c.producer_cpus + ranks * c.trainer_cpus
    have = total.get("CPU", 0.0)
    more = "add nodes" if c.kind == "ray" else "raise cluster.num_cpus (the local cluster's logical CPUs; 0 = this machine's)"
    if need > have + 1e-9:
        raise ConfigError(
            f"the job asks Ray for {need:g} CPUs ({' + '.join(terms)}) but the cluster has {have:g}, so some "
            "actors would never start; set cluster.producer_cpus=0 and cluster.trainer_cpus=0 (auto: share "
            f"the CPUs) or lower them, use fewer cluster.producers or trainer ranks, or {more}"
        )
    gpus = ranks * gpus_per_rank
    if gpus > total.get("GPU", 0.0) + 1e-9:
        raise ConfigError(
            f"the trainer group asks Ray for {gpus:g} GPUs (parallel.dp ({p.dp}) x parallel.fp ({p.fp}) x "
            f"{gpus_per_rank:g}) but the cluster has {total.get('GPU', 0.0):g}; use trainer.device=auto or cpu, "
            "fewer ranks, or add GPU nodes"
        )
    if ranks and gpus_per_rank and not any(n.get("GPU", 0.0) >= gpus_per_rank for n in nodes):
        raise ConfigError(
            f"each trainer actor asks for {gpus_per_rank:g} GPU but no node has that many; use "
            "trainer.device=auto or cpu, or add GPU nodes"
        )


def check_cluster(
    cfg: Config, ranks: int, gpus_per_rank: float = 0.0, nodes: list[dict[str, float]] | None = None
) -> Config:
    """`cfg` with CPUs resolved for `nodes` (default: the attached Ray cluster's), after the checks of
    `check_placeable` against them."""
    nodes = node_resources() if nodes is None else nodes
    total = {key: sum(n.get(key, 0.0) for n in nodes) for key in ("CPU", "GPU")}
    cfg = resolve_cpus(cfg, ranks, total["CPU"])
    check_placeable(cfg, ranks, gpus_per_rank, total, nodes)
    return cfg


def describe(res: dict[str, Any]) -> str:
    """CPUs/GPUs of a resource dict, for messages."""
    return ", ".join(f"{k} {float(v):g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU")) or "none"
