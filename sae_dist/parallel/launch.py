"""The glue `run.train` uses to run on a mesh: the optimizer engine, checkpoint hooks, rank-0 values
broadcast to everyone, and the whole SAE for export."""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import torch
import torch.distributed as dist

from sae_dist.config import Config, ConfigError
from sae_dist.export import WEIGHTS, export_config, full_shapes, write_shard
from sae_dist.parallel.dims import Mesh, resolve_backend
from sae_dist.parallel.dp import DataParallel
from sae_dist.parallel.fp import gather_full_state
from sae_dist.sae import SparseAutoencoder
from sae_dist.snapshot import safetensors_layout


def check_supported(cfg: Config, device: torch.device) -> None:
    """Refuses, before any work, what this process cannot run (`device` is trainer.device resolved)."""
    p = cfg.parallel
    resolve_backend(p.backend, device)
    if engine_name(cfg) == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                f"parallel.engine ({p.engine}) is deepspeed for parallel.dp ({p.dp}) / trainer.param_dtype "
                f"({cfg.trainer.param_dtype}), but DeepSpeed is not installed; DS_BUILD_OPS=0 pip install "
                "'sae-dist[deepspeed]', or set parallel.engine=torch (fp32 weights only)"
            )


def engine_name(cfg: Config) -> str:
    """parallel.engine resolved: auto is deepspeed with data replicas (dp > 1) or bf16 weights (its fp32
    master copies), torch otherwise."""
    if cfg.parallel.engine == "auto":
        return "deepspeed" if cfg.parallel.dp > 1 or cfg.trainer.param_dtype == "bf16" else "torch"
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


def export_sharded(sae: SparseAutoencoder, mesh: Mesh, scale: float, out_dir: str, meta: dict[str, Any]) -> bool:
    """The SAELens export of a feature-parallel SAE without any rank holding the whole of it: rank 0
    writes the header and allocates the file, each fp shard of replica 0 writes its latents into place
    (memory-mapped), and the file gets its name once all are done. Needs `out_dir` on a filesystem every
    rank sees (one node, or a shared one); returns False, having written nothing, where it is not."""
    path = os.path.join(out_dir, WEIGHTS)
    partial = broadcast_from_main(f"{path}.partial-{os.getpid()}", mesh)  # rank 0's name
    start, offsets = safetensors_layout(full_shapes(sae))
    size = len(start) + max(end for _, end in offsets.values())
    if mesh.is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(partial, "wb") as fh:
            fh.write(start)
            fh.truncate(size)  # sparse until the shards land
    mesh.barrier()
    seen: list[Any] = [None] * mesh.dims.world_size
    dist.all_gather_object(seen, os.path.exists(partial) and os.path.getsize(partial) == size)
    if not all(seen):
        if mesh.is_main:
            os.remove(partial)
        return False
    if mesh.dp_rank == 0:
        write_shard(partial, len(start), offsets, sae, scale, mesh.latent_offset, write_replicated=mesh.fp_rank == 0)
    mesh.barrier()
    if mesh.is_main:
        os.replace(partial, path)
        with open(os.path.join(out_dir, "cfg.json"), "w") as fh:
            json.dump(export_config(sae, scale, meta), fh, indent=1)
    mesh.barrier()
    return True
