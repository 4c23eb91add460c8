"""A cross-layer transcoder in the file layout of the public circuit-tracing tools (circuit-tracer's
`load_clt`), written from a run's export, and read back.

The layout is a folder with two safetensors files per layer l of L:

    W_enc_{l}.safetensors   W_enc_{l} (m, d)   b_enc_{l} (m,)   b_dec_{l} (d,)
    W_dec_{l}.safetensors   W_dec_{l} (m, L - l, d): latent i of layer l writing into layers l..L-1

with m = n / L latents per layer, tensors in float32 on raw activations (the training scale folded in,
as in the SAELens export), plus `clt_config.json`: the per-layer top-k, the sites, the model, and the
map back to this project's latent ids. Our CLT numbers its latents interleaved (latent j belongs to
layer j mod L, `sae_dist.archs.clt`); in this layout latent i of layer l is our latent i L + l.

The activation: our CLT keeps the k largest pre-activations of each layer per token (then the ReLU).
circuit-tracer's loader of this layout applies a plain ReLU (or a JumpReLU where `threshold_{l}` is
present) to every latent, so its reconstructions from these files match ours only after the per-layer
top-k that `clt_config.json` records (`activation: topk`, `k`); `reconstruct` here applies it.
circuit-tracer 0.5.0's own `load_clt` reads these folders and, with that top-k, reconstructs as we do
(tests/test_peer_metrics.py, in the peer venv).
Tensors only, never pickles: safetensors and JSON.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from sae_dist.errors import ConfigError
from sae_dist.export import WEIGHTS

CONFIG = "clt_config.json"


def write_circuit_tracer(export_dir: str, out_dir: str) -> dict[str, Any]:
    """Writes the CLT exported in `export_dir` (a run's sae/ folder) into `out_dir` in circuit-tracer's
    layout -> the written clt_config.json."""
    with open(os.path.join(export_dir, "cfg.json")) as fh:
        cfg = json.load(fh)
    if cfg.get("sae_dist_arch") != "clt":
        raise ConfigError(f"{export_dir} holds a {cfg.get('sae_dist_arch', cfg.get('architecture'))!r} export; the "
                          "circuit-tracer layout is for cross-layer transcoders (sae=clt)")
    d, n = cfg["d_in"], cfg["d_sae"]
    L = cfg["d_out"] // d if "d_out" in cfg else 1
    m = n // L
    os.makedirs(out_dir, exist_ok=True)
    with safe_open(os.path.join(export_dir, WEIGHTS), framework="pt") as f:
        W_enc, b_enc, W_dec, b_dec = (f.get_tensor(name) for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    for layer in range(L):
        ids = torch.arange(layer, n, L)  # this layer's latents, in our numbering
        save_file({f"W_enc_{layer}": W_enc[:, ids].t().contiguous(), f"b_enc_{layer}": b_enc[ids].contiguous(),
                   f"b_dec_{layer}": b_dec[layer * d:(layer + 1) * d].contiguous()},
                  os.path.join(out_dir, f"W_enc_{layer}.safetensors"))
        save_file({f"W_dec_{layer}": W_dec[ids].view(m, L, d)[:, layer:].contiguous()},
                  os.path.join(out_dir, f"W_dec_{layer}.safetensors"))
    sites = cfg.get("sites") or []
    meta = {
        "n_layers": L, "d_model": d, "d_transcoder": m, "activation": "topk", "k": cfg["k"],
        "latent_id": "ours = i * n_layers + layer for latent i of layer `layer`",
        "model_name": cfg.get("model_name"), "feature_input_hook": sites[:L], "feature_output_hook": sites[L:],
        "sae_dist_scale": cfg.get("sae_dist_scale"), "source": os.path.abspath(export_dir),
    }
    with open(os.path.join(out_dir, CONFIG), "w") as fh:
        json.dump(meta, fh, indent=1)
    return meta


def read_layers(path: str) -> tuple[dict[str, Any], list[dict[str, Tensor]]]:
    """(clt_config.json, per layer {W_enc, b_enc, b_dec, W_dec}) of a folder in circuit-tracer's layout."""
    with open(os.path.join(path, CONFIG)) as fh:
        meta = json.load(fh)
    layers = []
    for layer in range(meta["n_layers"]):
        t: dict[str, Tensor] = {}
        for kind in ("enc", "dec"):
            with safe_open(os.path.join(path, f"W_{kind}_{layer}.safetensors"), framework="pt") as f:
                t |= {name.rsplit("_", 1)[0]: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        layers.append(t)
    return meta, layers


def reconstruct(path: str, x_in: Tensor) -> Tensor:
    """The layout's own semantics, written from the files alone: x_in (B, L, d), the L layers' inputs,
    -> (B, L, d), each layer's MLP output as the CLT predicts it (per-layer top-k, then ReLU)."""
    meta, layers = read_layers(path)
    L, k = meta["n_layers"], meta["k"]
    out = torch.stack([layers[m]["b_dec"] for m in range(L)]).expand(x_in.shape[0], L, -1).clone()
    for layer, t in enumerate(layers):
        pre = x_in[:, layer] @ t["W_enc"].t() + t["b_enc"]
        top = pre.topk(k, dim=1)
        f = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        out[:, layer:] += torch.einsum("bm,mld->bld", f, t["W_dec"])
    return out


def load_circuit_tracer(path: str) -> tuple[Any, dict[str, Any]]:
    """A folder in circuit-tracer's layout as our CLT (a SparseAutoencoder on raw activations) -> (sae,
    clt_config). The inverse of `write_circuit_tracer`: the export it came from, latent for latent."""
    from sae_dist import archs
    from sae_dist.sae import SparseAutoencoder

    meta, layers = read_layers(path)
    L, d, m = meta["n_layers"], meta["d_model"], meta["d_transcoder"]
    sae = SparseAutoencoder(archs.build_config({"arch": "clt", "n_latents": m * L, "k": meta["k"]}), d, d_out=L * d)
    W_dec = torch.zeros(m, L, L, d)  # (latent i, its layer, target layer, d)
    with torch.no_grad():
        for layer, t in enumerate(layers):
            sae.W_enc.view(m, L, d)[:, layer] = t["W_enc"]
            sae.b_enc.view(m, L)[:, layer] = t["b_enc"]
            sae.b_dec[layer * d:(layer + 1) * d] = t["b_dec"]
            W_dec[:, layer, layer:] = t["W_dec"]
        sae.W_dec.copy_(W_dec.view(m * L, L * d))
    return sae.eval(), meta


__all__ = ["load_circuit_tracer", "reconstruct", "write_circuit_tracer"]
