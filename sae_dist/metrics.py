"""Held-out evaluation with the metric definitions of docs/design.md §2, used everywhere.

FVU = sum||x - x^||^2 / sum||x - mean(x)||^2 over all evaluated tokens (special tokens never reach the
SAE); L0 = mean active latents per token; dead fraction = latents that never fired on the whole set.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from sae_dist.sae import SparseAutoencoder


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, batches: Iterator[Tensor], scale: float, tokens: int) -> dict[str, float]:
    """Metrics over `tokens` held-out tokens of unscaled activations (moved to the SAE's device)."""
    device = sae.b_dec.device
    was_training = sae.training
    sae.eval()
    err = sum_x = sum_x2 = l0 = 0.0
    count = 0
    mean_acc: Tensor | None = None
    fired = torch.zeros(sae.n_local, dtype=torch.long, device=device)
    for x in batches:
        x = x[: tokens - count].to(device, non_blocking=True) * scale
        if x.shape[0] == 0:
            break
        vals, idx = sae.encode_sparse(x)
        x_hat = sae.decode_sparse(vals, idx)
        err += float((x - x_hat).double().pow(2).sum())
        sum_x2 += float(x.double().pow(2).sum())
        s = x.double().sum(0)
        mean_acc = s if mean_acc is None else mean_acc + s
        active = vals > 0
        l0 += float(sae.comm.sum_scalar(active.sum().float()))
        fired.index_add_(0, idx[active], torch.ones_like(idx[active]))
        count += x.shape[0]
        if count >= tokens:
            break
    sae.train(was_training)
    if count == 0 or mean_acc is None:
        raise RuntimeError("held-out evaluation got no tokens: the held-out source is empty")
    sum_x = float(mean_acc.pow(2).sum()) / count
    total_var = sum_x2 - sum_x
    dead = float(sae.comm.sum_scalar((fired == 0).sum().float()))
    freq = fired.float() / count
    return {
        "fvu": err / total_var,
        "mse": err / count / sae.d_model,
        "l0": l0 / count,
        "dead_fraction": dead / sae.n_latents,
        "dense_fraction": float(sae.comm.sum_scalar((freq > 0.1).sum().float())) / sae.n_latents,
        "tokens": float(count),
    }
