"""Gated SAE (Rajamanoharan et al. 2024): a gate decides which latents fire, a magnitude path how
much, sharing the encoder directions (magnitudes rescale them by exp(r_mag)).

    pi_gate = (x - b_dec) W_enc^T + b_gate                          (b_gate is the b_enc parameter)
    pi_mag  = exp(r_mag) * ((x - b_dec) W_enc^T) + b_mag
    f       = H(pi_gate) * relu(pi_mag)
    loss    = FVU(x, f W_dec + b_dec) + l1_coef * sum relu(pi_gate) / d + FVU(x, relu(pi_gate) W_dec' + b_dec')

The last term (W_dec', b_dec' frozen: no gradient into the decoder) gives the gate a reconstruction
gradient that H cannot. Sparse path: every term needs only the entries with pi_gate > 0, which the
threshold kernel returns (threshold 0, no window). b_gate starts where each latent fires on about
init_l0 / n of the first batch's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_dist import kernels
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
class GatedConfig(SaeConfig):
    arch: str = "gated"
    l1_coef: float = 1.0
    """Weight of the L1 penalty on relu(pi_gate) (summed over latents, divided by d_model)."""
    init_l0: int = 128
    """Set b_gate so that each latent fires on init_l0 / n_latents of the first batch's tokens; 0
    starts at b_gate = 0 (about half of the latents fire at first)."""
    max_active: int = 8192
    """Most latents one token may have active on one feature shard (the sparse encoder's width)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.l1_coef >= 0, f"sae.l1_coef ({self.l1_coef}) must be >= 0")
        require(self.init_l0 >= 0, f"sae.init_l0 ({self.init_l0}) must be >= 0 (0 = b_gate starts at 0)")
        require(self.max_active >= 1, f"sae.max_active ({self.max_active}) must be >= 1")


@register
class Gated(Arch):
    name = "gated"
    config = GatedConfig
    saelens_architecture = "gated"
    sharded = ("r_mag", "b_mag")
    export_per_latent = ("r_mag", "b_mag")
    export_renames = {"b_enc": "b_gate"}

    def __init__(self, cfg: GatedConfig) -> None:
        super().__init__(cfg)
        self.encoder = ThresholdEncoder(cfg.max_active)

    def add_parameters(self, sae: SparseAutoencoder, n_local: int) -> None:
        sae.r_mag = nn.Parameter(torch.zeros(n_local))
        sae.b_mag = nn.Parameter(torch.zeros(n_local))

    @torch.no_grad()
    def init_from_batch(self, sae: SparseAutoencoder, x: Tensor) -> None:
        """b_gate = -(each latent's (init_l0 / n)-quantile of this batch), averaged over data replicas."""
        if not self.cfg.init_l0:
            return
        fires = math.ceil(x.shape[0] * self.cfg.init_l0 / sae.n_latents)
        sae.b_enc.zero_()
        sae.b_enc.copy_(sae.comm.mean_over_data(-per_latent_quantile(sae, x - sae.b_dec, fires)))

    def forward(self, sae: SparseAutoencoder, x: Tensor, dead_mask: Tensor | None) -> SaeOutput:
        xc = sae.comm.shard_input(x - sae.b_dec)
        zero = torch.zeros(sae.n_local, dtype=xc.dtype, device=xc.device)
        pi_gate, idx, valid = self.encoder(sae, xc, zero, 0.0)  # (B, c): entries with pi_gate > 0
        keep = valid.to(pi_gate.dtype)
        pi_mag = sae.r_mag[idx].exp() * (pi_gate - sae.b_enc[idx]) + sae.b_mag[idx]
        f = F.relu(pi_mag) * keep  # the gate is open on every kept entry
        x_hat = sae.decode_sparse(f, idx)
        recon = sae.fvu(x, x_hat)
        gate = F.relu(pi_gate) * keep
        l1 = sae.comm.sum_scalar(gate.sum(1).mean()) / sae.d_model
        frozen = sae.comm.sum_partial(kernels.sparse_decode(gate, idx, sae.W_dec.detach())) + sae.b_dec.detach()
        aux = sae.fvu(x, frozen)
        loss = recon + self.cfg.l1_coef * l1 + aux
        terms = {"fvu": recon.detach(), "l1": (self.cfg.l1_coef * l1).detach(), "gate_aux": aux.detach()}
        terms["l0"] = sae.comm.sum_scalar((f > 0).sum(dim=1).float().mean().detach())
        return SaeOutput(x_hat=x_hat, loss=loss, terms=terms, fired=fired_from_sparse(sae.n_local, f.detach(), idx))

    def encode_sparse(self, sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
        xc = sae.comm.shard_input(x - sae.b_dec)
        zero = torch.zeros(sae.n_local, dtype=xc.dtype, device=xc.device)
        pi_gate, idx, valid = self.encoder(sae, xc, zero, 0.0)
        pi_mag = sae.r_mag[idx].exp() * (pi_gate - sae.b_enc[idx]) + sae.b_mag[idx]
        return F.relu(pi_mag) * valid, idx

    def export_tensors(self, sae: SparseAutoencoder) -> dict[str, Tensor]:
        return {"r_mag": sae.r_mag, "b_mag": sae.b_mag}

    def load_exported(self, sae: SparseAutoencoder, tensors: dict[str, Tensor]) -> None:
        sae.r_mag.copy_(tensors["r_mag"])
        sae.b_mag.copy_(tensors["b_mag"])
