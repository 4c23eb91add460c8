"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, April 2024 update), with
resampling of dead latents (Anthropic 2023). Dense: the encoder makes a (B, n_local) matrix, so it is
for small dictionaries and baselines.

    f = relu((x - b_dec) W_enc^T + b_enc),   loss = FVU(x, f W_dec + b_dec) + l1_coef * sum_i f_i ||W_dec,i|| / d
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

from sae_dist.archs import register
from sae_dist.archs.base import Arch, SaeConfig, SaeOutput
from sae_dist.errors import require

if TYPE_CHECKING:
    from sae_dist.config import Config
    from sae_dist.sae import SparseAutoencoder


@dataclass
class ReluConfig(SaeConfig):
    arch: str = "relu"
    l1_coef: float = 5.0
    """L1 weight on f_i * ||W_dec,i|| (Anthropic, April 2024 update)."""
    resample_every: int = 0
    """Resample dead latents every N steps (0 = never; Anthropic 2023)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.l1_coef >= 0, f"sae.l1_coef ({self.l1_coef}) must be >= 0")
        require(self.resample_every >= 0, f"sae.resample_every ({self.resample_every}) must be >= 0 (0 = never)")


@register
class Relu(Arch):
    name = "relu"
    config = ReluConfig
    saelens_architecture = "standard"
    unit_norm_decoder = False
    sparse = False
    decoder_init_scale = 0.1

    @property
    def resample_every(self) -> int:
        return self.cfg.resample_every

    def forward(self, sae: SparseAutoencoder, x: Tensor, dead_mask: Tensor | None) -> SaeOutput:
        pre = sae.comm.shard_input(x - sae.b_dec) @ sae.W_enc.t() + sae.b_enc  # (B, n_local)
        f = F.relu(pre)
        x_hat = sae.comm.sum_partial(f @ sae.W_dec) + sae.b_dec
        recon = sae.fvu(x, x_hat)
        l1 = sae.comm.sum_scalar((f * sae.W_dec.norm(dim=1)).sum(1).mean() / sae.d_model)
        terms = {"fvu": recon.detach(), "l1": (self.cfg.l1_coef * l1).detach()}
        terms["l0"] = sae.comm.sum_scalar((f > 0).sum(dim=1).float().mean().detach())
        return SaeOutput(x_hat=x_hat, loss=recon + self.cfg.l1_coef * l1, terms=terms, fired=(f > 0).any(dim=0))

    def encode_sparse(self, sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
        f = F.relu(sae.comm.shard_input(x - sae.b_dec) @ sae.W_enc.t() + sae.b_enc)  # (B, n_local)
        return f.topk(min(sae.n_local, max(1, int((f > 0).sum(1).max()))), dim=1)

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        every = cfg.sae.resample_every  # type: ignore[attr-defined]
        require(
            not (every and cfg.parallel.dp > 1),
            f"sae.resample_every ({every}) with parallel.dp ({cfg.parallel.dp}) > 1 is not supported: "
            "replicas would resample from different batches; set sae.resample_every=0 or parallel.dp=1",
        )
        require(
            not (every and cfg.parallel.engine == "deepspeed"),
            f"sae.resample_every ({every}) resets per-latent Adam state, which ZeRO partitions "
            f"(parallel.engine={cfg.parallel.engine}); set parallel.engine=torch or sae.resample_every=0",
        )
