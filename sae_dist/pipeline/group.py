"""The trainer group on Ray: dp x fp trainer actors that form one torch.distributed group, fed by the
LM shard actors. A dead trainer actor restarts the whole group from the last complete checkpoint.

    sae-dist cluster.producers=2 parallel.fp=2                 # local Ray cluster
    sae-dist cluster=ray cluster.producers=8 parallel.fp=4     # attach to a running cluster
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from typing import Any

from sae_dist.config import Config, ConfigError
from sae_dist.pipeline.launch import build_stream_source, init_ray, start_producers
from sae_dist.pipeline.resources import check_cluster, describe, local_node
from sae_dist.pipeline.stream import PipelineTimeoutError
from sae_dist.preempt import PreemptedError

log = logging.getLogger(__name__)


class TrainerWorker:
    """One trainer rank. A plain class; `run_trainer_group` makes it a Ray actor."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host the rendezvous."""
        ip = "127.0.0.1" if self._local() else socket.gethostbyname(socket.gethostname())
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def node(self) -> str:
        """This actor's node IP: an answer means Ray placed the actor."""
        import ray

        return str(ray.util.get_node_ip_address())

    @staticmethod
    def _local() -> bool:
        import ray

        return ray.util.get_node_ip_address() in ("127.0.0.1", socket.gethostbyname("localhost"))

    def run(self, cfg: Config, master: tuple[str, int], threads: int = 1, producers: list[Any] | None = None) -> dict[str, Any]:
        """This rank's part of the job (sae_dist.run.train), fed by `producers` when given (else the
        configured source in this actor)."""
        import torch

        from sae_dist.run import train  # torch and the model code load in the actor, not in the driver

        torch.set_num_threads(threads)
        os.environ.update(
            RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0",
            MASTER_ADDR=master[0], MASTER_PORT=str(master[1]),
        )
        return train(cfg, source=build_stream_source(cfg, producers) if producers else None)


def trainer_gpus(device: str, cluster_gpus: float, world: int) -> int:
    """GPUs each trainer actor asks Ray for. Ray hides every GPU from an actor that asks for none, so
    trainer.device=auto trains on GPUs where the cluster has one per trainer rank and on CPUs elsewhere;
    cuda needs them (each actor then sees its own GPU as cuda:0)."""
    if device == "cpu":
        return 0
    if device not in ("auto", "cuda", "cuda:0"):
        raise ConfigError(
            f"trainer.device ({device!r}) on the Ray trainer group: each actor sees only its own GPU, as cuda:0; "
            "use trainer.device=cuda or auto"
        )
    if cluster_gpus >= world:
        return 1
    if device == "auto":
        return 0
    raise ConfigError(
        f"trainer.device ({device!r}) needs one GPU per trainer rank (parallel.dp x parallel.fp = {world}), but "
        f"the Ray cluster has {cluster_gpus:g}; use trainer.device=auto or cpu, or add GPU nodes"
    )


def trainer_name(attempt: int, rank: int) -> str:
    """The Ray actor name of a trainer rank (attempt = how many times the group was restarted)."""
    return f"sae-dist-trainer-a{attempt}-r{rank}"


def run_trainer_group(cfg: Config) -> dict[str, Any]:
    """Producers (owned by this driver, so they outlive a trainer restart), then the trainer group;
    returns rank 0's results. A job the cluster cannot hold is refused (ConfigError) before any actor
    starts; one whose actors do not start in cluster.timeout_s stops with PipelineTimeoutError."""
    import ray

    world = cfg.parallel.dp * cfg.parallel.fp
    if cfg.cluster.kind == "local" and not ray.is_initialized():
        local = local_node(cfg.cluster.num_cpus)
        check_cluster(cfg, world, trainer_gpus(cfg.trainer.device, local["GPU"], world), [local])
    init_ray(cfg)
    gpus = trainer_gpus(cfg.trainer.device, ray.cluster_resources().get("GPU", 0), world)
    cfg = check_cluster(cfg, world, gpus)
    producers = start_producers(cfg) if cfg.cluster.producers else []
    attempt = 0
    try:
        while True:
            try:
                results = _run_group_once(cfg, world, attempt, gpus, producers)
                if cfg.cluster.cache_url:
                    _finish_cache(cfg)
                return results | {"group_restarts": attempt}
            except (ray.exceptions.RayActorError, PreemptedError) as err:  # a dead or preempted rank
                if attempt >= cfg.cluster.trainer_restarts:
                    raise RuntimeError(
                        f"trainer group failed {attempt + 1} times (cluster.trainer_restarts="
                        f"{cfg.cluster.trainer_restarts}); last error: {err}"
                    ) from err
                attempt += 1
                log.warning("a trainer actor died or was preempted (%s); restarting the group from the last "
                            "checkpoint", err)
                ck = dataclasses.replace(cfg.checkpoint, resume_from="latest")
                cfg = dataclasses.replace(cfg, checkpoint=ck)
    finally:
        for p in producers:
            ray.kill(p, no_restart=True)


def _run_group_once(cfg: Config, world: int, attempt: int, gpus: int = 0, producers: list[Any] | None = None) -> dict[str, Any]:
    import ray

    actor = ray.remote(num_cpus=cfg.cluster.trainer_cpus, num_gpus=gpus, max_restarts=0)(TrainerWorker)
    workers: list[Any] = [actor.options(name=trainer_name(attempt, rank)).remote(rank, world) for rank in range(world)]
    try:
        _await_placement(cfg, workers, gpus)
        master = _get(workers[0].address.remote(), cfg, "rank 0's rendezvous address")
        threads = max(1, int(cfg.cluster.trainer_cpus))
        refs = [w.run.remote(cfg, master, threads, producers) for w in workers]
        pending, results = list(refs), {}
        t0 = time.monotonic()
        while pending:  # surface the first failure at once instead of waiting on the survivors' collectives
            ready, pending = ray.wait(pending, num_returns=1, timeout=cfg.cluster.timeout_s)
            for ref in ready:
                results[ref] = _get(ref, cfg, f"trainer rank {refs.index(ref)}'s result")
            if not ready:
                _check_alive(cfg, refs, pending, attempt)
                log.info("trainer group: %d of %d ranks still training after %.0f s", len(pending), world,
                         time.monotonic() - t0)
        return results[refs[0]]
    finally:
        for w in workers:
            ray.kill(w, no_restart=True)


def _get(refs: Any, cfg: Config, what: str) -> Any:
    import ray

    try:
        return ray.get(refs, timeout=cfg.cluster.timeout_s)
    except ray.exceptions.GetTimeoutError as err:
        raise PipelineTimeoutError(
            f"waited {cfg.cluster.timeout_s:g} s for {what} (cluster.timeout_s); raise cluster.timeout_s"
        ) from err


def _await_placement(cfg: Config, workers: list[Any], gpus: int) -> None:
    """Every trainer actor placed and answering before any joins the rendezvous, which would otherwise
    wait parallel.rendezvous_timeout_s for a rank that never starts."""
    import ray

    refs = [w.node.remote() for w in workers]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=cfg.cluster.timeout_s)
    if len(ready) < len(refs):
        late = [rank for rank, ref in enumerate(refs) if ref not in ready]
        raise PipelineTimeoutError(
            f"trainer rank(s) {late} of {len(refs)} not placed on a node after {cfg.cluster.timeout_s:g} s "
            f"(cluster.timeout_s): each asks Ray for cluster.trainer_cpus={cfg.cluster.trainer_cpus:g} CPUs and "
            f"{gpus} GPU(s); the cluster has {describe(ray.available_resources())} free of "
            f"{describe(ray.cluster_resources())} (other actors or jobs hold the rest). Lower cluster.trainer_cpus "
            "(0 = auto), free the cluster, or raise cluster.timeout_s"
        )
    log.info("trainer ranks placed on %s", _get(refs, cfg, "the trainer actors' node addresses"))


def _check_alive(cfg: Config, refs: list[Any], pending: list[Any], attempt: int) -> None:
    """A rank whose actor is gone yields its RayActorError now (the caller restarts the group)."""
    import ray

    alive = set(ray.util.list_named_actors())
    for rank, ref in enumerate(refs):
        if ref in pending and trainer_name(attempt, rank) not in alive:
            _get(ref, cfg, f"the result of trainer rank {rank}, whose actor is gone")


def _finish_cache(cfg: Config) -> None:
    from sae_dist.data.cache import CacheWriter

    writer = CacheWriter(f"{cfg.cluster.cache_url.rstrip('/')}/train")
    meta = {"model_name": cfg.model.name, "hook_point": cfg.model.hook_point, "corpus": cfg.data.corpus,
            "batch_contexts": cfg.model.batch_contexts}
    index = writer.finish(writer.contiguous(), meta)
    log.info("activation cache %s: %d chunks, %d tokens", writer.url, len(index["shards"]), index["tokens"])
