"""Export to the SAELens layout: `cfg.json` + `sae_weights.safetensors`, activation scale folded in.

With s the training scale (x_train = s * x): W_enc' = s W_enc, b_dec' = b_dec / s, W_dec' = W_dec / s,
so the exported SAE takes raw activations, gives the same codes f, and reconstructs raw x.
SAELens stores W_enc as (d_in, d_sae).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae_dist.config import SaeConfig
from sae_dist.sae import SparseAutoencoder

_ARCH_NAMES = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}


def export_saelens(
    sae: SparseAutoencoder, scale: float, out_dir: str, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Writes the whole (unsharded) SAE. BatchTopK exports as JumpReLU with its learned threshold."""
    os.makedirs(out_dir, exist_ok=True)
    arch = sae.cfg.arch
    with torch.no_grad():
        tensors = {
            "W_enc": (sae.W_enc * scale).t().contiguous(),
            "b_enc": sae.b_enc.detach().clone(),
            "W_dec": (sae.W_dec / scale).contiguous(),
            "b_dec": (sae.b_dec / scale).contiguous(),
        }
        if arch == "jumprelu":
            tensors["threshold"] = sae.log_threshold.exp().detach().clone()
        if arch == "batchtopk":
            tensors["threshold"] = torch.full((sae.n_local,), float(sae.threshold.clamp_min(0)))
    host = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}  # from any training device
    save_file(host, os.path.join(out_dir, "sae_weights.safetensors"))
    cfg = {
        "architecture": _ARCH_NAMES[arch],
        "d_in": sae.d_model,
        "d_sae": sae.n_local,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "sae_dist_arch": arch,
        "sae_dist_scale": scale,
        **({"k": sae.cfg.k} if arch == "topk" else {}),
        **(meta or {}),
    }
    with open(os.path.join(out_dir, "cfg.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)
    return cfg


def load_saelens(path: str) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """An exported SAE as a SparseAutoencoder on raw activations (scale 1). Never unpickles."""
    with open(os.path.join(path, "cfg.json")) as fh:
        cfg = json.load(fh)
    w = load_file(os.path.join(path, "sae_weights.safetensors"))
    arch = cfg.get("sae_dist_arch", {"standard": "relu"}.get(cfg["architecture"], cfg["architecture"]))
    sae_cfg = SaeConfig(arch=arch, n_latents=cfg["d_sae"], k=cfg.get("k", min(32, cfg["d_sae"] - 1)))
    sae = SparseAutoencoder(sae_cfg, cfg["d_in"])
    with torch.no_grad():
        sae.W_enc.copy_(w["W_enc"].t())
        sae.b_enc.copy_(w["b_enc"])
        sae.W_dec.copy_(w["W_dec"])
        sae.b_dec.copy_(w["b_dec"])
        if arch == "jumprelu":
            sae.log_threshold.copy_(w["threshold"].log())
        if arch == "batchtopk":
            sae.threshold.fill_(float(w["threshold"][0]))
    return sae.eval(), cfg
