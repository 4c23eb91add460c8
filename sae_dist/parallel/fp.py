"""Feature parallelism (docs/design.md §3): each fp rank holds a contiguous slice of latents.

    sae = SparseAutoencoder(cfg.sae, d)           # whole (sliced here), or built with n_local rows
    apply_feature_parallel(sae, mesh)             # slices rows, installs FeatureParallelComm

Collectives per TopK + AuxK training step, whatever n_latents: one all-gather of candidates and one
all-reduce of the partial decode per selection (top-k, then AuxK), one all-reduce of the encoder-input
gradient in backward, and small scalar all-reduces (dead count, L0, gradient norm); trainer.optimizer=muon
adds 5 all-reduces of a (2, d, d) tensor, the encoder's and decoder's Gram matrices (sae_dist/optim.py).
Selections are exact: the global top-k of a row lies in the union of the shards' local top-k's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sae_dist.parallel.dims import Mesh
from sae_dist.sae import LocalComm, SparseAutoencoder


def all_gather_into(out: Tensor, t: Tensor, group: Any) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, t, group=group)


class _SumForward(torch.autograd.Function):
    """Sum over the group; identity backward: whatever consumes the sum is replicated on every rank, so
    each rank's own term already receives the whole gradient."""

    @staticmethod
    def forward(ctx, t, group):  # type: ignore[override]
        out = t.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


class _SumBackward(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group: every shard encodes the same input
    but its encoder contributes only its own latents' share of the input's gradient."""

    @staticmethod
    def forward(ctx, t, group):  # type: ignore[override]
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def _as_int(t: Tensor) -> Tensor:
    return t.view({4: torch.int32, 8: torch.int64}[t.element_size()])


class FeatureParallelComm(LocalComm):
    """The SAE's cross-shard steps as collectives over the fp axis (and the dp axis for batch stats).
    With fp = 1 (data parallelism only) the shard steps are LocalComm's and only the dp ones remain."""

    def __init__(self, mesh: Mesh) -> None:
        self.n_shards = mesh.fp
        self.shard = mesh.fp_rank
        self.latent_offset = mesh.latent_offset
        self.n_data = mesh.dp
        self.fp_group = mesh.group("fp")
        self.dp_group = mesh.group("dp")
        self.world_group = mesh.world_group

    def _gather_candidates(self, vals: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """One all-gather of every shard's (B, c) candidates -> values and global ids (B, P * c),
        shard-major. Values travel bit-exact next to the ids in one integer tensor."""
        B, c = vals.shape
        wide = vals.detach().float() if vals.element_size() < 4 else vals.detach()
        packed = torch.cat([_as_int(wide), (idx + self.latent_offset).to(_as_int(wide).dtype)], dim=1)
        out = packed.new_empty(self.n_shards * B, 2 * c)
        all_gather_into(out, packed.contiguous(), self.fp_group)
        out = out.view(self.n_shards, B, 2 * c).transpose(0, 1)  # (B, P, 2c)
        all_vals = out[..., :c].reshape(B, -1).contiguous().view(wide.dtype)  # (B, P * c)
        all_ids = out[..., c:].reshape(B, -1).long()  # (B, P * c)
        return all_vals, all_ids

    def select_topk(self, vals: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if self.fp_group is None:
            return super().select_topk(vals, idx, k)
        c = vals.shape[1]
        all_vals, all_ids = self._gather_candidates(vals, idx)
        top, pos = all_vals.topk(k, dim=1)  # (B, k) the exact global top-k, same on every shard
        mine = pos // c == self.shard
        own = vals.gather(1, pos % c)  # autograd reaches this shard's candidates only
        out_vals = torch.where(mine, own, torch.zeros_like(own))
        out_idx = torch.where(mine, all_ids.gather(1, pos) - self.latent_offset, torch.zeros_like(pos))
        return out_vals, out_idx

    def select_batch_topk(self, vals: Tensor, idx: Tensor, total: int) -> tuple[Tensor, Tensor, bool]:
        if self.fp_group is None:
            return super().select_batch_topk(vals, idx, total)
        B, c = vals.shape
        all_vals, _ = self._gather_candidates(vals, idx)
        flat = all_vals.reshape(-1)
        total = min(total, flat.numel())
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(total, sorted=False).indices] = True
        keep = keep.view(B, self.n_shards, c)
        saturated = bool(keep.all(dim=2).any())  # a (row, shard) list was used up: every rank widens
        return vals * keep[:, self.shard], idx, saturated

    def sum_partial(self, partial: Tensor) -> Tensor:
        return partial if self.fp_group is None else _SumForward.apply(partial, self.fp_group)

    def sum_scalar(self, value: Tensor) -> Tensor:
        return value if self.fp_group is None else _SumForward.apply(value, self.fp_group)

    def sum_over_shards(self, t: Tensor) -> Tensor:
        if self.fp_group is None:
            return t
        out = t.detach().clone()
        dist.all_reduce(out, group=self.fp_group)
        return out

    def min_scalar(self, value: Tensor) -> Tensor:
        """Minimum over every rank (both axes), so replicated buffers stay identical across replicas."""
        out = value.detach().clone()
        if self.world_group is not None:
            dist.all_reduce(out, op=dist.ReduceOp.MIN)
        return out

    def min_over_shards(self, t: Tensor) -> Tensor:
        if self.fp_group is None:
            return t
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MIN, group=self.fp_group)
        return out

    def shard_input(self, x: Tensor) -> Tensor:
        return x if self.fp_group is None else _SumBackward.apply(x, self.fp_group)

    def mean_over_data(self, value: Tensor) -> Tensor:
        if self.dp_group is None:
            return value
        out = value.detach().clone()
        dist.all_reduce(out, group=self.dp_group)
        return out / self.n_data

    def data_variance(self, x: Tensor) -> Tensor:
        """sum ||x - mean||^2 over the global batch (all replicas, equal sizes), divided by dp: each
        replica's err / this averages over dp to the global batch's FVU. Chan's pairwise combination
        of per-replica (mean, M2), gathered in one collective."""
        x = x.detach()
        if x.dim() == 3:  # (B, sites, d): one variance per site, still one collective
            return self._site_variances(x)
        if self.dp_group is None:
            return (x - x.mean(dim=0)).pow(2).sum()
        mean = x.double().mean(dim=0)
        m2 = (x.double() - mean).pow(2).sum()
        mine = torch.cat([mean, m2.view(1)])  # (d + 1,)
        out = mine.new_empty(self.n_data * mine.numel())
        all_gather_into(out, mine, self.dp_group)
        out = out.view(self.n_data, -1)
        means, m2s = out[:, :-1], out[:, -1]
        total = m2s.sum() + x.shape[0] * (means - means.mean(dim=0)).pow(2).sum()
        return (total / self.n_data).to(x.dtype)

    def _site_variances(self, x: Tensor) -> Tensor:
        if self.dp_group is None:
            return (x - x.mean(dim=0)).pow(2).sum(dim=(0, 2))
        S, d = x.shape[1:]
        mean = x.double().mean(dim=0)  # (S, d)
        m2 = (x.double() - mean).pow(2).sum(dim=(0, 2))  # (S,)
        mine = torch.cat([mean.reshape(-1), m2])
        out = mine.new_empty(self.n_data * mine.numel())
        all_gather_into(out, mine, self.dp_group)
        out = out.view(self.n_data, -1)
        means, m2s = out[:, : S * d].view(self.n_data, S, d), out[:, S * d :]
        total = m2s.sum(dim=0) + x.shape[0] * (means - means.mean(dim=0)).pow(2).sum(dim=(0, 2))
        return (total / self.n_data).to(x.dtype)


def _slice_rows(sae: SparseAutoencoder, start: int, stop: int) -> None:
    for name in sae.sharded_names():
        p = getattr(sae, name)
        setattr(sae, name, nn.Parameter(p.detach()[start:stop].clone(), requires_grad=p.requires_grad))


def apply_feature_parallel(sae: SparseAutoencoder, mesh: Mesh) -> SparseAutoencoder:
    """Shards `sae` for this rank: a whole module is sliced to its rows, one already built with
    n_local rows is kept. Then every cross-shard step goes through a FeatureParallelComm."""
    n_local = mesh.dims.n_local
    if mesh.dims.n_latents != sae.n_latents:
        raise ValueError(f"mesh n_latents ({mesh.dims.n_latents}) != sae.n_latents ({sae.n_latents})")
    if sae.n_local == sae.n_latents and mesh.fp > 1:
        _slice_rows(sae, mesh.latent_offset, mesh.latent_offset + n_local)
    elif sae.n_local != n_local:
        raise ValueError(f"sae holds {sae.n_local} latents; this rank of parallel.fp ({mesh.fp}) needs {n_local}")
    if mesh.distributed:
        sae.comm = FeatureParallelComm(mesh)  # type: ignore[assignment]
    return sae


@torch.no_grad()
def gather_full_state(sae: SparseAutoencoder, mesh: Mesh) -> dict[str, Tensor]:
    """The whole SAE's tensors from every fp shard (each rank gets them; small dictionaries only)."""
    state = {k: v.detach() for k, v in sae.state_dict().items()}
    group = mesh.group("fp")
    if group is None:
        return {k: v.clone() for k, v in state.items()}
    out = {}
    for name, t in state.items():
        if name in sae.sharded_names():
            full = t.new_empty(mesh.fp * t.shape[0], *t.shape[1:])
            all_gather_into(full, t.contiguous(), group)
            out[name] = full
        else:
            out[name] = t.clone()
    return out
