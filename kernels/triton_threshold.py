"""Fused threshold encoder: x @ W_enc.T + b_enc over blocks of latents, keeping per row the latents
above threshold - window as a capped list in ascending id (see `threshold.py` for the contract).

Each program owns BLOCK_B rows and a slice of latents. Per latent block it computes the (BLOCK_B,
BLOCK_N) pre-activation tile in registers, and a cumulative sum of the tile's mask along the latents
gives each kept entry its slot: the row's running count plus its rank in the block, so the list comes
out in ascending id with no sort. Entries whose slot is below cap are stored; the count keeps counting
past it. Only the kept values, their ids and the counts reach memory: never a (B, n) buffer. With
several latent slices per row block (small B), each slice writes its own capped list and count, and
`_merge_slices` concatenates them in slice order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .threshold import check_threshold_args
from .triton_encoder import _splits


@triton.jit
def _threshold_encode_kernel(
    x_ptr, w_ptr, b_ptr, thr_ptr,
    pre_ptr, idx_ptr, count_ptr,
    B, D, N, n_per_split, cap, window,
    stride_xb, stride_wn,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    dims = tl.arange(0, BLOCK_D)
    out_row = (pid_s * B + rows).to(tl.int64) * cap  # (BLOCK_B,) start of this slice's row in the outputs
    count = tl.zeros((BLOCK_B,), tl.int32)

    n_start = pid_s * n_per_split
    n_stop = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_stop, BLOCK_N):
        lat = n0 + tl.arange(0, BLOCK_N)
        lat_ok = lat < n_stop
        acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = d0 + dims < D
            xt = tl.load(
                x_ptr + rows.to(tl.int64)[:, None] * stride_xb + (d0 + dims)[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            wt = tl.load(
                w_ptr + lat.to(tl.int64)[:, None] * stride_wn + (d0 + dims)[None, :],
                mask=lat_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if DOT_FP32:  # the interpreter's dot mishandles bf16; bf16 products are exact in fp32 anyway
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
        bias = tl.load(b_ptr + lat, mask=lat_ok, other=0.0).to(tl.float32)
        limit = tl.load(thr_ptr + lat, mask=lat_ok, other=0.0).to(tl.float32) - window
        pre = acc + bias[None, :]  # (BLOCK_B, BLOCK_N)
        keep = row_ok[:, None] & lat_ok[None, :] & (pre > limit[None, :])
        kept = keep.to(tl.int32)
        slot = count[:, None] + tl.cumsum(kept, axis=1) - 1  # (BLOCK_B, BLOCK_N)
        store = keep & (slot < cap)
        out = out_row[:, None] + slot
        tl.store(pre_ptr + out, pre, mask=store)
        tl.store(idx_ptr + out, lat[None, :] + tl.zeros((BLOCK_B, BLOCK_N), tl.int32), mask=store)
        count += tl.sum(kept, axis=1)
    tl.store(count_ptr + pid_s * B + rows, count, mask=row_ok)


BLOCK_B = 32
"""Rows per program. Besides the (BLOCK_B, BLOCK_N) pre-activation tile and its mask's cumulative sum,
the scattered stores hold a 64-bit address per tile entry for the values and another for the ids: at 64
rows (the top-k kernel's widest block) that spilled to local memory when compiled for sm_80 and sm_90
with 4 warps, at 32 rows it does not (scripts/compile_kernels.py reports registers and spills)."""


def _merge_slices(pre: Tensor, idx: Tensor, count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(S, B, cap) per-slice lists and (S, B) counts -> (B, cap), (B, cap), (B,). Slice s's entries
    follow those of the slices before it, so cutting each slice's list at cap loses nothing: an entry it
    cut would land at a slot >= cap. One scatter, no host sync: entries past cap go to a spare column
    that is dropped."""
    S, B, cap = pre.shape
    col = torch.arange(cap, device=pre.device)
    slot = (count.cumsum(0) - count)[:, :, None] + col  # (S, B, cap)
    slot = slot.masked_fill((col >= count[:, :, None]) | (slot >= cap), cap)
    slot = slot.permute(1, 0, 2).reshape(B, S * cap)
    out_pre = pre.new_zeros(B, cap + 1).scatter_(1, slot, pre.permute(1, 0, 2).reshape(B, S * cap))
    out_idx = idx.new_zeros(B, cap + 1).scatter_(1, slot, idx.permute(1, 0, 2).reshape(B, S * cap))
    return out_pre[:, :cap], out_idx[:, :cap], count.sum(0)


def threshold_encode_fwd(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    threshold: Tensor,
    window: float,
    cap: int,
    n_splits: int | None = None,
    block_b: int = BLOCK_B,
    block_n: int = 64,
    block_d: int = 32,
) -> tuple[Tensor, Tensor, Tensor]:
    """(pre, idx, count) of `threshold.threshold_encode`, forward only.

    x (B, d), W_enc (n, d), b_enc (n,), threshold (n,) -> pre (B, cap) in x's dtype (x is cast to W_enc's
    dtype for the matmul, fp32 accumulation; the comparison is in fp32), idx (B, cap) int64, count (B,)
    int64 (the true count, possibly above cap)."""
    check_threshold_args(x, W_enc, b_enc, threshold, window, cap)
    B, D = x.shape
    N = W_enc.shape[0]
    x_dtype = x.dtype  # values come back in it; the matmul runs in the weights' dtype (bf16 tensor cores)
    x = x.to(W_enc.dtype).contiguous()
    W_enc = W_enc.contiguous()
    S = n_splits or _splits(B, N, block_b, block_n, x.device)
    n_per_split = triton.cdiv(triton.cdiv(N, S), block_n) * block_n
    S = triton.cdiv(N, n_per_split)
    # slots past a row's count are never written: zeros are the padding the contract promises
    pre = torch.zeros(S, B, cap, dtype=torch.float32, device=x.device)
    idx = torch.zeros(S, B, cap, dtype=torch.int64, device=x.device)
    count = torch.empty(S, B, dtype=torch.int64, device=x.device)
    fp32_ieee = x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    grid = (triton.cdiv(B, block_b), S)
    _threshold_encode_kernel[grid](
        x, W_enc, b_enc.contiguous(), threshold.to(x.device).contiguous(), pre, idx, count,
        B, D, N, n_per_split, cap, float(window), x.stride(0), W_enc.stride(0),
        PRECISION="ieee" if fp32_ieee else "tf32", DOT_FP32=not x.is_cuda,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    if S > 1:
        pre_out, idx_out, count_out = _merge_slices(pre, idx, count)
    else:
        pre_out, idx_out, count_out = pre[0], idx[0], count[0]
    return pre_out.to(x_dtype), idx_out, count_out
