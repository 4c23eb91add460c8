"""Sparse gathers and scatters over k active latents per row: the decoder and every sparse gradient.

    gather_sum(w, idx, W)       out[b] = sum_j w[b, j] * W[idx[b, j]]         decode; encoder grad of x
    gather_dot(g, idx, W)       out[b, j] = <g[b], W[idx[b, j]]>              decode grad of the values
    scatter_rows(w, idx, X, n)  out[l] = sum_{(b, j): idx[b, j] = l} w[b, j] * X[b]
                                (+ the sums of w per latent)                  grads of W_dec, W_enc, b_enc

`scatter_rows` is deterministic by default: the (b, j) pairs are sorted by latent and each latent's
segment is summed in a fixed order by one program, which also writes the zero rows of inactive latents.
`deterministic=False` uses atomic adds into a zeroed buffer instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gather_sum_kernel(
    w_ptr, idx_ptr, table_ptr, out_ptr, B, D, K, stride_t, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    ok = row_ok[:, None] & (dims < D)[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    for j in range(0, K):
        w = tl.load(w_ptr + rows * K + j, mask=row_ok, other=0.0).to(tl.float32)
        lat = tl.load(idx_ptr + rows * K + j, mask=row_ok, other=0).to(tl.int64)
        t = tl.load(table_ptr + lat[:, None] * stride_t + dims[None, :], mask=ok, other=0.0)
        acc += w[:, None] * t.to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], acc, mask=ok)


@triton.jit
def _gather_dot_kernel(
    g_ptr, idx_ptr, table_ptr, out_ptr, B, D, K, stride_t, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    j = tl.program_id(1)
    row_ok = rows < B
    lat = tl.load(idx_ptr + rows * K + j, mask=row_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (dims < D)[None, :]
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=ok, other=0.0)
        t = tl.load(table_ptr + lat[:, None] * stride_t + dims[None, :], mask=ok, other=0.0)
        acc += g.to(tl.float32) * t.to(tl.float32)
    tl.store(out_ptr + rows * K + j, tl.sum(acc, axis=1), mask=row_ok)


@triton.jit
def _segment_sum_kernel(
    offsets_ptr, src_ptr, w_ptr, x_ptr, out_ptr, bias_ptr, D,
    HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    lat = tl.program_id(0)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dims < D
    start = tl.load(offsets_ptr + lat)
    stop = tl.load(offsets_ptr + lat + 1)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    w_acc = tl.zeros((BLOCK_E,), tl.float32)
    for e0 in range(start, stop, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_ok = e < stop
        row = tl.load(src_ptr + e, mask=e_ok, other=0).to(tl.int64)
        w = tl.load(w_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
        xr = tl.load(x_ptr + row[:, None] * D + dims[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * xr.to(tl.float32), axis=0)
        w_acc += w
    tl.store(out_ptr + lat.to(tl.int64) * D + dims, acc, mask=d_ok)
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            tl.store(bias_ptr + lat, tl.sum(w_acc, axis=0))


@triton.jit
def _scatter_atomic_kernel(
    idx_ptr, w_ptr, x_ptr, out_ptr, bias_ptr, E, D, K,
    HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    e_ok = e < E
    ok = e_ok[:, None] & (dims < D)[None, :]
    lat = tl.load(idx_ptr + e, mask=e_ok, other=0).to(tl.int64)
    w = tl.load(w_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    row = (e // K).to(tl.int64)
    xr = tl.load(x_ptr + row[:, None] * D + dims[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + lat[:, None] * D + dims[None, :], w[:, None] * xr, mask=ok)
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            tl.atomic_add(bias_ptr + lat, w, mask=e_ok)


def _block_d(D: int) -> int:
    return min(128, max(16, triton.next_power_of_2(D)))


def gather_sum(w: Tensor, idx: Tensor, table: Tensor, out: Tensor | None = None, block_b: int = 16) -> Tensor:
    """w (B, k), idx (B, k), table (n, d) -> (B, d) in w's dtype, fp32 accumulation."""
    B, K = idx.shape
    D = table.shape[1]
    if table.stride(1) != 1:
        table = table.contiguous()
    out = torch.empty(B, D, dtype=w.dtype, device=table.device) if out is None else out
    bd = _block_d(D)
    grid = (triton.cdiv(B, block_b), triton.cdiv(D, bd))
    _gather_sum_kernel[grid](
        w.contiguous(), idx.contiguous(), table, out, B, D, K, table.stride(0), BLOCK_B=block_b, BLOCK_D=bd
    )
    return out


def gather_dot(g: Tensor, idx: Tensor, table: Tensor, out: Tensor | None = None, block_b: int = 32) -> Tensor:
    """g (B, d), idx (B, k), table (n, d) -> (B, k) fp32 dot products <g[b], table[idx[b, j]]>."""
    B, K = idx.shape
    D = table.shape[1]
    if table.stride(1) != 1:
        table = table.contiguous()
    out = torch.empty(B, K, dtype=torch.float32, device=g.device) if out is None else out
    grid = (triton.cdiv(B, block_b), K)
    _gather_dot_kernel[grid](
        g.contiguous(),
        idx.contiguous(),
        table,
        out,
        B,
        D,
        K,
        table.stride(0),
        BLOCK_B=block_b,
        BLOCK_D=_block_d(D),
    )
    return out


def scatter_rows(
    w: Tensor,
    idx: Tensor,
    x: Tensor,
    n: int,
    with_bias: bool = False,
    deterministic: bool = True,
    out: Tensor | None = None,
    bias_out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Sparse weight gradient: out[l] = sum over (b, j) with idx[b, j] = l of w[b, j] * x[b]; (n, d) fp32,
    and with_bias the (n,) sums of w per latent. Deterministic mode overwrites every row of `out`, which
    may be of the weights' dtype (fp32 sums rounded once on store: no fp32 (n, d) buffer for bf16 weights)."""
    B, K = idx.shape
    D = x.shape[1]
    x = x.contiguous()
    flat_idx = idx.reshape(-1)
    flat_w = w.reshape(-1).contiguous()
    bd = _block_d(D)
    if deterministic:
        out = torch.empty(n, D, dtype=torch.float32, device=x.device) if out is None else out
        bias_out = (
            torch.empty(n, dtype=torch.float32, device=x.device)
            if bias_out is None and with_bias
            else bias_out
        )
        order = torch.argsort(flat_idx, stable=True)  # (B*k,) pairs grouped by latent, token order inside
        offsets = torch.zeros(n + 1, dtype=torch.int64, device=x.device)
        offsets[1:] = torch.bincount(flat_idx, minlength=n).cumsum(0)
        src = order // K  # token row of each sorted pair
        _segment_sum_kernel[(n, triton.cdiv(D, bd))](
            offsets, src, flat_w[order], x, out, bias_out if with_bias else out, D,
            HAS_BIAS=with_bias, BLOCK_E=16, BLOCK_D=bd,
        )  # fmt: skip
        return out, bias_out
    out = torch.zeros(n, D, dtype=torch.float32, device=x.device) if out is None else out.zero_()
    if with_bias:
        bias_out = (
            torch.zeros(n, dtype=torch.float32, device=x.device) if bias_out is None else bias_out.zero_()
        )
    E = B * K
    _scatter_atomic_kernel[(triton.cdiv(E, 32), triton.cdiv(D, bd))](
        flat_idx.contiguous(), flat_w, x, out, bias_out if with_bias else out, E, D, K,
        HAS_BIAS=with_bias, BLOCK_E=32, BLOCK_D=bd,
    )  # fmt: skip
    return out, bias_out
