"""Crosscoder (acausal, Lindsey et al. 2024): one dictionary over S sites. Each latent reads all the
sites (its encoder row is S blocks of d) and writes a decoder of its own into each site; TopK picks
k latents per token over the concatenated input, and the loss sums the per-site FVUs.

    f    = TopK_k(relu((x - b_dec) W_enc^T + b_enc)),   x = [x_1 ... x_S]  (S d)
    x^   = f W_dec + b_dec                               (S d: x^_s is its s-th block)
    loss = sum_s FVU(x_s, x^_s) + aux_coef * FVU(x - x^, TopK_kaux over dead latents decoded)

On the vectors of S d it is TopK's: the same kernels, and the same two collectives per step under
feature parallelism however many sites there are (one selection; one sum of the partial decode,
which holds every site's block). A decoder row is kept at unit norm over all its blocks together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from sae_dist.archs import register
from sae_dist.archs.topk import TopK, TopKConfig

if TYPE_CHECKING:
    from sae_dist.sae import SparseAutoencoder


@dataclass
class CrosscoderConfig(TopKConfig):
    arch: str = "crosscoder"
    revive_after: float = 0.0
    """Revival is off for the crosscoder, as for the transcoders (TopKConfig.revive_after has what it
    does): on the default job's data (layers 2-4, n = 6144, batch 1024) FVU 0.1161 / 32.15% dead with it
    against 0.1157 / 29.07% without (docs/training.md, "Revival and the dictionaries across sites").
    sae.revive_after=16 turns it on."""


@register
class Crosscoder(TopK):
    name = "crosscoder"
    config = CrosscoderConfig
    saelens_architecture = "topk"  # on the concatenated sites; cfg.json lists them (export_meta)
    sites = 0

    @classmethod
    def width(cls, d_model: int, n_sites: int) -> int:
        return d_model * n_sites

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.reshape(x.shape[0], -1)
        return flat, flat

    def reconstruction_loss(self, sae: SparseAutoencoder, x: Tensor, target: Tensor, x_hat: Tensor
                            ) -> tuple[Tensor, dict[str, Tensor]]:
        """The per-site FVUs summed (x_hat holds every site's partial decode, summed at once); the
        logged fvu is their mean."""
        per_site = sae.fvu_sites(x, x_hat.view(x.shape))
        terms = {"fvu": per_site.mean().detach()} | {f"fvu_site{s}": v for s, v in enumerate(per_site.detach())}
        return per_site.sum(), terms
