"""The glue `run.train` uses to run on a mesh: the optimizer engine, checkpoint hooks, rank-0 values
broadcast to everyone, and the whole SAE for export."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.distributed as dist

from sae_dist.config import Config, ConfigError
from sae_dist.parallel.dims import Mesh, resolve_backend
from sae_dist.parallel.dp import DataParallel
from sae_dist.parallel.fp import gather_full_state
from sae_dist.sae import SparseAutoencoder


def check_supported(cfg: Config, device: torch.device) -> None:
    """Refuses, before any work, what this process cannot run (`device` is trainer.device resolved)."""
    p = cfg.parallel
    if p.dp > 1 and cfg.sae.arch == "relu" and cfg.sae.resample_every:
        raise ConfigError(
            f"sae.resample_every ({cfg.sae.resample_every}) with parallel.dp ({p.dp}) > 1 is not supported: "
            "replicas would resample from different batches; set sae.resample_every=0 or parallel.dp=1"
        )
    resolve_backend(p.backend, device)
    if engine_name(cfg) == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                f"parallel.engine ({p.engine}) is deepspeed for parallel.dp ({p.dp}), but DeepSpeed is not "
                "installed; DS_BUILD_OPS=0 pip install 'sae-dist[deepspeed]', or set parallel.engine=torch"
            )
        if cfg.sae.arch == "relu" and cfg.sae.resample_every:
            raise ConfigError(
                f"sae.resample_every ({cfg.sae.resample_every}) resets per-latent Adam state, which ZeRO "
                f"partitions (parallel.engine={p.engine}); set parallel.engine=torch or sae.resample_every=0"
            )


def engine_name(cfg: Config) -> str:
    """parallel.engine resolved: auto is deepspeed with data replicas (dp > 1), torch without."""
    if cfg.parallel.engine == "auto":
        return "deepspeed" if cfg.parallel.dp > 1 else "torch"
    return cfg.parallel.engine


def build_engine(cfg: Config, sae: SparseAutoencoder, mesh: Mesh, lr: float) -> Any:
    if engine_name(cfg) == "deepspeed":
        from sae_dist.parallel.zero import DeepSpeedEngine

        return DeepSpeedEngine(sae, lr, cfg, mesh)
    from sae_dist.trainer import TorchEngine

    return TorchEngine(sae, lr, data=DataParallel(mesh) if mesh.dp > 1 else None)


def broadcast_from_main(value: Any, mesh: Mesh) -> Any:
    """Rank 0's value of a picklable object on every rank."""
    if not mesh.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def checkpoint_hooks(mesh: Mesh) -> tuple[Any, Any]:
    """(gather, barrier) for the Checkpointer: gather(dict) -> the union of every rank's dict, on every
    rank (JSON-able values; all_gather_object over the world)."""

    def gather(entries: dict[str, Any]) -> dict[str, Any]:
        everyone: list[Any] = [None] * mesh.dims.world_size
        dist.all_gather_object(everyone, entries)
        return {k: v for part in everyone for k, v in part.items()}

    return gather, dist.barrier


def full_sae(sae: SparseAutoencoder, mesh: Mesh) -> SparseAutoencoder:
    """The unsharded SAE (every rank takes part; small dictionaries only: it is built in host memory)."""
    if mesh.fp == 1:
        return sae
    state = gather_full_state(sae, mesh)
    whole = SparseAutoencoder(
        sae.cfg, sae.d_model, n_local=sae.n_latents, encoder_chunk=sae.encoder_chunk, generator=torch.Generator()
    )
    whole.load_state_dict(state)
    return whole
