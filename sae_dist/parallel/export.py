"""The export step on a mesh: the SAELens files of a feature-parallel SAE, written shard by shard where
the ranks share a filesystem, else from the SAE gathered on rank 0."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist

from sae_dist.export import WEIGHTS, export_config, export_saelens, full_shapes, write_shard
from sae_dist.parallel.dims import Mesh
from sae_dist.parallel.fp import gather_full_state
from sae_dist.sae import SparseAutoencoder
from sae_dist.snapshot import safetensors_layout


def export_on_mesh(sae: SparseAutoencoder, mesh: Mesh, scale: float, out_dir: str, meta: dict[str, Any]) -> None:
    """Every rank calls this; on return `out_dir` holds the whole SAE in SAELens's layout."""
    if mesh.fp > 1 and export_sharded(sae, mesh, scale, out_dir, meta):
        return
    whole = full_sae(sae, mesh)
    if mesh.is_main:
        export_saelens(whole, scale, out_dir, meta)


def full_sae(sae: SparseAutoencoder, mesh: Mesh) -> SparseAutoencoder:
    """The unsharded SAE (every rank takes part; small dictionaries only: it is built in host memory)."""
    if mesh.fp == 1:
        return sae
    state = gather_full_state(sae, mesh)
    whole = SparseAutoencoder(
        sae.cfg, sae.d_model, n_local=sae.n_latents, encoder_chunk=sae.encoder_chunk, generator=torch.Generator(),
        d_out=sae.d_out,
    )
    whole.load_state_dict(state)
    return whole


def export_sharded(sae: SparseAutoencoder, mesh: Mesh, scale: float, out_dir: str, meta: dict[str, Any]) -> bool:
    """The SAELens export of a feature-parallel SAE without any rank holding the whole of it: rank 0
    writes the header and allocates the file, each fp shard of replica 0 writes its latents into place
    (memory-mapped), and the file gets its name once all are done. Needs `out_dir` on a filesystem every
    rank sees (one node, or a shared one); returns False, having written nothing, where it is not."""
    path = os.path.join(out_dir, WEIGHTS)
    partial = mesh.broadcast(f"{path}.partial-{os.getpid()}")  # rank 0's name
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
