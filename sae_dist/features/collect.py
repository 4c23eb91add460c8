"""One streaming pass over the codes of many tokens, keeping a fixed amount of state per feature:

- top contexts: the K contexts with the highest activation (each context once per feature);
- samples: a uniform sample of R firing tokens (bottom-R of a random key per firing: sampling
  without replacement in one pass), each shown with its context and labelled by its quantile;
- a histogram of activations over fixed log-spaced bins, firing count, sum and max.

Every stored context keeps the feature's activation at each of its T tokens (float16), so pages can
highlight tokens without a second pass. State is O(F * (K + R) * T), whatever the number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

HIST_LO, HIST_HI, HIST_BINS = -3.0, 3.0, 120
"""Histogram bins: log10(activation) in [HIST_LO, HIST_HI), clipped at both ends."""


class _Bank:
    """Per feature, the K best entries by score; rows kept sorted by score, best first."""

    def __init__(self, n_features: int, k: int, context_size: int) -> None:
        self.k = k
        self.score = torch.full((n_features, k), float("-inf"))
        self.value = torch.zeros(n_features, k)
        self.ctx = torch.full((n_features, k), -1, dtype=torch.long)
        self.pos = torch.zeros(n_features, k, dtype=torch.long)
        self.acts = torch.zeros(n_features, k, context_size, dtype=torch.float16)

    def admit(self, slot: Tensor, score: Tensor) -> Tensor:
        """Candidates that can enter: above the K-th best and within the first K of their feature."""
        ok = (score > self.score[slot, -1]).nonzero().squeeze(1)
        o1 = score[ok].argsort(descending=True)
        order = ok[o1][slot[ok][o1].argsort(stable=True)]  # by feature, then best score first
        s = slot[order]
        rank = torch.arange(len(order)) - torch.searchsorted(s, s)
        return order[rank < self.k]

    def merge(self, slot: Tensor, score: Tensor, value: Tensor, ctx: Tensor, pos: Tensor, acts: Tensor) -> None:
        """Candidates from `admit` (at most K per feature); acts (M, T)."""
        if len(slot) == 0:
            return
        rows, row_of = torch.unique(slot, return_inverse=True)  # (U,), (M,)
        col = _rank_within(row_of)
        U, K = len(rows), self.k
        c_score = torch.full((U, K), float("-inf"))
        c_value, c_ctx, c_pos = torch.zeros(U, K), torch.full((U, K), -1, dtype=torch.long), torch.zeros(U, K, dtype=torch.long)
        c_acts = torch.zeros(U, K, acts.shape[1], dtype=torch.float16)
        c_score[row_of, col], c_value[row_of, col], c_ctx[row_of, col] = score, value, ctx
        c_pos[row_of, col], c_acts[row_of, col] = pos, acts.half()
        all_score = torch.cat([self.score[rows], c_score], 1)  # (U, 2K)
        best = all_score.topk(K, dim=1).indices  # (U, K), sorted
        self.score[rows] = all_score.gather(1, best)
        for name, cand in (("value", c_value), ("ctx", c_ctx), ("pos", c_pos)):
            merged = torch.cat([getattr(self, name)[rows], cand], 1)
            getattr(self, name)[rows] = merged.gather(1, best)
        merged_acts = torch.cat([self.acts[rows], c_acts], 1)  # (U, 2K, T)
        self.acts[rows] = merged_acts.gather(1, best[..., None].expand(-1, -1, acts.shape[1]))


def _rank_within(group: Tensor) -> Tensor:
    """Position of each element among the elements of its group, in order of appearance."""
    order = torch.argsort(group, stable=True)
    g = group[order]
    rank_sorted = torch.arange(len(g)) - torch.searchsorted(g, g)
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


@dataclass
class FeatureStats:
    features: Tensor
    """(F,) latent ids described, in slot order."""
    tokens: int
    """Tokens seen."""
    count: Tensor
    """(F,) tokens on which each feature fired."""
    act_sum: Tensor
    act_max: Tensor
    hist: Tensor
    """(F, HIST_BINS) firings per log10-activation bin."""
    top: _Bank
    samples: _Bank
    context_tokens: dict[int, Tensor]
    """Token ids (T,) of every context the banks refer to."""


class FeatureCollector:
    def __init__(self, n_latents: int, features: Tensor, context_size: int, top_k: int = 16,
                 n_samples: int = 16, seed: int = 0) -> None:
        self.features = features.long()
        n = len(self.features)
        self.slot_of = torch.full((n_latents,), -1, dtype=torch.long)
        self.slot_of[self.features] = torch.arange(n)
        self.T = context_size
        self.top = _Bank(n, top_k, context_size)
        self.samples = _Bank(n, n_samples, context_size)
        self.count = torch.zeros(n, dtype=torch.long)
        self.act_sum = torch.zeros(n, dtype=torch.float64)
        self.act_max = torch.zeros(n)
        self.hist = torch.zeros(n, HIST_BINS, dtype=torch.long)
        self.tokens = 0
        self.contexts_seen = 0
        self.context_tokens: dict[int, Tensor] = {}
        self._prune_at = 4 * (top_k + n_samples) + 1024
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, ids: Tensor, keep: Tensor, vals: Tensor, idx: Tensor) -> None:
        """ids (C, T) a batch of contexts, keep (C, T) the tokens that reached the SAE, and their codes
        vals, idx (N, k) with N = keep.sum() in row-major order."""
        C, T = ids.shape
        where = keep.nonzero()  # (N, 2): context, position of each coded token
        k = idx.shape[1]
        slot = self.slot_of[idx.flatten()]
        val = vals.flatten().float()
        sel = (slot >= 0) & (val > 0)
        slot, val = slot[sel], val[sel]
        tok = torch.arange(len(where)).repeat_interleave(k)[sel]
        ctx, pos = where[tok, 0], where[tok, 1]
        self.tokens += len(where)
        self.count.index_add_(0, slot, torch.ones_like(slot))
        self.act_sum.index_add_(0, slot, val.double())
        self.act_max.scatter_reduce_(0, slot, val, "amax")
        b = ((val.log10() - HIST_LO) * HIST_BINS / (HIST_HI - HIST_LO)).long().clamp(0, HIST_BINS - 1)
        self.hist.view(-1).index_add_(0, slot * HIST_BINS + b, torch.ones_like(b))

        key = slot * C + ctx  # one key per (feature, context) of this batch
        ukey, inv = torch.unique(key, return_inverse=True)
        cmax = torch.zeros(len(ukey)).scatter_reduce_(0, inv, val, "amax", include_self=False)
        cpos = torch.zeros(len(ukey), dtype=torch.long)
        at_max = val == cmax[inv]
        cpos[inv[at_max]] = pos[at_max]
        u_slot, u_ctx = ukey // C, ukey % C
        a = self.top.admit(u_slot, cmax)
        self._merge(self.top, u_slot[a], cmax[a], cmax[a], u_ctx[a], cpos[a], key, pos, val, C, ids)

        rnd = torch.rand(len(slot), generator=self.gen)
        a = self.samples.admit(slot, rnd)
        self._merge(self.samples, slot[a], rnd[a], val[a], ctx[a], pos[a], key, pos, val, C, ids)
        self.contexts_seen += C
        if len(self.context_tokens) > self._prune_at:
            self._prune()

    def _merge(self, bank: _Bank, slot: Tensor, score: Tensor, value: Tensor, ctx: Tensor, pos: Tensor,
               key: Tensor, t_pos: Tensor, t_val: Tensor, C: int, ids: Tensor) -> None:
        if len(slot) == 0:
            return
        want, row = torch.unique(slot * C + ctx, return_inverse=True)
        loc = torch.searchsorted(want, key).clamp(max=len(want) - 1)
        hit = want[loc] == key
        acts = torch.zeros(len(want), self.T)
        acts[loc[hit], t_pos[hit]] = t_val[hit]  # the feature's activation at every token of the context
        bank.merge(slot, score, value, ctx + self.contexts_seen, pos, acts[row])
        for c in torch.unique(ctx).tolist():
            self.context_tokens.setdefault(self.contexts_seen + c, ids[c].to(torch.int32).clone())

    def _prune(self) -> None:
        live = set(torch.cat([self.top.ctx.flatten(), self.samples.ctx.flatten()]).tolist())
        self.context_tokens = {c: t for c, t in self.context_tokens.items() if c in live}
        self._prune_at = max(self._prune_at, 2 * len(self.context_tokens))

    def result(self) -> FeatureStats:
        self._prune()
        return FeatureStats(self.features, self.tokens, self.count, self.act_sum, self.act_max, self.hist,
                            self.top, self.samples, self.context_tokens)
