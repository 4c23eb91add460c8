"""The sparse autoencoder module: the parameters every family shares, and its architecture's hooks.

    pre = (x - b_dec) @ W_enc.T + b_enc      (n)
    f   = act(pre)                           the family's (sae_dist/archs: topk, batchtopk, ...)
    x^  = f @ W_dec + b_dec                  (d)

W_enc and W_dec are both (n_latents, d_model), one row per latent, so a feature-parallel shard is a
slice of rows. The module knows nothing of parallelism: every cross-shard step goes through
`self.comm` (`LocalComm` here; `sae_dist.parallel.apply_feature_parallel` swaps in a collective one).
What differs between families lives in `self.arch` (sae_dist/archs, docs/extending.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_dist import archs, kernels
from sae_dist.archs.base import SaeConfig, SaeOutput


class LocalComm:
    """All latents live in this module: selections are local and partial sums are whole."""

    n_shards = 1
    latent_offset = 0

    def select_topk(self, vals: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Row-wise top-k of local candidates -> (values, local ids); entries owned by other shards
        come back as value 0 at local id 0."""
        if vals.shape[1] == k:
            return vals, idx
        top, pos = vals.topk(k, dim=1)
        return top, idx.gather(1, pos)

    def select_batch_topk(self, vals: Tensor, idx: Tensor, total: int) -> tuple[Tensor, Tensor, bool]:
        """Top `total` over all rows' candidates: non-selected values become 0. Also says whether
        some row had every one of its candidates selected (the candidate list may be too short)."""
        flat = vals.reshape(-1)
        total = min(total, flat.numel())
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(total, sorted=False).indices] = True
        keep = keep.view_as(vals)
        saturated = bool(keep.all(dim=1).any())
        return vals * keep, idx, saturated

    def sum_partial(self, partial: Tensor) -> Tensor:
        """Sum of every shard's partial decode (B, d)."""
        return partial

    def sum_scalar(self, value: Tensor) -> Tensor:
        """Sum over shards of a per-shard statistic."""
        return value

    def min_scalar(self, value: Tensor) -> Tensor:
        """Minimum over shards of a per-shard statistic."""
        return value

    def min_over_shards(self, t: Tensor) -> Tensor:
        """Elementwise minimum over the feature shards of one data replica, outside autograd."""
        return t

    def sum_over_shards(self, t: Tensor) -> Tensor:
        """Sum over shards of a small per-shard tensor, outside autograd (Muon's Gram matrices)."""
        return t

    def shard_input(self, x: Tensor) -> Tensor:
        """The input every shard encodes: identity forward; backward sums its gradient over shards."""
        return x

    def mean_over_data(self, value: Tensor) -> Tensor:
        """Mean over data-parallel replicas of a per-replica statistic."""
        return value

    def data_variance(self, x: Tensor) -> Tensor:
        """sum ||x - mean(x)||^2 over the global batch divided by the number of data replicas: the
        FVU denominator that makes the replicas' mean loss the global batch's FVU. x (B, sites, d):
        one per site, (sites,)."""
        if x.dim() == 3:
            return (x - x.mean(dim=0)).pow(2).sum(dim=(0, 2))
        return (x - x.mean(dim=0)).pow(2).sum()


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum||x - x^||^2 / sum||x - mean(x)||^2 over the batch."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)


def init_directions(seed: int, start: int, stop: int, d_model: int, block: int = 4096) -> Tensor:
    """Unit rows [start, stop) of a random (n, d) matrix whose row blocks are seeded by (seed, block
    index): a shard builds only its own rows (plus at most two partial blocks), and every sharding of
    the same seed starts from the same dictionary."""
    rows = []
    for b in range(start // block, (stop - 1) // block + 1):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        W = torch.randn(block, d_model, generator=g)
        rows.append(W[max(start - b * block, 0) : min(stop - b * block, block)])
    W = torch.cat(rows)  # (stop - start, d)
    return W / W.norm(dim=1, keepdim=True)


class SparseAutoencoder(nn.Module):
    def __init__(
        self,
        cfg: SaeConfig,
        d_model: int,
        n_local: int | None = None,
        encoder_chunk: int = 8192,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        latent_offset: int = 0,
        d_out: int | None = None,
    ) -> None:
        """`generator` draws the n_local rows directly; `seed` instead builds rows [latent_offset,
        latent_offset + n_local) of the seed's whole dictionary (`init_directions`), as a feature
        shard does. `d_out`: the decoder's width where it differs from the encoder's d_model (a
        cross-layer transcoder writes into every layer); the encoder then starts from directions of
        its own instead of the decoder's transpose."""
        super().__init__()
        self.cfg = cfg
        family = archs.get(cfg.arch)
        if not isinstance(cfg, family.config):
            raise TypeError(
                f"sae.arch={cfg.arch} needs a {family.config.__name__}, got a {type(cfg).__name__}; build it with "
                "sae_dist.config.sae_config(arch=..., **fields)"
            )
        self.arch = family(cfg)
        self.d_model = d_model
        self.d_out = d_out or d_model
        self.n_latents = cfg.n_latents
        n = n_local if n_local is not None else cfg.n_latents
        self.encoder_chunk = encoder_chunk
        self.k_aux = getattr(cfg, "k_aux", 0) or d_model // 2
        self.comm: LocalComm = LocalComm()

        def directions(width: int, seed_shift: int) -> Tensor:
            if seed is not None:
                return init_directions(seed + seed_shift, latent_offset, latent_offset + n, width)
            W = torch.randn(n, width, generator=generator)
            return W / W.norm(dim=1, keepdim=True)

        W = directions(self.d_out, 0) * self.arch.decoder_init_scale
        self.W_dec = nn.Parameter(W)
        # the decoder's transpose (topk rescales it on the first batch), or directions of its own
        self.W_enc = nn.Parameter(W.clone() if self.d_out == d_model else directions(d_model, 1))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.arch.add_parameters(self, n)

    @property
    def n_local(self) -> int:
        return self.W_dec.shape[0]

    @property
    def unit_norm_decoder(self) -> bool:
        return self.arch.unit_norm_decoder

    def sharded_names(self) -> tuple[str, ...]:
        """Parameters split by latent rows across feature shards."""
        return ("W_enc", "W_dec", "b_enc", *self.arch.sharded)

    def replicated_names(self) -> tuple[str, ...]:
        """Parameters and buffers held whole on every feature shard."""
        return ("b_dec", *self.arch.replicated)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SaeOutput:
        """x (B, d) scaled activations; dead_mask (n_local,) latents that count as dead (AuxK)."""
        return self.arch.forward(self, x, dead_mask if self.arch.uses_dead_mask else None)

    def encode(self, x: Tensor) -> Tensor:
        """Dense (B, n_local) codes, for inspection and export tests on small dictionaries."""
        vals, idx = self.encode_sparse(x)
        return torch.zeros(x.shape[0], self.n_local, dtype=x.dtype, device=x.device).scatter_add_(1, idx, vals)

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, local ids) of the active latents, inference mode; zeros where a slot is unused."""
        return self.arch.encode_sparse(self, x)

    def decode(self, x: Tensor, vals: Tensor, idx: Tensor) -> Tensor:
        """The reconstruction of x's target from its codes (a skip-transcoder adds its linear skip)."""
        return self.arch.decode(self, x, vals, idx)

    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        return self.comm.sum_partial(kernels.sparse_decode(vals, idx, self.W_dec)) + self.b_dec

    def fvu_sites(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """(sites,) FVU of each site of x, x^ (B, sites, d), with the global batch's variances."""
        return (x - x_hat).pow(2).sum(dim=(0, 2)) / self.comm.data_variance(x).clamp_min(1e-12)

    def fvu(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """FVU with the global batch's variance (one replica: exactly `fvu`)."""
        return (x - x_hat).pow(2).sum() / self.comm.data_variance(x).clamp_min(1e-12)

    @torch.no_grad()
    def init_from_batch(self, x: Tensor) -> None:
        """b_dec to the mean over every data replica of the first batch's target (what the decoder
        reconstructs), then the family's own data-dependent start."""
        self.b_dec.copy_(self.comm.mean_over_data(self.arch.split(x)[1].mean(dim=0)))
        self.arch.init_from_batch(self, x)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each unit-norm decoder row (Gao et al.)."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        W, g = self.W_dec.detach(), self.W_dec.grad
        # row dot products (a batched matrix-vector product), then one fused update: no temporary as
        # large as W_dec (`g -= (g * W).sum(1) * W` made two, and half the time again)
        g.addcmul_(torch.einsum("ij,ij->i", g, W).unsqueeze(1), W, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
