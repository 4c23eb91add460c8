"""Fused encoder: x @ W_enc.T + b_enc over blocks of latents, keeping a running top-k per row.

Each program owns BLOCK_B rows and a slice of latents. Per latent block it computes the (BLOCK_B,
BLOCK_N) pre-activation tile in registers, then inserts the tile's entries that beat the row's current
k-th value into a (BLOCK_B, K_PAD) register tile (repeated max extraction; the loop stops as soon as no
row has a candidate left, so late blocks cost one max). Only values and latent ids reach memory: never
a (B, n) buffer. With several latent slices per row block (small B), each slice writes its own top-k and
a torch top-k over the S * k candidates finishes the job, the same one-round merge as docs/design.md §3.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _insert_block(pre, n0, top_v, top_i, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr):
    """Merge the tile `pre` (BLOCK_B, BLOCK_N), latent ids n0 + column, into the running top-k."""
    cols = tl.arange(0, BLOCK_N)
    slots = tl.arange(0, K_PAD)
    low, low_pos = tl.min(top_v, axis=1, return_indices=True)
    best, best_pos = tl.max(pre, axis=1, return_indices=True)
    while tl.max((best > low).to(tl.int32), axis=0) > 0:
        hit = best > low  # (BLOCK_B,)
        into = hit[:, None] & (slots[None, :] == low_pos[:, None])
        top_v = tl.where(into, best[:, None], top_v)
        top_i = tl.where(into, (n0 + best_pos)[:, None], top_i)
        pre = tl.where(hit[:, None] & (cols[None, :] == best_pos[:, None]), float("-inf"), pre)
        low, low_pos = tl.min(top_v, axis=1, return_indices=True)
        best, best_pos = tl.max(pre, axis=1, return_indices=True)
    return top_v, top_i


@triton.jit
def _topk_encode_kernel(
    x_ptr, w_ptr, b_ptr, mask_ptr,
    vals_ptr, idx_ptr, aux_vals_ptr, aux_idx_ptr,
    B, D, N, n_per_split,
    stride_xb, stride_wn,
    K: tl.constexpr, K_PAD: tl.constexpr, K_AUX: tl.constexpr, K_AUX_PAD: tl.constexpr,
    HAS_AUX: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    dims = tl.arange(0, BLOCK_D)
    # Padding slots hold +inf so that they are never the row minimum, hence never overwritten.
    slots = tl.arange(0, K_PAD)
    top_v = tl.where(slots[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BLOCK_B, K_PAD), tl.float32)
    top_i = tl.zeros((BLOCK_B, K_PAD), tl.int32)
    aux_slots = tl.arange(0, K_AUX_PAD)
    aux_v = tl.where(aux_slots[None, :] < K_AUX, float("-inf"), float("inf")) + tl.zeros(
        (BLOCK_B, K_AUX_PAD), tl.float32
    )
    aux_i = tl.zeros((BLOCK_B, K_AUX_PAD), tl.int32)

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
        pre = tl.where(lat_ok[None, :], acc + bias[None, :], float("-inf"))  # (BLOCK_B, BLOCK_N)
        top_v, top_i = _insert_block(pre, n0, top_v, top_i, BLOCK_N, K_PAD)
        if HAS_AUX:
            dead = tl.load(mask_ptr + lat, mask=lat_ok, other=0) != 0
            pre_aux = tl.where(dead[None, :], pre, float("-inf"))
            aux_v, aux_i = _insert_block(pre_aux, n0, aux_v, aux_i, BLOCK_N, K_AUX_PAD)

    out = pid_s * B * K + rows[:, None] * K + slots[None, :]
    ok = row_ok[:, None] & (slots[None, :] < K)
    tl.store(vals_ptr + out, top_v, mask=ok)
    tl.store(idx_ptr + out, top_i, mask=ok)
    if HAS_AUX:
        out = pid_s * B * K_AUX + rows[:, None] * K_AUX + aux_slots[None, :]
        ok = row_ok[:, None] & (aux_slots[None, :] < K_AUX)
        tl.store(aux_vals_ptr + out, aux_v, mask=ok)
        tl.store(aux_idx_ptr + out, aux_i, mask=ok)


def _pad(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


FUSED_AUX_MAX = 64
"""Widest AuxK selection kept in the kernel's registers; a wider one (the SAE's default k_aux is d/2)
spilled to local memory when compiled for sm_90 (scripts/compile_kernels.py: 8 KB per thread at
k_aux = 384), so it runs as its own pass over the dead latents (`_aux_over_dead`)."""

REGISTER_SLOTS = 4096
"""BLOCK_B x (K_PAD + K_AUX_PAD) slots of running top-k per program: with 4 warps this compiled to
<= 255 registers per thread and no spills for sm_90 (k up to 256)."""


def _block_b(k: int, k_aux: int) -> int:
    """Rows per program: as many as the register budget for the running top-k tiles allows, 16 to 64."""
    slots = _pad(k) + (_pad(k_aux) if k_aux else 0)
    return max(16, min(64, triton.next_power_of_2(REGISTER_SLOTS // slots + 1) // 2))


def _aux_over_dead(x: Tensor, W_enc: Tensor, b_enc: Tensor, aux_mask: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """The top k_aux over the dead latents (aux_mask), sorted descending, -inf at latent 0 where a row
    has fewer: a matmul over the dead rows only (usually few) and a streaming torch top-k (cuBLAS)."""
    from .reference import _stream_topk

    dead = aux_mask.nonzero().squeeze(1)
    B = x.shape[0]
    if dead.numel() == 0:
        return x.new_full((B, k_aux), float("-inf"), dtype=torch.float32), torch.zeros(B, k_aux, dtype=torch.int64,
                                                                                       device=x.device)
    vals, pos, _, _ = _stream_topk(x, W_enc[dead], b_enc[dead], k_aux, 8192, None, 0, None)
    return vals.float(), torch.where(torch.isinf(vals), 0, dead[pos])


def _splits(B: int, N: int, block_b: int, block_n: int, device: torch.device) -> int:
    """Latent slices per row block so that there are about two programs per SM."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(B, block_b)
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(N, 4 * block_n)))


def _finish(vals: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(S, B, k') slice candidates -> (B, k) sorted descending."""
    S, B, kk = vals.shape
    vals = vals.permute(1, 0, 2).reshape(B, S * kk)
    idx = idx.permute(1, 0, 2).reshape(B, S * kk)
    top, pos = vals.topk(k, dim=1, sorted=True)
    return top, idx.gather(1, pos)


def topk_encode_fwd(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    aux_mask: Tensor | None = None,
    k_aux: int = 0,
    n_splits: int | None = None,
    block_b: int | None = None,
    block_n: int = 64,
    block_d: int = 32,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k of x @ W_enc.T + b_enc per row, sorted descending, and the top k_aux over aux_mask latents.

    x (B, d), W_enc (n, d), b_enc (n,), aux_mask (n,) bool -> values (B, k) in x's dtype (x is cast to
    W_enc's dtype for the matmul), ids (B, k) int64,
    aux values (B, k_aux), aux ids (B, k_aux) (width 0 when aux_mask is None). A row with fewer than
    k_aux aux latents gets -inf values at latent 0."""
    B, D = x.shape
    N = W_enc.shape[0]
    if W_enc.shape[1] != D or b_enc.shape != (N,):
        raise ValueError(
            f"W_enc {tuple(W_enc.shape)} and b_enc {tuple(b_enc.shape)} do not fit x {tuple(x.shape)}"
        )
    k = min(k, N)
    has_aux = aux_mask is not None and k_aux > 0
    k_aux = min(k_aux, N) if has_aux else 0
    x_dtype = x.dtype  # values come back in it; the matmul runs in the weights' dtype (bf16 tensor cores)
    x = x.to(W_enc.dtype).contiguous()
    W_enc = W_enc.contiguous()
    if has_aux and _pad(k_aux) > FUSED_AUX_MAX:
        assert aux_mask is not None
        top, top_idx, _, _ = topk_encode_fwd(x, W_enc, b_enc, k, None, 0, n_splits, block_b, block_n, block_d)
        aux_top, aux_top_idx = _aux_over_dead(x, W_enc, b_enc, aux_mask.to(x.device), k_aux)
        return top.to(x_dtype), top_idx, aux_top.to(x_dtype), aux_top_idx
    block_b = block_b or _block_b(k, k_aux)
    S = n_splits or _splits(B, N, block_b, block_n, x.device)
    n_per_split = triton.cdiv(triton.cdiv(N, S), block_n) * block_n
    S = triton.cdiv(N, n_per_split)
    vals = torch.empty(S, B, k, dtype=torch.float32, device=x.device)
    idx = torch.empty(S, B, k, dtype=torch.int64, device=x.device)
    aux_vals = torch.empty(S, B, k_aux, dtype=torch.float32, device=x.device)
    aux_idx = torch.empty(S, B, k_aux, dtype=torch.int64, device=x.device)
    mask = (
        aux_mask.to(device=x.device, dtype=torch.int8).contiguous()
        if aux_mask is not None and has_aux
        else vals
    )
    fp32_ieee = x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    grid = (triton.cdiv(B, block_b), S)
    _topk_encode_kernel[grid](
        x, W_enc, b_enc, mask, vals, idx, aux_vals, aux_idx,
        B, D, N, n_per_split, x.stride(0), W_enc.stride(0),
        K=k, K_PAD=_pad(k), K_AUX=k_aux, K_AUX_PAD=_pad(k_aux), HAS_AUX=has_aux,
        PRECISION="ieee" if fp32_ieee else "tf32", DOT_FP32=not x.is_cuda,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    top, top_idx = _finish(vals, idx, k)
    if has_aux:
        aux_top, aux_top_idx = _finish(aux_vals, aux_idx, k_aux)
    else:
        aux_top, aux_top_idx = aux_vals[0], aux_idx[0]
    return top.to(x_dtype), top_idx, aux_top.to(x_dtype), aux_top_idx
