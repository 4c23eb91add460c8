"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): the dictionary's first m_1 < m_2
< ... < m_P = n latents each reconstruct on their own, so early latents learn general features and
later ones refine them instead of absorbing them.

    selection: BatchTopK over all n latents (one selection, as in BatchTopK)
    x^_i = b_dec + sum of the selected latents with id < m_i       for each prefix i
    loss = mean_i FVU(x, x^_i) + aux_coef * AuxK(x - x^_P)

Prefixes are global latent ids, so under feature parallelism they span shards: each shard decodes its
selected latents into P buckets (latents in [m_{i-1}, m_i)), the (P, B, d) stack is summed over shards
in one collective whatever P is, and a cumulative sum over buckets gives every prefix's reconstruction.
At inference it is a BatchTopK SAE (one threshold), exported as a JumpReLU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sae_dist import kernels
from sae_dist.archs import register
from sae_dist.archs.base import SaeOutput
from sae_dist.archs.batchtopk import BatchTopK, BatchTopKConfig
from sae_dist.errors import require

if TYPE_CHECKING:
    from sae_dist.sae import SparseAutoencoder


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    arch: str = "matryoshka"
    prefixes: list[int] = field(default_factory=list)
    """Nested dictionary sizes m_1 < ... < m_P = n_latents; empty = a geometric ladder of n_prefixes
    sizes, each prefix_ratio times the last, ending at n_latents."""
    n_prefixes: int = 4
    """Number of prefixes in the default ladder."""
    prefix_ratio: int = 4
    """Growth from one prefix to the next in the default ladder."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.n_prefixes >= 1, f"sae.n_prefixes ({self.n_prefixes}) must be >= 1")
        require(self.prefix_ratio >= 2, f"sae.prefix_ratio ({self.prefix_ratio}) must be >= 2")
        p = self.prefix_sizes()
        require(
            all(a < b for a, b in zip(p, p[1:])) and p[0] >= 1 and p[-1] == self.n_latents,
            f"sae.prefixes ({p}) must rise strictly from >= 1 to sae.n_latents ({self.n_latents}); e.g. "
            f"[{self.n_latents // 16}, {self.n_latents // 4}, {self.n_latents}]",
        )

    def prefix_sizes(self) -> list[int]:
        if self.prefixes:
            return list(self.prefixes)
        sizes = [self.n_latents // self.prefix_ratio**i for i in range(self.n_prefixes)]
        return sorted({s for s in sizes if s >= 1})


@register
class Matryoshka(BatchTopK):
    name = "matryoshka"
    config = MatryoshkaConfig

    def forward(self, sae: SparseAutoencoder, x: Tensor, dead_mask: Tensor | None) -> SaeOutput:
        vals, idx, aux = self.pick(sae, x, dead_mask)
        bounds = torch.tensor(self.cfg.prefix_sizes()[:-1], device=idx.device)
        bucket = torch.bucketize(idx + sae.comm.latent_offset, bounds, right=True)  # (B, c) prefix of each id
        parts = torch.stack(
            [kernels.sparse_decode(vals * (bucket == i), idx, sae.W_dec) for i in range(len(bounds) + 1)]
        )  # (P, B, d) this shard's decode per bucket
        prefix_hats = sae.comm.sum_partial(parts).cumsum(0) + sae.b_dec  # (P, B, d), one collective
        fvus = torch.stack([sae.fvu(x, h) for h in prefix_hats])  # (P,)
        terms = {"fvu": fvus[-1].detach(), "fvu_prefix0": fvus[0].detach()}
        return self.finish(sae, x, prefix_hats[-1], fvus.mean(), terms, vals, idx, aux)

    def export_fields(self) -> dict:
        return {"matryoshka_prefixes": self.cfg.prefix_sizes()}

    @classmethod
    def config_from_export(cls, cfg: dict) -> dict:
        return {"prefixes": cfg["matryoshka_prefixes"]}
