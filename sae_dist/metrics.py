"""Held-out metrics in one streaming pass: the project's FVU/L0/dead figures and SAEBench's core set
(docs/eval.md gives each formula and how it relates to SAEBench's code).

`HeldoutMeter` takes, batch by batch, the activations x, the SAE's codes and its reconstruction x^, and
counts only the held-out set's first `tokens` rows (sae_dist.data.heldout). Callers encode whole LM
batches, the last one included, so that the end-of-training evaluation and `sae-dist eval` (which
encodes inside the spliced forward pass) put the same shapes through the same kernels and print the
same figures. Sums are float64; per-latent firing counts stay on the SAE's device (n,), so memory is
O(n + batch x k) whatever the number of tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from sae_dist.sae import SparseAutoencoder

TOKEN_SUMS = ("err", "x2", "legacy_ev", "cossim", "norm_in", "norm_out", "ratio")
BATCH_SUMS = ("rrb", "sb_mse", "sb_x2", "sb_err")
"""Sums over batches of per-batch means: the relative reconstruction bias (both peers average it per
batch) and SAEBench 0.6.0's own mse and explained variance (docs/eval.md)."""


class HeldoutMeter:
    def __init__(self, sae: SparseAutoencoder, tokens: int) -> None:
        self.sae, self.tokens = sae, tokens
        self.count = self.batches = 0
        self.sums = dict.fromkeys(TOKEN_SUMS + BATCH_SUMS, 0.0)
        self.l0 = self.l1 = 0.0
        self.x_sum = torch.zeros(sae.d_out, dtype=torch.float64, device=sae.b_dec.device)
        self.fired = torch.zeros(sae.n_local, dtype=torch.long, device=sae.b_dec.device)
        self.site_err: Tensor | None = None
        self.site_x2: Tensor | None = None

    @property
    def full(self) -> bool:
        return self.count >= self.tokens

    @torch.no_grad()
    def add(self, x: Tensor, vals: Tensor, idx: Tensor, x_hat: Tensor, sites: int = 0) -> None:
        """One batch: x and x^ (N, d), this rank's codes vals/idx (N, k). Rows past the held-out set's
        `tokens` are left out. `sites` S > 0: x is S sites of d / S concatenated, and each gets its FVU."""
        rows = min(x.shape[0], self.tokens - self.count)
        if rows <= 0:
            return
        x, x_hat = x[:rows].double(), x_hat[:rows].double()
        vals, idx = vals[:rows], idx[:rows]
        s, comm = self.sums, self.sae.comm
        err = (x - x_hat).pow(2).sum(1)
        if sites:
            per = (x - x_hat).pow(2).view(rows, sites, -1).sum(dim=(0, 2))
            x2 = x.pow(2).view(rows, sites, -1).sum(dim=(0, 2))
            self.site_err = per if self.site_err is None else self.site_err + per
            self.site_x2 = x2 if self.site_x2 is None else self.site_x2 + x2
        norm_in, norm_out = x.norm(dim=1), x_hat.norm(dim=1)
        s["err"] += float(err.sum())
        s["x2"] += float(x.pow(2).sum())
        self.x_sum += x.sum(0)
        s["legacy_ev"] += float((1 - err / (x - x.mean(0)).pow(2).sum(1)).sum())
        s["cossim"] += float(((x / norm_in[:, None]) * (x_hat / norm_out[:, None])).sum())
        s["norm_in"] += float(norm_in.sum())
        s["norm_out"] += float(norm_out.sum())
        s["ratio"] += float((norm_out / torch.where(norm_in.abs() < 1e-4, 1.0, norm_in)).sum())
        s["rrb"] += float(norm_out.pow(2).mean() / (x * x_hat).sum(1).mean())
        s["sb_mse"] += float(err.sum()) / rows
        s["sb_x2"] += float(x.pow(2).sum(1).mean())
        s["sb_err"] += float(err.mean())
        self.batches += 1
        active = vals > 0
        self.l0 += float(comm.sum_scalar(active.sum().float()))
        self.l1 += float(comm.sum_scalar((vals * active).double().sum()))
        self.fired.index_add_(0, idx[active], torch.ones_like(idx[active]))
        self.count += rows

    def result(self) -> dict[str, float]:
        """The metrics over the rows counted; every rank returns the same figures."""
        n, s, sae, comm = self.count, self.sums, self.sae, self.sae.comm
        if n == 0:
            raise RuntimeError("held-out evaluation got no tokens: the held-out source is empty")
        total_var = s["x2"] - float(self.x_sum.pow(2).sum()) / n
        freq = self.fired.double() / n

        def share(mask: Tensor) -> float:  # fraction of all latents, over every feature shard
            return float(comm.sum_scalar(mask.sum().double())) / sae.n_latents

        fired_total = float(comm.sum_scalar(freq.sum()))
        dead = share(self.fired == 0)
        fvu = s["err"] / total_var
        sb_x2 = s["sb_x2"] / self.batches
        per_site = {}
        if self.site_err is not None and self.site_x2 is not None:  # each site's FVU, its own variance
            means = self.x_sum.view(len(self.site_err), -1)
            var = self.site_x2 - means.pow(2).sum(dim=1) / n
            per_site = {"fvu_per_site": [float(e / v) for e, v in zip(self.site_err, var)]}
        return per_site | {
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "explained_variance_legacy": s["legacy_ev"] / n,
            "mse": s["err"] / n,
            "cossim": s["cossim"] / n,
            "l2_norm_in": s["norm_in"] / n,
            "l2_norm_out": s["norm_out"] / n,
            "l2_ratio": s["ratio"] / n,
            "relative_reconstruction_bias": s["rrb"] / self.batches,
            "l0": self.l0 / n,
            "l1": self.l1 / n,
            "dead_fraction": dead,
            "frac_alive": 1 - dead,
            "freq_over_1_percent": share(freq > 0.01),
            "freq_over_10_percent": share(freq > 0.1),
            "dense_fraction": share(freq > 0.1),
            "normalized_freq_over_1_percent": float(comm.sum_scalar(freq[freq > 0.01].sum())) / fired_total
            if fired_total else 0.0,
            "normalized_freq_over_10_percent": float(comm.sum_scalar(freq[freq > 0.1].sum())) / fired_total
            if fired_total else 0.0,
            "tokens": float(n),
            # SAEBench 0.6.0's own copies of these two (docs/eval.md: why they differ)
            "mse_saebench": s["sb_mse"] / n,
            "explained_variance_saebench": 1 - (s["sb_err"] / self.batches) / (sb_x2 - (sb_x2 / sae.d_out) ** 2),
        }


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, batches: Iterable[Tensor], scale: float, tokens: int) -> dict[str, float]:
    """Metrics over the first `tokens` rows of `batches` (activations, moved to the SAE's device and
    multiplied by `scale`); each batch is encoded whole."""
    return evaluate_meter(sae, batches, scale, tokens).result()


@torch.no_grad()
def evaluate_meter(sae: SparseAutoencoder, batches: Iterable[Tensor], scale: float, tokens: int) -> HeldoutMeter:
    device = sae.b_dec.device
    was_training = sae.training
    sae.eval()
    meter = HeldoutMeter(sae, tokens)
    for x in batches:
        x = x.to(device, non_blocking=True)
        if scale != 1.0:
            x = x * scale
        vals, idx = sae.encode_sparse(x)
        target = sae.arch.split(x)[1]
        # a target wider than one site (crosscoder: every site; CLT: every layer's output) gets per-site FVUs
        sites = target.shape[1] // x.shape[-1] if x.dim() == 3 and target.shape[1] > x.shape[-1] else 0
        meter.add(target, vals, idx, sae.decode(x, vals, idx), sites)
        if meter.full:
            break
    sae.train(was_training)
    return meter


@torch.no_grad()
def max_cosine_similarity(vectors: Tensor, queries: Tensor, comm: Any = None, offset: int = 0,
                          query_block: int = 1024, key_block: int = 8192) -> Tensor:
    """For each latent i in `queries` (global ids), max over j != i of cos(v_i, v_j), where v are the
    rows of `vectors` (n, d): encoder or decoder directions. On a feature shard, `vectors` holds global
    rows [offset, offset + n_local) and `comm` combines the shards (every rank gets the result).
    Blocked: the largest buffers are query_block x key_block and len(queries) x d, never n x n."""
    unit = torch.nn.functional.normalize(vectors.float(), dim=1)
    queries = queries.to(unit.device)
    local = queries - offset
    mine = (local >= 0) & (local < unit.shape[0])
    q_unit = torch.zeros(len(queries), unit.shape[1], device=unit.device)
    q_unit[mine] = unit[local[mine]]
    if comm is not None:
        q_unit = comm.sum_scalar(q_unit)  # every rank holds every query's direction
    best = torch.full((len(queries),), -float("inf"), device=unit.device)
    for q0 in range(0, len(queries), query_block):
        ids, top = local[q0 : q0 + query_block], best[q0 : q0 + query_block]
        q = q_unit[q0 : q0 + query_block]
        for k0 in range(0, unit.shape[0], key_block):
            sims = q @ unit[k0 : k0 + key_block].t()  # (query_block, key_block)
            own = (ids >= k0) & (ids < k0 + sims.shape[1])
            sims[own.nonzero().squeeze(1), ids[own] - k0] = -float("inf")
            torch.maximum(top, sims.max(1).values, out=top)
    return best if comm is None else -comm.min_scalar(-best)


MAX_COS_LATENTS = 16384
"""Latents whose max cosine similarity is computed exactly; above it a seeded uniform sample this size."""


def weight_metrics(sae: SparseAutoencoder, max_cos_latents: int = MAX_COS_LATENTS, seed: int = 0) -> dict[str, float]:
    """Average over latents of the max cosine similarity with any other latent, for encoder and decoder
    directions; above `max_cos_latents` latents (0 = never) over a uniform sample of that many, each
    compared with all n, with the sample's standard error. Every feature shard takes part."""
    n = sae.n_latents
    queries = torch.arange(n)
    if 0 < max_cos_latents < n:
        queries = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_cos_latents].sort().values
    comm = sae.comm if sae.comm.n_shards > 1 else None
    offset = getattr(sae.comm, "latent_offset", 0)
    out = {"max_cos_latents": float(len(queries))}
    for name, vectors in (("encoder", sae.W_enc), ("decoder", sae.W_dec)):
        best = max_cosine_similarity(vectors.detach(), queries, comm, offset).double()
        out[f"average_max_{name}_cosine_sim"] = float(best.mean())
        sampled = len(queries) < n  # standard error of a sample drawn without replacement
        out[f"average_max_{name}_cosine_sim_stderr"] = float(
            best.std() / math.sqrt(len(best)) * math.sqrt(1 - len(best) / n)) if sampled else 0.0
    return out
