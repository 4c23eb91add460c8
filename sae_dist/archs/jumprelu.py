"""JumpReLU SAE (Rajamanoharan et al. 2024, Gemma Scope): a learned threshold per latent and an L0
penalty, trained with straight-through pseudo-derivatives for the thresholds.

    pre = (x - b_dec) W_enc^T + b_enc,   f = pre * H(pre - t),   t = exp(log_threshold)
    loss = FVU(x, f W_dec + b_dec) + l0_coef * sum_i H(pre_i - t_i)
    d/dt through H and the jump: -(1/eps) K((pre - t)/eps) and -(t/eps) K((pre - t)/eps), K = 1 on |u| < 1/2

Sparse path: only entries with pre > t - eps/2 carry a value or a gradient (those in the window below
t have f = 0 but a threshold gradient), so the kernel keeps exactly those per row; nothing of size
B x n exists in training. The thresholds start where each latent fires on about init_l0 / n of the
first batch's tokens, so the first steps are as sparse as the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sae_dist.archs import register
from sae_dist.archs.base import (
    Arch,
    SaeConfig,
    SaeOutput,
    ThresholdEncoder,
    fired_from_sparse,
    per_latent_quantile,
)
from sae_dist.errors import require

if TYPE_CHECKING:
    from sae_dist.sae import SparseAutoencoder


@dataclass
class JumpReluConfig(SaeConfig):
    arch: str = "jumprelu"
    l0_coef: float = 1e-3
    """Weight of the L0 penalty (per token, summed over latents)."""
    bandwidth: float = 1e-3
    """Kernel width eps of the straight-through estimator (Gemma Scope)."""
    threshold_init: float = 1e-3
    """Initial threshold of every latent when init_l0 is 0."""
    init_l0: int = 128
    """Set each latent's initial threshold so that it fires on init_l0 / n_latents of the first batch's
    tokens (L0 about init_l0 at step 0); 0 starts every threshold at threshold_init instead (dense at
    first: about half of the latents fire)."""
    max_active: int = 8192
    """Most latents one token may have active (or within the window) on one feature shard; the sparse
    encoder's buffer is batch x this at worst."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.bandwidth > 0, f"sae.bandwidth ({self.bandwidth}) must be > 0; use 1e-3")
        require(self.threshold_init > 0, f"sae.threshold_init ({self.threshold_init}) must be > 0; use 1e-3")
        require(self.l0_coef >= 0, f"sae.l0_coef ({self.l0_coef}) must be >= 0")
        require(self.init_l0 >= 0, f"sae.init_l0 ({self.init_l0}) must be >= 0 (0 = threshold_init)")
        require(self.max_active >= 1, f"sae.max_active ({self.max_active}) must be >= 1")


class JumpReluFn(torch.autograd.Function):
    """f = pre * H(pre - t), elementwise (t broadcast to pre's shape by the caller)."""

    @staticmethod
    def forward(ctx, pre, t, eps):  # type: ignore[override]
        ctx.save_for_backward(pre, t)
        ctx.eps = eps
        return pre * (pre > t)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, t = ctx.saved_tensors
        window = ((pre - t).abs() < ctx.eps / 2).to(pre.dtype)
        return grad * (pre > t), -(t / ctx.eps) * window * grad, None


class StepFn(torch.autograd.Function):
    """H(pre - t), elementwise; pseudo-derivative -(1/eps) K for t, none for pre."""

    @staticmethod
    def forward(ctx, pre, t, eps):  # type: ignore[override]
        ctx.save_for_backward(pre, t)
        ctx.eps = eps
        return (pre > t).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, t = ctx.saved_tensors
        window = ((pre - t).abs() < ctx.eps / 2).to(pre.dtype)
        return None, -(1.0 / ctx.eps) * window * grad, None


@register
class JumpRelu(Arch):
    name = "jumprelu"
    config = JumpReluConfig
    saelens_architecture = "jumprelu"
    sharded = ("log_threshold",)
    export_per_latent = ("threshold",)

    def __init__(self, cfg: JumpReluConfig) -> None:
        super().__init__(cfg)
        self.encoder = ThresholdEncoder(cfg.max_active)

    def add_parameters(self, sae: SparseAutoencoder, n_local: int) -> None:
        sae.log_threshold = nn.Parameter(torch.full((n_local,), math.log(self.cfg.threshold_init)))

    @torch.no_grad()
    def init_from_batch(self, sae: SparseAutoencoder, x: Tensor) -> None:
        """Thresholds at each latent's (init_l0 / n)-quantile of this batch, averaged over data replicas."""
        if not self.cfg.init_l0:
            return
        fires = math.ceil(x.shape[0] * self.cfg.init_l0 / sae.n_latents)
        t = per_latent_quantile(sae, x - sae.b_dec, fires).clamp_min(self.cfg.threshold_init)
        sae.log_threshold.copy_(sae.comm.mean_over_data(t.log()))

    def forward(self, sae: SparseAutoencoder, x: Tensor, dead_mask: Tensor | None) -> SaeOutput:
        eps = self.cfg.bandwidth
        t = sae.log_threshold.exp()  # (n_local,)
        pre, idx, valid = self.encoder(sae, sae.comm.shard_input(x - sae.b_dec), t.detach(), eps / 2)
        tq = t[idx]  # (B, c), gradient gathered back into log_threshold
        keep = valid.to(pre.dtype)
        f = JumpReluFn.apply(pre, tq, eps) * keep  # (B, c)
        x_hat = sae.decode_sparse(f, idx)
        recon = sae.fvu(x, x_hat)
        l0 = sae.comm.sum_scalar((StepFn.apply(pre, tq, eps) * keep).sum(1).mean())
        loss = recon + self.cfg.l0_coef * l0
        terms = {"fvu": recon.detach(), "l0_penalty": (self.cfg.l0_coef * l0).detach()}
        terms["l0"] = sae.comm.sum_scalar((f > 0).sum(dim=1).float().mean().detach())
        return SaeOutput(x_hat=x_hat, loss=loss, terms=terms, fired=fired_from_sparse(sae.n_local, f.detach(), idx))

    def encode_sparse(self, sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
        t = sae.log_threshold.detach().exp()
        pre, idx, valid = self.encoder(sae, sae.comm.shard_input(x - sae.b_dec), t, 0.0)
        return pre * valid, idx

    def export_tensors(self, sae: SparseAutoencoder) -> dict[str, Tensor]:
        return {"threshold": sae.log_threshold.exp()}

    def load_exported(self, sae: SparseAutoencoder, tensors: dict[str, Tensor]) -> None:
        sae.log_threshold.copy_(tensors["threshold"].log())
