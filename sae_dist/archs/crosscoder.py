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

import torch.nn.functional as F
from torch import Tensor

from sae_dist.archs import register
from sae_dist.archs.base import SaeOutput, fired_from_sparse
from sae_dist.archs.topk import TopK, TopKConfig, auxk_loss, encode_with_aux

if TYPE_CHECKING:
    from sae_dist.sae import SparseAutoencoder


@dataclass
class CrosscoderConfig(TopKConfig):
    arch: str = "crosscoder"


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

    def init_from_batch(self, sae: SparseAutoencoder, x: Tensor) -> None:
        super().init_from_batch(sae, x.reshape(x.shape[0], -1))

    def forward(self, sae: SparseAutoencoder, x: Tensor, dead_mask: Tensor | None) -> SaeOutput:
        cfg = self.cfg
        B, S, d = x.shape
        flat = x.reshape(B, S * d)
        cand, ids, aux, aux_ids, total_dead = encode_with_aux(sae, sae.comm.shard_input(flat - sae.b_dec), cfg.k,
                                                              dead_mask)
        vals, idx = sae.comm.select_topk(cand, ids, cfg.k)
        vals = F.relu(vals)
        x_hat = sae.decode_sparse(vals, idx)  # (B, S d): every site's partial decode summed at once
        per_site = sae.fvu_sites(x, x_hat.view(B, S, d))
        loss = per_site.sum()
        terms = {"fvu": per_site.mean().detach()} | {f"fvu_site{s}": v for s, v in enumerate(per_site.detach())}
        if total_dead is not None:
            aux_loss = auxk_loss(sae, flat, x_hat, aux, aux_ids, total_dead)
            loss = loss + cfg.aux_coef * aux_loss
            terms["auxk"] = aux_loss.detach()
        terms["l0"] = sae.comm.sum_scalar((vals > 0).sum(dim=1).float().mean())
        return SaeOutput(x_hat=x_hat, loss=loss, terms=terms, fired=fired_from_sparse(sae.n_local, vals, idx))

    def encode_sparse(self, sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
        return super().encode_sparse(sae, x.reshape(x.shape[0], -1))
