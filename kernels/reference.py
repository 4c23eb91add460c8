"""Torch reference kernels: the CPU path, and the ground truth for the Triton kernels' parity tests.

Both ops are `torch.autograd.Function`s with sparse backwards, so no (B, n_latents) tensor is ever
built: the encoder streams over blocks of latents keeping a running top-k, and the decoder and the
encoder weight-gradient touch only the k active rows per token.

Layout: W_enc and W_dec are both (n_latents, d_model), one row per latent.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor


class _RunningTopK:
    """Top-k per row over a stream of latent blocks. Block winners are buffered and merged once the
    buffer holds 8k columns: a top-k over a short row is cheap, a merge per block is not."""

    def __init__(self, B: int, k: int, like: Tensor) -> None:
        self.k = k
        self.vals: list[Tensor] = []
        self.idx: list[Tensor] = []
        self.width = 0
        self.empty = (like.new_empty(B, 0), torch.empty(B, 0, dtype=torch.long, device=like.device))
        # per row, a value the k-th largest so far is at least: the smallest of any k added at once
        self.floor = like.new_full((B,), float("-inf"))

    def add(self, vals: Tensor, idx: Tensor) -> None:
        if vals.shape[1] == self.k and self.k:
            torch.maximum(self.floor, vals.amin(dim=1), out=self.floor)
        self.vals.append(vals)
        self.idx.append(idx)
        self.width += vals.shape[1]
        if self.width >= 8 * self.k and len(self.vals) > 1:
            vals, idx = self._merge(sort=False)
            self.vals, self.idx, self.width = [vals], [idx], vals.shape[1]
            if vals.shape[1] == self.k:
                torch.maximum(self.floor, vals.amin(dim=1), out=self.floor)

    def _merge(self, sort: bool) -> tuple[Tensor, Tensor]:
        if not self.vals:
            return self.empty
        vals, idx = torch.cat(self.vals, dim=1), torch.cat(self.idx, dim=1)
        if vals.shape[1] <= self.k and not sort:
            return vals, idx
        top, pos = vals.topk(min(self.k, vals.shape[1]), dim=1, sorted=sort)
        return top, idx.gather(1, pos)

    def result(self, sort: bool) -> tuple[Tensor, Tensor]:
        """(B, k) values (sorted descending if `sort`) and ids; rows short of k candidates are padded
        with -inf at latent 0."""
        vals, idx = self._merge(sort)
        short = self.k - vals.shape[1]
        if short > 0:
            vals = torch.cat([vals, vals.new_full((vals.shape[0], short), float("-inf"))], dim=1)
            idx = torch.cat([idx, idx.new_zeros(idx.shape[0], short)], dim=1)
        return vals, idx


def topk_encode_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    chunk: int,
    aux_mask: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row of x @ W_enc.T + b_enc: the k largest (values sorted descending, latent ids), and, over
    the latents where aux_mask is True, the k_aux largest (-inf at latent 0 where a row has fewer).
    Streams over `chunk` latents at a time: the largest temporaries are a (B, chunk) block and, with
    aux_mask, its dead latents' columns."""
    k = min(k, W_enc.shape[0])
    want_aux = aux_mask is not None and k_aux > 0
    k_aux = min(k_aux, W_enc.shape[0]) if want_aux else 0
    # the rounding bound assumes fp32 accumulation, which CPU bf16 GEMMs do (cuBLAS may reduce in bf16)
    if SELECT_DTYPE is None or x.dtype != torch.float32 or x.device.type != "cpu":
        return _stream_topk(x, W_enc, b_enc, k, chunk, aux_mask if want_aux else None, k_aux, None)
    return _certified_topk(x, W_enc, b_enc, k, chunk, aux_mask if want_aux else None, k_aux)


def _stream_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    chunk: int,
    aux_mask: Tensor | None,
    k_aux: int,
    sel: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The streaming top-k in the input's precision (sel None: values sorted descending) or, with sel,
    of the pre-activations computed in that dtype (unsorted candidates)."""
    B, n = x.shape[0], W_enc.shape[0]
    xs = x.to(sel) if sel is not None else x
    top = _RunningTopK(B, k, x)
    aux = _RunningTopK(B, k_aux, x)
    # `_above_floor`'s mask, for the mostly-dead blocks (only with aux_mask); untouched pages cost nothing
    keep = torch.empty(B * min(chunk, n), dtype=torch.bool, device=x.device) if aux_mask is not None else None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        W_c, b_c = W_enc[start:stop], b_enc[start:stop]
        # bf16 selection, or weights stored in bf16 under fp32 inputs: this block in the compute dtype
        W_c, b_c = W_c.to(sel or x.dtype), b_c.to(sel or x.dtype)
        pre = torch.addmm(b_c, xs, W_c.t())  # (B, c)
        c = stop - start
        dead = aux_mask[start:stop] if aux_mask is not None else None
        n_dead = 0 if dead is None else int(dead.sum())
        if n_dead >= max(k, k_aux, c // 2):
            # mostly dead (all of it early in a large dictionary's training): the few live columns are
            # copied out and hidden in place, the dead ones selected where they are. The block's top k
            # lie among the live top k and the dead top max(k, k_aux).
            live = (~dead).nonzero().squeeze(1)
            if live.numel():
                lv, lp = pre.index_select(1, live).topk(min(k, live.numel()), dim=1, sorted=False)
                top.add(lv, live[lp] + start)
                pre.masked_fill_(~dead, float("-inf"))
            above = _above_floor(pre, torch.minimum(top.floor, aux.floor), keep)
            dv, di = above if above is not None else _topk_cols(pre, max(k, k_aux))
            top.add(*_top_of(dv, di, k, start))
            aux.add(*_top_of(dv, di, k_aux, start))
        else:
            cv, ci = _topk_cols(pre, min(k, c))
            top.add(cv, ci + start)
            if n_dead:
                cols = dead.nonzero().squeeze(1)
                dv = pre.index_select(1, cols)  # (B, n_dead): few, so a copy beats a pass over the block
                av, ai = dv.topk(min(k_aux, n_dead), dim=1, sorted=False)
                aux.add(av, cols[ai] + start)
                del dv  # else it lives on beside the next block's pre: 3 (B, chunk) buffers, not 2
        del pre
    vals, idx = top.result(sort=sel is None)
    aux_vals, aux_idx = aux.result(sort=False) if aux_mask is not None else aux.empty
    return vals, idx, aux_vals, aux_idx


def _above_floor(pre: Tensor, floor: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """The entries of each row of a (B, c) block above the row's `floor`, packed into (B, m) with their
    columns (m: the most any row has; -inf at column 0 pads shorter rows), or None where a floor is
    still -inf or so many entries pass that a top-k over the block is the better way.

    Once both running selections hold k values per row, an entry at or below the smaller of their
    floors can enter neither, and in a mostly-dead block of a large dictionary few entries pass: a
    comparison into the reused bool buffer `keep` and a nonzero cost a fraction of a wide top-k (AuxK
    keeps 192-576 per row; docs/memory.md has the measurements)."""
    B, c = pre.shape
    if keep is None or not bool(torch.isfinite(floor).all()):
        return None
    # the floors are values of the same dtype as pre (bf16 ones held in fp32): compared in it, no copy
    mask = torch.gt(pre, floor.to(pre.dtype).unsqueeze(1), out=keep[: B * c].view(B, c))
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: each row's entries together, in column order
    if rows.numel() > B * c // 8:
        return None
    counts = torch.bincount(rows, minlength=B)
    m = max(1, int(counts.max())) if rows.numel() else 1
    slot = torch.arange(rows.numel(), device=pre.device) - (counts.cumsum(0) - counts)[rows]
    vals = pre.new_full((B, m), float("-inf"))
    idx = torch.zeros(B, m, dtype=torch.long, device=pre.device)
    vals[rows, slot] = pre[rows, cols]
    idx[rows, slot] = cols
    return vals, idx


def _topk_cols(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of a contiguous (B, c) block (unsorted) and their columns:
    the values of `pre.topk(k, dim=1)`, for a fraction of its cost on CPU when c >> k.

    The columns are cut into g strided groups (group j: columns j, j + c/g, j + 2c/g, ...). An entry
    outside the k groups with the largest maxima has k group maxima at least as large as it, so the
    row's top k lie inside those k groups: one top-k over the c/g group maxima, then one over the k g
    members of the chosen groups. torch.topk costs about the same per element on any row length here,
    so g is picked to minimise the c/g + k g elements it sees (docs/design.md, section 4)."""
    B, c = pre.shape
    g = _group_size(c, k)
    if g == 1:
        return pre.topk(k, dim=1, sorted=False)
    groups = pre.view(B, g, c // g)
    _, gi = groups.amax(dim=1).topk(k, dim=1, sorted=False)  # (B, k) chosen groups
    members = groups.gather(2, gi.unsqueeze(1).expand(B, g, k)).view(B, g * k)
    vals, pos = members.topk(k, dim=1, sorted=False)
    return vals, (pos // k) * (c // g) + gi.gather(1, pos % k)


def _top_of(vals: Tensor, idx: Tensor, k: int, offset: int) -> tuple[Tensor, Tensor]:
    """The k largest of each row of (vals, idx), ids shifted by offset."""
    if vals.shape[1] > k:
        vals, pos = vals.topk(k, dim=1, sorted=False)
        idx = idx.gather(1, pos)
    return vals, idx + offset


def _group_size(c: int, k: int) -> int:
    """The divisor g of c that minimises c/g + k g, or 1 where no grouping halves the work."""
    best, cost = 1, c
    for g in range(2, c + 1):
        if k * g >= c:
            break
        if c % g == 0 and c // g >= k and c // g + k * g < cost:
            best, cost = g, c // g + k * g
    return best if 2 * cost <= c else 1


SELECT_DTYPE: torch.dtype | None = None
"""Set by `sae_dist.kernels.set_select_precision`: None selects in the input's precision."""

OVERSELECT = 3
"""bf16 selection keeps this many times k candidates per row (see `_certified_topk`)."""

SELECT_STATS = {"rows": 0, "fallback_rows": 0}
"""Rows through the bf16 selection, and those of them recomputed in fp32 because the bound failed."""


def _certified_topk(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, chunk: int, aux_mask: Tensor | None, k_aux: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fp32 top-k, found with a bf16 matmul (several times faster on CPUs with AVX512-BF16/AMX).

    The bf16 pass keeps OVERSELECT * k candidates per row; their exact fp32 pre-activations pick the
    top k. A latent left out has a bf16 value <= m, the row's smallest candidate, so its exact value is
    at most `_bf16_upper_bound(m)`. Where that bound is below the k-th exact value, no latent left out
    can belong to the top k and the selection is exactly the fp32 one; rows where it is not (near-ties
    across the candidate boundary) are recomputed by the fp32 stream."""
    n = W_enc.shape[0]
    k_sel = min(OVERSELECT * k, n)
    n_aux = int(aux_mask.sum()) if aux_mask is not None else 0
    k_aux_sel = min(OVERSELECT * k_aux, max(n_aux, k_aux))
    cv, ci, av, ai = _stream_topk(x, W_enc, b_enc, k_sel, chunk, aux_mask, k_aux_sel, torch.bfloat16)
    vals, idx = _refine(x, W_enc, b_enc, cv, ci, k, sort=True)
    slack = _bf16_slack(x, W_enc, b_enc)
    ok = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if k_sel < n:  # otherwise every latent is a candidate
        ok &= _bf16_upper_bound(cv.float().amin(dim=1), slack) < vals[:, -1]
    if aux_mask is None:
        aux_vals, aux_idx = vals.new_empty(x.shape[0], 0), idx.new_empty(x.shape[0], 0)
    else:
        aux_vals, aux_idx = _refine(x, W_enc, b_enc, av, ai, k_aux, sort=False)
        if k_aux_sel < n_aux:
            ok &= _bf16_upper_bound(av.float().amin(dim=1), slack) < aux_vals.amin(dim=1)
    bad = (~ok).nonzero().squeeze(1)
    SELECT_STATS["rows"] += x.shape[0]
    SELECT_STATS["fallback_rows"] += bad.numel()
    if bad.numel():
        fv, fi, fav, fai = _stream_topk(x[bad], W_enc, b_enc, k, chunk, aux_mask, k_aux, None)
        vals[bad], idx[bad] = fv, fi
        if aux_mask is not None:
            aux_vals[bad], aux_idx[bad] = fav, fai
    return vals, idx, aux_vals, aux_idx


def _bf16_slack(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """Per row, the part of the bf16 rounding error that does not depend on the value (see
    `_bf16_upper_bound`); one pass over W_enc's norms per forward."""
    u = 2.0**-8
    c = 2 * u + 2 * u * u + 2 * x.shape[1] * 2.0**-24
    W = W_enc.detach()
    step = 16384  # rows per block; norms in fp32 (a bf16 norm may round down)
    w_max = torch.stack([W[s : s + step].float().norm(dim=1).max() for s in range(0, W.shape[0], step)]).max()
    return c * x.norm(dim=1) * w_max + 2.05 * u * b_enc.detach().abs().max().float()


def _bf16_upper_bound(m: Tensor, slack: Tensor) -> Tensor:
    """Per row, an upper bound on the exact x.w + b of any latent whose bf16 value p~ was <= m, given
    `slack = _bf16_slack(x, W_enc, b_enc)`.

    With u = 2^-8 (bf16 rounding) the bf16 value is p~ = fl(fl(x~.w~) + b~): x and w rounded (2u + u^2
    relative on each product, so on sum |x_i w_i| <= |x| |w| by Cauchy-Schwarz), summed in fp32 (d 2^-24
    each way), the product rounded to bf16 (u |x~.w~| <= u (1 + 2u)(|p~| + |b|)), the bias rounded (u |b|)
    and the sum rounded (u |p~| / (1 - u)). Taken generously:
        |p - p~| <= (2u + 2u^2 + 2d 2^-24) |x| max|w| + 2.05u max|b| + 2.05u |p~|,
    the first two terms being the slack, and p~ + 2.05u |p~| grows with p~, so m stands in for every
    left-out p~."""
    return m + 2.05 * 2.0**-8 * m.abs() + slack


def _refine(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, cand: Tensor, idx: Tensor, k: int, sort: bool
) -> tuple[Tensor, Tensor]:
    """Exact pre-activations of the candidates (B, m) -> the top k of them."""
    exact = gather_dot(x, idx, W_enc) + b_enc[idx].to(x.dtype)
    exact = exact.masked_fill(torch.isinf(cand), float("-inf"))  # rows short of candidates stay padded
    top, pos = exact.topk(min(k, exact.shape[1]), dim=1, sorted=sort)
    return top, idx.gather(1, pos)


def _compact(idx: Tensor, table: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The rows of `table` that idx names, in `dtype`, and idx renumbered into them: bf16 weights under
    fp32 inputs upcast only the rows in use (at most min(n, B x k) of them), then take the fused fp32 path."""
    if table.shape[0] <= idx.numel():  # a small table: upcast it whole, no renumbering
        return idx, table.to(dtype)
    used, inv = idx.unique(return_inverse=True)
    return inv.view_as(idx), table[used].to(dtype)


PARALLEL_MIN_ENTRIES = 1 << 16
"""scatter_rows splits a product of at least this many entries over torch's intra-op threads (CPU)."""
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool of this process (a forked child builds its own)."""
    key = (os.getpid(), workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="scatter_rows")
    return _POOLS[key]


def _entry_bags(offsets: Tensor, entries: int) -> Tensor:
    """The bag of every entry, from embedding_bag's bag starts `offsets` over `entries` flat entries."""
    sizes = torch.diff(offsets, append=offsets.new_tensor([entries]))
    return torch.repeat_interleave(torch.arange(offsets.numel(), device=offsets.device), sizes)


def _row_parts(entries: int, rows: int, device: torch.device) -> int:
    """How many threads a CPU product of `entries` entries into `rows` rows is split over."""
    if device.type != "cpu" or entries < PARALLEL_MIN_ENTRIES:
        return 1
    return max(1, min(torch.get_num_threads(), 8, rows))


def scatter_rows(w: Tensor, idx: Tensor, x: Tensor, n: int, dtype: torch.dtype | None = None,
                 bags: Tensor | None = None) -> Tensor:
    """out[l] = sum over entries e with idx[e] = l of w[e] * x[row of e] -> (n, d): the weight gradient of
    k active rows per token, a sparse (n x B) @ (B x d) product costing B * k * d (deterministic). An
    entry's row of x is its token (idx[b, j] -> row b), or `bags[e]` for flat entries (bag_decode).

    Accumulates in x's dtype. With another `dtype` (bf16 weights under fp32 inputs) only the rows of
    latents that occur are formed in x's dtype, then rounded into an (n, d) tensor of that dtype."""
    if bags is None:
        B, K = idx.shape
        bags = torch.arange(B, device=x.device).repeat_interleave(K)

    def product(rows: Tensor, cols: Tensor, vals: Tensor, out: Tensor) -> None:
        G = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (out.shape[0], x.shape[0]), check_invariants=False)
        # torch.sparse.mm(G, x) is addmm(zeros(m, d), G, x, beta=0): a zeroed (m, d) input beside its
        # (m, d) result, twice the gradient's bytes at the peak. A stride-0 zero input and `out=` give the
        # same values (beta = 0 never reads the input) in the result alone. Grad mode is per thread: a
        # pool thread has it on even inside a backward pass, and `out=` refuses inputs that require grad.
        with torch.no_grad():
            torch.addmm(x.new_zeros(()).expand(out.shape[0], x.shape[1]), G, x, beta=0, out=out)

    def sparse_mm(rows: Tensor, m: int) -> Tensor:
        out = torch.empty(m, x.shape[1], dtype=x.dtype, device=x.device)
        vals = w.reshape(-1).to(x.dtype)
        parts = _row_parts(rows.numel(), m, x.device)
        if parts == 1:
            product(rows, bags, vals, out)
            return out
        # torch's CPU product is one serial loop over the entries: split the output rows into ranges, one
        # per thread, each range a product of its own entries (in their order: the same sums, bit for bit)
        bounds = [m * p // parts for p in range(parts + 1)]
        part = torch.bucketize(rows, torch.tensor(bounds[1:-1], device=rows.device), right=True)
        jobs = []
        for p in range(parts):
            sel = (part == p).nonzero().squeeze(1)
            jobs.append((rows[sel] - bounds[p], bags[sel], vals[sel], out[bounds[p]:bounds[p + 1]]))
        list(_pool(parts).map(lambda job: product(*job), jobs))
        return out

    if dtype is None or dtype == x.dtype:
        return sparse_mm(idx.reshape(-1), n)
    used, rows = idx.reshape(-1).unique(return_inverse=True)
    full = torch.zeros(n, x.shape[1], dtype=dtype, device=x.device)
    full[used] = sparse_mm(rows, used.numel()).to(dtype)
    return full


def bag_sum(w: Tensor, idx: Tensor, table: Tensor, offsets: Tensor | None = None) -> Tensor:
    """sum_j w[b, j] * table[idx[b, j]] -> (B, d) in w's dtype (embedding_bag where the dtypes agree; a
    table in another dtype, e.g. bf16 weights under fp32 values, has its rows in use upcast). With
    `offsets`, w and idx are flat and bag r is entries offsets[r] .. offsets[r + 1] - 1."""
    if table.dtype != w.dtype:
        idx, table = _compact(idx, table, w.dtype)
    return F.embedding_bag(idx, table, offsets, per_sample_weights=w, mode="sum")


def gather_dot(g: Tensor, idx: Tensor, table: Tensor, offsets: Tensor | None = None,
               bags: Tensor | None = None) -> Tensor:
    """out[b, j] = <g[b], table[idx[b, j]]> -> (B, k), without gathering a (B, k, d) tensor: this is
    exactly the per-sample-weights gradient of embedding_bag, whose CPU kernel is a fused loop (called
    alone: autograd would run embedding_bag's forward first, a quarter of the time, for nothing). A
    table in another dtype than g (bf16 weights) has its rows in use upcast; the result is in g's dtype.
    With `offsets` (flat idx, bags as in bag_sum), out[e] = <g[bag of e], table[idx[e]]>; `bags`, the
    bag of every entry, where the caller has it."""
    if table.dtype != g.dtype:
        idx, table = _compact(idx, table, g.dtype)
    flat = idx.reshape(-1)
    if flat.numel() == 0:
        return g.new_zeros(idx.shape)
    if offsets is None:
        B, K = idx.shape
        offsets = torch.arange(B, device=idx.device) * K
        bags = torch.arange(B, device=idx.device).repeat_interleave(K)
    elif bags is None:
        bags = _entry_bags(offsets, flat.numel())
    g = g.to(table.dtype)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(g, table.detach(), flat, offsets, bags, 0, -1)
    return out.view(idx.shape)


def encoder_backward(
    x: Tensor, W_enc: Tensor, idx: Tensor, grad_vals: Tensor, need_w: bool = True
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of sum(grad_vals * pre[idx]) w.r.t. x (B, d), W_enc (n, d) and b_enc (n,).

    Only the rows of active latents receive gradient: cost B * k * d, not B * n * d."""
    n = W_enc.shape[0]
    grad_x = bag_sum(grad_vals.to(x.dtype), idx, W_enc)
    if not need_w:
        return grad_x, None, None
    g = grad_vals.reshape(-1).to(x.dtype)
    grad_b = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, idx.reshape(-1), g)
    return grad_x, scatter_rows(grad_vals, idx, x, n, W_enc.dtype), grad_b


def merge_aux_grads(
    x: Tensor, idx: Tensor, aux_idx: Tensor, grad_vals: Tensor | None, grad_aux: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The top-k and AuxK selections as one (ids, gradients) list for the encoder's backward."""
    if grad_vals is None:
        grad_vals = torch.zeros(idx.shape, dtype=x.dtype, device=x.device)
    if aux_idx.shape[1] and grad_aux is not None:
        idx = torch.cat([idx, aux_idx], dim=1)
        grad_vals = torch.cat([grad_vals, grad_aux], dim=1)
    return idx, grad_vals


class TopKEncode(torch.autograd.Function):
    """(values, ids, aux values, aux ids) of the streaming top-k; backward is sparse."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, chunk, aux_mask, k_aux):  # type: ignore[override]
        vals, idx, aux_vals, aux_idx = topk_encode_forward(x, W_enc, b_enc, k, chunk, aux_mask, k_aux)
        ctx.save_for_backward(x, W_enc, idx, aux_idx)
        ctx.mark_non_differentiable(idx, aux_idx)
        ctx.b_dtype = b_enc.dtype
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, grad_vals, _gi, grad_aux, _gai):  # type: ignore[override]
        x, W_enc, idx, aux_idx = ctx.saved_tensors
        idx, grad_vals = merge_aux_grads(x, idx, aux_idx, grad_vals, grad_aux)
        grad_x, grad_W, grad_b = encoder_backward(x, W_enc, idx, grad_vals, need_w=ctx.needs_input_grad[1])
        grad_b = grad_b.to(ctx.b_dtype) if grad_b is not None else None
        return grad_x, grad_W, grad_b, None, None, None, None


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    chunk: int = 8192,
    aux_mask: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k pre-activations of x @ W_enc.T + b_enc without a (B, n) buffer.

    x (B, d), W_enc (n, d), b_enc (n,) -> values (B, k) sorted descending, ids (B, k), aux values
    (B, k_aux) and aux ids over latents where aux_mask (n,) is True (empty when aux_mask is None).
    Values come in x's dtype; weights may be stored in bf16 under fp32 x (trainer.param_dtype=bf16):
    the rows in use are upcast (a block of the stream, or the k selected per token), and their
    gradients come back in their own dtype."""
    return TopKEncode.apply(x, W_enc, b_enc, k, chunk, aux_mask, k_aux)


class SparseDecode(torch.autograd.Function):
    """embedding_bag forward; a backward that touches only the k active rows per token (embedding_bag's
    own CPU backward sorts all B * k ids, slowly)."""

    @staticmethod
    def forward(ctx, vals, idx, W_dec):  # type: ignore[override]
        ctx.save_for_backward(vals, idx, W_dec)
        return bag_sum(vals, idx, W_dec)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        vals, idx, W_dec = ctx.saved_tensors
        grad_vals = gather_dot(grad_out, idx, W_dec).to(vals.dtype) if ctx.needs_input_grad[0] else None
        grad_W = scatter_rows(vals, idx, grad_out, W_dec.shape[0], W_dec.dtype) if ctx.needs_input_grad[2] else None
        return grad_vals, None, grad_W


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j vals[:, j] * W_dec[idx[:, j]] -> (B, d) in vals' dtype, with a sparse backward: dot products
    for vals, a scatter-add into the k rows for W_dec (in W_dec's dtype, which may be bf16)."""
    return SparseDecode.apply(vals, idx, W_dec)


class BagDecode(torch.autograd.Function):
    """sparse_decode over bags of any length (flat entries and embedding_bag offsets), same backward."""

    @staticmethod
    def forward(ctx, vals, idx, offsets, W_dec):  # type: ignore[override]
        ctx.save_for_backward(vals, idx, offsets, W_dec)
        return bag_sum(vals, idx, W_dec, offsets)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        vals, idx, offsets, W_dec = ctx.saved_tensors
        grad_vals = grad_W = None
        bags = _entry_bags(offsets, idx.numel())
        if ctx.needs_input_grad[0]:
            grad_vals = gather_dot(grad_out, idx, W_dec, offsets, bags).to(vals.dtype)
        if ctx.needs_input_grad[3]:
            grad_W = scatter_rows(vals, idx, grad_out, W_dec.shape[0], W_dec.dtype, bags=bags)
        return grad_vals, None, None, grad_W


def _triangle_entries(vals: Tensor, idx: Tensor, layers: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The bag entries of a triangle decode: item (r, c) (latent idx[r, c], of layer idx % layers)
    enters bag (r, m) for each m >= its layer, at table row idx * layers + m; items at zero enter none.
    -> (item of each entry, table row, bag, bag offsets), entries in bag order."""
    R, c = idx.shape
    target = torch.arange(layers, device=idx.device).view(1, -1, 1)
    mask = ((idx % layers).unsqueeze(1) <= target) & (vals != 0).unsqueeze(1)  # (R, layers, c)
    r, m, col = mask.nonzero(as_tuple=True)  # lexicographic: row, then target layer: bag order
    item = r * c + col
    rows = idx.reshape(-1)[item] * layers + m
    bags = r * layers + m
    counts = torch.bincount(bags, minlength=R * layers)
    return item, rows, bags, torch.cumsum(counts, 0) - counts


class TriangleDecode(torch.autograd.Function):
    """A decoder whose latent j (of layer j mod L) writes into layers >= its own: bag_decode over the
    (n L, d) view of W_dec, with the bag entries formed inside (no autograd through their gathers) and
    each item's gradient summed over its blocks."""

    @staticmethod
    def forward(ctx, vals, idx, W_dec, layers):  # type: ignore[override]
        item, rows, bags, offsets = _triangle_entries(vals, idx, layers)
        v = vals.reshape(-1)[item]
        table = W_dec.view(W_dec.shape[0] * layers, -1)
        ctx.save_for_backward(v, item, rows, bags, offsets, W_dec)
        ctx.layers, ctx.shape = layers, vals.shape
        return bag_sum(v, rows, table, offsets).view(vals.shape[0], -1)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        v, item, rows, bags, offsets, W_dec = ctx.saved_tensors
        table = W_dec.view(W_dec.shape[0] * ctx.layers, -1)
        g = grad_out.reshape(-1, table.shape[1]).contiguous()  # (R L, d): one row per bag
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            per_entry = gather_dot(g, rows, table, offsets, bags)
            grad_vals = torch.zeros(ctx.shape.numel(), dtype=per_entry.dtype, device=per_entry.device)
            grad_vals = grad_vals.index_add_(0, item, per_entry).view(ctx.shape).to(v.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = scatter_rows(v, rows, g, table.shape[0], W_dec.dtype, bags=bags).view(W_dec.shape)
        return grad_vals, None, grad_W, None


def triangle_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, layers: int) -> Tensor:
    """out[r, m] = sum over c with layer(idx[r, c]) <= m of vals[r, c] * W_dec[idx[r, c], m] -> (R, L d),
    for (R, c) values and latent ids, W_dec (n, L d) viewed as n latents x L blocks of d, a latent's layer
    being its id mod L (the cross-layer transcoder's decode). Only the blocks on or after each latent's
    layer are read, and only they get gradient. Items at zero are skipped, and their gradient is 0: exact
    where the values come out of a ReLU, which passes none back at zero."""
    return TriangleDecode.apply(vals, idx, W_dec, layers)


def bag_decode(vals: Tensor, idx: Tensor, offsets: Tensor, W_dec: Tensor) -> Tensor:
    """out[r] = sum over e in bag r of vals[e] * W_dec[idx[e]] -> (R, d), for flat (E,) vals and ids and
    (R,) bag starts `offsets` (ascending, the first 0): a sparse decode whose tokens need not all have
    the same number of active rows (the CLT's layer blocks). Its backward is sparse_decode's."""
    return BagDecode.apply(vals, idx, offsets, W_dec)
