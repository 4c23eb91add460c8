"""The sparse autoencoder (DESIGN §2): TopK + AuxK, BatchTopK, JumpReLU and ReLU + L1.

    pre = (x - b_dec) @ W_enc.T + b_enc      (n)
    f   = act(pre)
    x^  = f @ W_dec + b_dec                  (d)

W_enc and W_dec are both (n_latents, d_model), one row per latent, so a feature-parallel shard is a
slice of rows. The module knows nothing of parallelism: every cross-shard step goes through
`self.comm` (`LocalComm` here; `sae_dist.parallel.apply_feature_parallel` swaps in a collective one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_dist import kernels
from sae_dist.config import SaeConfig


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

    def shard_input(self, x: Tensor) -> Tensor:
        """The input every shard encodes: identity forward; backward sums its gradient over shards."""
        return x

    def mean_over_data(self, value: Tensor) -> Tensor:
        """Mean over data-parallel replicas of a per-replica statistic."""
        return value

    def data_variance(self, x: Tensor) -> Tensor:
        """sum ||x - mean(x)||^2 over the global batch divided by the number of data replicas: the
        FVU denominator that makes the replicas' mean loss the global batch's FVU."""
        return (x - x.mean(dim=0)).pow(2).sum()


@dataclass
class SaeOutput:
    x_hat: Tensor
    """(B, d) reconstruction."""
    loss: Tensor
    """Scalar training loss (identical on every feature shard)."""
    terms: dict[str, Tensor] = field(default_factory=dict)
    """Loss terms and batch statistics, detached scalars."""
    fired: Tensor | None = None
    """(n_local,) bool: latents of this shard that fired on the batch."""


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


class _JumpReLU(torch.autograd.Function):
    """f = pre * H(pre - t) with Gemma Scope's straight-through pseudo-derivative for t."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(pre.dtype)
        grad_t = -(threshold / eps) * window * grad
        return grad * (pre > threshold), grad_t.sum(0), None


class _StepL0(torch.autograd.Function):
    """H(pre - t) with the pseudo-derivative -1/eps * K((pre - t)/eps) for t, zero for pre."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(pre.dtype)
        return None, (-(1.0 / eps) * window * grad).sum(0), None


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
    ) -> None:
        """`generator` draws the n_local rows directly; `seed` instead builds rows [latent_offset,
        latent_offset + n_local) of the seed's whole dictionary (`init_directions`), as a feature
        shard does."""
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model
        self.n_latents = cfg.n_latents
        n = n_local if n_local is not None else cfg.n_latents
        self.encoder_chunk = encoder_chunk
        self.k_aux = cfg.k_aux or d_model // 2
        self.comm: LocalComm = LocalComm()
        if seed is not None:
            W = init_directions(seed, latent_offset, latent_offset + n, d_model)
        else:
            W = torch.randn(n, d_model, generator=generator)
            W = W / W.norm(dim=1, keepdim=True)
        if cfg.arch == "relu":
            W = W * 0.1
        self.W_dec = nn.Parameter(W)
        self.W_enc = nn.Parameter(W.clone())  # encoder initialised as the decoder's transpose
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        if cfg.arch == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n,), math.log(cfg.jumprelu_threshold_init)))
        if cfg.arch == "batchtopk":
            self.register_buffer("threshold", torch.tensor(-1.0))

    @property
    def n_local(self) -> int:
        return self.W_dec.shape[0]

    @property
    def unit_norm_decoder(self) -> bool:
        return self.cfg.arch != "relu"

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SaeOutput:
        """x (B, d) scaled activations; dead_mask (n_local,) latents that count as dead for AuxK."""
        if self.cfg.arch == "topk":
            return self._forward_topk(x, dead_mask)
        if self.cfg.arch == "batchtopk":
            return self._forward_batchtopk(x)
        return self._forward_dense(x)

    def encode(self, x: Tensor) -> Tensor:
        """Dense (B, n_local) codes, for inspection and export tests on small dictionaries."""
        vals, idx = self.encode_sparse(x)
        return torch.zeros(x.shape[0], self.n_local, dtype=x.dtype, device=x.device).scatter_add_(1, idx, vals)

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, local ids) of the active latents, inference mode (BatchTopK uses its threshold)."""
        xc = self.comm.shard_input(x - self.b_dec)
        arch = self.cfg.arch
        if arch == "topk" or (arch == "batchtopk" and self.threshold < 0):
            vals, idx, _, _ = kernels.topk_encode(xc, self.W_enc, self.b_enc, self.cfg.k, self.encoder_chunk)
            vals, idx = self.comm.select_topk(vals, idx, self.cfg.k)
            return F.relu(vals), idx
        if arch == "batchtopk":
            width = min(self.n_local, 4 * self.cfg.k)
            vals, idx, _, _ = kernels.topk_encode(xc, self.W_enc, self.b_enc, width, self.encoder_chunk)
            return vals * (vals > self.threshold), idx
        f = self._dense_acts(xc @ self.W_enc.t() + self.b_enc)  # (B, n_local)
        vals, idx = f.topk(min(self.n_local, max(1, int((f > 0).sum(1).max()))), dim=1)
        return vals, idx

    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        return self.comm.sum_partial(kernels.sparse_decode(vals, idx, self.W_dec)) + self.b_dec

    def _fvu(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """FVU with the global batch's variance (one replica: exactly `fvu`)."""
        return (x - x_hat).pow(2).sum() / self.comm.data_variance(x).clamp_min(1e-12)

    def _forward_topk(self, x: Tensor, dead_mask: Tensor | None) -> SaeOutput:
        cfg = self.cfg
        xc = self.comm.shard_input(x - self.b_dec)
        total_dead = self.comm.sum_scalar(dead_mask.sum().float()) if dead_mask is not None else None
        use_aux = total_dead is not None and bool(total_dead > 0)
        k_aux = min(self.k_aux, self.n_local)
        cand, cand_idx, aux, aux_idx = kernels.topk_encode(
            xc, self.W_enc, self.b_enc, cfg.k, self.encoder_chunk, dead_mask if use_aux else None, k_aux
        )
        vals, idx = self.comm.select_topk(cand, cand_idx, cfg.k)
        vals = F.relu(vals)  # (B, k)
        x_hat = self.decode_sparse(vals, idx)
        loss = self._fvu(x, x_hat)
        terms = {"fvu": loss.detach()}
        if use_aux:
            assert total_dead is not None
            k_aux_global = int(min(self.k_aux, total_dead))
            aux = aux.masked_fill(~torch.isfinite(aux), 0.0)
            a_vals, a_idx = self.comm.select_topk(aux, aux_idx, min(k_aux_global, aux.shape[1] * self.comm.n_shards))
            residual = (x - x_hat).detach()
            e_hat = self.comm.sum_partial(kernels.sparse_decode(F.relu(a_vals), a_idx, self.W_dec))
            aux_loss = self._fvu(residual, e_hat).nan_to_num(0.0)
            scale = min(1.0, float(total_dead) / self.k_aux)
            loss = loss + cfg.aux_coef * scale * aux_loss
            terms["auxk"] = aux_loss.detach()
        fired = self._fired_sparse(vals, idx)
        terms["l0"] = self.comm.sum_scalar((vals > 0).sum(dim=1).float().mean())
        return SaeOutput(x_hat=x_hat, loss=loss, terms=terms, fired=fired)

    def _forward_batchtopk(self, x: Tensor) -> SaeOutput:
        cfg = self.cfg
        xc = self.comm.shard_input(x - self.b_dec)
        if not self.training and self.threshold >= 0:
            vals, idx = self.encode_sparse(x)
        else:
            width = min(self.n_local, 4 * cfg.k)
            while True:
                cand, idx, _, _ = kernels.topk_encode(xc, self.W_enc, self.b_enc, width, self.encoder_chunk)
                vals, idx, saturated = self.comm.select_batch_topk(cand, idx, x.shape[0] * cfg.k)
                if not saturated or width >= self.n_local:
                    break
                width = min(self.n_local, 2 * width)  # a row wanted more than its candidates: widen
            vals = F.relu(vals)
            if self.training:
                with torch.no_grad():
                    positive = vals[vals > 0]
                    low = positive.min() if positive.numel() else vals.new_tensor(float("inf"))
                    low = self.comm.min_scalar(low)
                    t = self.threshold
                    if torch.isfinite(low):  # a batch where nothing fired says nothing about the threshold
                        self.threshold.copy_(torch.where(t < 0, low, 0.99 * t + 0.01 * low))
        x_hat = self.decode_sparse(vals, idx)
        loss = self._fvu(x, x_hat)
        terms = {"fvu": loss.detach(), "l0": self.comm.sum_scalar((vals > 0).sum(dim=1).float().mean())}
        return SaeOutput(x_hat=x_hat, loss=loss, terms=terms, fired=self._fired_sparse(vals, idx))

    def _dense_acts(self, pre: Tensor) -> Tensor:
        if self.cfg.arch == "jumprelu":
            return _JumpReLU.apply(pre, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)
        return F.relu(pre)

    def _forward_dense(self, x: Tensor) -> SaeOutput:
        cfg = self.cfg
        pre = self.comm.shard_input(x - self.b_dec) @ self.W_enc.t() + self.b_enc  # (B, n_local)
        f = self._dense_acts(pre)
        x_hat = self.comm.sum_partial(f @ self.W_dec) + self.b_dec
        recon = self._fvu(x, x_hat)
        terms = {"fvu": recon.detach()}
        if cfg.arch == "jumprelu":
            l0 = _StepL0.apply(pre, self.log_threshold.exp(), cfg.jumprelu_bandwidth).sum(1).mean()
            sparsity = cfg.l0_coef * self.comm.sum_scalar(l0)
            terms["l0_penalty"] = sparsity.detach()
        else:
            l1 = (f * self.W_dec.norm(dim=1)).sum(1).mean() / self.d_model
            sparsity = cfg.l1_coef * self.comm.sum_scalar(l1)
            terms["l1"] = sparsity.detach()
        terms["l0"] = self.comm.sum_scalar((f > 0).sum(dim=1).float().mean().detach())
        return SaeOutput(x_hat=x_hat, loss=recon + sparsity, terms=terms, fired=(f > 0).any(dim=0))

    def _fired_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        fired = torch.zeros(self.n_local, dtype=torch.bool, device=vals.device)
        fired[idx[vals > 0]] = True
        return fired

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each unit-norm decoder row (Gao et al.)."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        W, g = self.W_dec, self.W_dec.grad
        g -= (g * W).sum(dim=1, keepdim=True) * W

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
