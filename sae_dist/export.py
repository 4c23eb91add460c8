"""Export to the SAELens layout: `cfg.json` + `sae_weights.safetensors`, activation scale folded in.

With s the training scale (x_train = s * x): W_enc' = s W_enc, b_dec' = b_dec / s, W_dec' = W_dec / s,
so the exported SAE takes raw activations, gives the same codes f, and reconstructs raw x.
SAELens stores W_enc as (d_in, d_sae).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sae_dist import archs
from sae_dist.sae import SparseAutoencoder


def export_tensors(sae: SparseAutoencoder, scale: float) -> dict[str, torch.Tensor]:
    """This SAE's (or feature shard's) tensors in the SAELens layout, scale folded in, on the host:
    W_enc (d_in, n), b_enc (n,), W_dec (n, d_in), b_dec (d_in,) and the family's own (n,) tensors
    (`Arch.export_per_latent`: a threshold, gated's r_mag and b_mag), under SAELens's names."""
    with torch.no_grad():
        tensors = {
            "W_enc": (sae.W_enc * scale).t(),
            "b_enc": sae.b_enc.detach(),
            "W_dec": sae.W_dec / scale,
            "b_dec": sae.b_dec / scale,
        } | sae.arch.export_tensors(sae)
    renames = sae.arch.export_renames
    return {renames.get(k, k): v.detach().float().cpu().contiguous() for k, v in tensors.items()}  # any device


def export_config(sae: SparseAutoencoder, scale: float, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """cfg.json of the whole SAE (sae.n_latents latents, whichever shard this is)."""
    arch = sae.cfg.arch
    return {
        "architecture": sae.arch.saelens_architecture,
        "d_in": sae.d_model,
        **({"d_out": sae.d_out} if sae.d_out != sae.d_model or sae.arch.sites != 1 else {}),  # multi-site: always
        "d_sae": sae.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "sae_dist_arch": arch,
        "sae_dist_scale": scale,
        **sae.arch.export_fields(),
        **(meta or {}),
    }


def export_saelens(
    sae: SparseAutoencoder, scale: float, out_dir: str, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Writes the whole (unsharded) SAE. BatchTopK and Matryoshka export as JumpReLU with their threshold."""
    os.makedirs(out_dir, exist_ok=True)
    save_file(export_tensors(sae, scale), os.path.join(out_dir, WEIGHTS))
    cfg = export_config(sae, scale, meta)
    with open(os.path.join(out_dir, "cfg.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)
    return cfg


WEIGHTS = "sae_weights.safetensors"


def full_shapes(sae: SparseAutoencoder) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of each exported tensor of the whole SAE."""
    n, d, d_out = sae.n_latents, sae.d_model, sae.d_out
    shapes = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d_out), "b_dec": (d_out,)}
    shapes |= {name: (n,) for name in sae.arch.export_per_latent} | sae.arch.export_shapes(d)
    renames = sae.arch.export_renames
    return {renames.get(k, k): (torch.float32, v) for k, v in shapes.items()}


def write_shard(path: str, start: int, offsets: dict[str, tuple[int, int]], sae: SparseAutoencoder, scale: float,
                lo: int, write_replicated: bool) -> None:
    """Writes feature shard [lo, lo + n_local) of the SAE into its place in an allocated export file
    (`start` bytes of header, then the data at `offsets`): memory-mapped, so only this shard is held."""
    shapes = full_shapes(sae)
    part = export_tensors(sae, scale)
    hi = lo + sae.n_local
    mm = np.memmap(path, dtype=np.uint8, mode="r+")
    try:
        for name, t in part.items():
            begin, _ = offsets[name]
            full = np.ndarray(shapes[name][1], dtype=np.float32, buffer=mm, offset=start + begin)
            if name == "W_enc":
                full[:, lo:hi] = t.numpy()
            elif name == "b_dec" or name in sae.arch.export_replicated:
                if write_replicated:
                    full[:] = t.numpy()
            else:
                full[lo:hi] = t.numpy()
        mm.flush()
    finally:
        del mm


def load_saelens(path: str) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """An exported SAE as a SparseAutoencoder on raw activations (scale 1). Never unpickles."""
    with open(os.path.join(path, "cfg.json")) as fh:
        cfg = json.load(fh)
    w = load_file(os.path.join(path, WEIGHTS))
    arch = cfg.get("sae_dist_arch", {"standard": "relu"}.get(cfg["architecture"], cfg["architecture"]))
    family = archs.get(arch)
    fields = {"arch": arch, "n_latents": cfg["d_sae"], "k": min(32, cfg["d_sae"] - 1)} | family.config_from_export(cfg)
    sae = SparseAutoencoder(archs.build_config(fields), cfg["d_in"], d_out=cfg.get("d_out"))
    load_exported(sae, w)
    return sae.eval(), cfg


def load_exported(sae: SparseAutoencoder, tensors: dict[str, torch.Tensor]) -> None:
    """Copies tensors in the SAELens layout (`export_tensors`'s names) into the SAE, in place."""
    names = (*_SHARED, *sae.arch.export_per_latent, *sae.arch.export_replicated)
    w = {name: tensors[sae.arch.export_renames.get(name, name)] for name in names}
    with torch.no_grad():
        sae.W_enc.copy_(w["W_enc"].t())
        sae.b_enc.copy_(w["b_enc"])
        sae.W_dec.copy_(w["W_dec"])
        sae.b_dec.copy_(w["b_dec"])
        sae.arch.load_exported(sae, w)


def fold_scale_(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """Turns the SAE (or feature shard) in place into its export: the same float32 values the export
    file holds, on raw activations. Evaluating it gives what evaluating the loaded export gives."""
    load_exported(sae, export_tensors(sae, scale))
    return sae


_SHARED = ("W_enc", "b_enc", "W_dec", "b_dec")
