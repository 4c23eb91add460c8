"""Torch reference of the sparse threshold encoder (JumpReLU and gated SAEs): the CPU path, and the
ground truth for the Triton kernel's parity tests.

    pre, idx, count = threshold_encode(x, W_enc, b_enc, threshold, window, cap)

For each row of x, the latents j with x . W_enc[j] + b_enc[j] > threshold[j] - window, in ascending j,
as a fixed-width sparse list: `pre` (B, cap) their pre-activations, `idx` (B, cap) their ids, `count`
(B,) how many there are. `count` is the TRUE number, which may exceed `cap`: then only the first cap
(the lowest ids) are stored, and the caller, seeing count.max() > cap, retries with a wider cap (the
stored part of a row is a prefix of its full list, so nothing else changes). Slots at and beyond a
row's count hold pre = 0 at latent 0.

Like the top-k encoder it streams over blocks of latents, so no (B, n_latents) tensor is built, and its
backward touches only the stored latents: cost B * cap * d.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import encoder_backward


def check_threshold_args(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, window: float, cap: int
) -> None:
    """Shapes and the two scalars, with the values in the message."""
    n, d = W_enc.shape
    if x.dim() != 2 or x.shape[1] != d or b_enc.shape != (n,) or threshold.shape != (n,):
        raise ValueError(
            f"x {tuple(x.shape)}, W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)} and threshold "
            f"{tuple(threshold.shape)} do not fit: want (B, d), (n, d), (n,), (n,)"
        )
    if not window >= 0:
        raise ValueError(f"window ({window}) must be >= 0")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap ({cap!r}) must be an int >= 1")


def threshold_encode_forward(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, window: float, cap: int, chunk: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(pre, idx, count) of `threshold_encode`, `chunk` latents at a time: the largest temporaries are
    (B, chunk). The comparison runs in fp32, or in x's or threshold's dtype where that is wider."""
    check_threshold_args(x, W_enc, b_enc, threshold, window, cap)
    B, n = x.shape[0], W_enc.shape[0]
    wide = torch.promote_types(torch.promote_types(x.dtype, threshold.dtype), torch.float32)
    limit = threshold.detach().to(device=x.device, dtype=wide) - window  # (n,)
    pre_out = x.new_zeros(B, cap)  # (B, cap)
    idx_out = torch.zeros(B, cap, dtype=torch.long, device=x.device)  # (B, cap)
    count = torch.zeros(B, dtype=torch.long, device=x.device)  # (B,)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        # weights stored in bf16 under fp32 inputs: this block in x's dtype
        W_c, b_c = W_enc[start:stop].to(x.dtype), b_enc[start:stop].to(x.dtype)
        pre = torch.addmm(b_c, x, W_c.t())  # (B, c)
        rows, cols = (pre > limit[start:stop]).nonzero(as_tuple=True)  # (m,) each, row-major: ascending j
        per_row = torch.bincount(rows, minlength=B)  # (B,) kept in this block
        first = per_row.cumsum(0) - per_row  # (B,) where each row's entries start in (rows, cols)
        slots = count[rows] + torch.arange(rows.numel(), device=x.device) - first[rows]  # (m,) slot in its row
        fits = slots < cap
        rows, cols, slots = rows[fits], cols[fits], slots[fits]
        pre_out[rows, slots] = pre[rows, cols]
        idx_out[rows, slots] = cols + start
        count += per_row
        del pre
    return pre_out, idx_out, count


def stored_grads(idx: Tensor, count: Tensor, grad_pre: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The backward's (ids, gradients), both (B, cap): a slot at or beyond min(count, cap) is padding and
    gets gradient 0, whatever came in, and the id (its column mod n) instead of latent 0, so that the
    zero-weight pairs spread over the latents instead of piling onto one (a long serial segment in the
    Triton deterministic scatter, contended atomics in the other)."""
    cap = idx.shape[1]
    col = torch.arange(cap, device=idx.device)  # (cap,)
    stored = col[None, :] < count[:, None]  # (B, cap)
    ids = torch.where(stored, idx, col % n)
    return ids, grad_pre.masked_fill(~stored, 0)


class ThresholdEncode(torch.autograd.Function):
    """(pre, idx, count) of the streaming threshold selection; backward is sparse over stored slots."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, threshold, window, cap, chunk):  # type: ignore[override]
        pre, idx, count = threshold_encode_forward(x, W_enc, b_enc, threshold, window, cap, chunk)
        ctx.save_for_backward(x, W_enc, idx, count)
        ctx.mark_non_differentiable(idx, count)
        ctx.b_dtype = b_enc.dtype
        return pre, idx, count

    @staticmethod
    def backward(ctx, grad_pre, _gi, _gc):  # type: ignore[override]
        x, W_enc, idx, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ids, grad_pre = stored_grads(idx, count, grad_pre, W_enc.shape[0])
        grad_x, grad_W, grad_b = encoder_backward(x, W_enc, ids, grad_pre, need_w=need_w or need_b)
        grad_W = grad_W if need_w else None
        grad_b = grad_b.to(ctx.b_dtype) if need_b and grad_b is not None else None
        return grad_x if need_x else None, grad_W, grad_b, None, None, None, None


def threshold_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    threshold: Tensor,
    window: float,
    cap: int,
    chunk: int = 8192,
) -> tuple[Tensor, Tensor, Tensor]:
    """The latents above threshold - window per row, as a capped sparse list, without a (B, n) buffer.

    x (B, d), W_enc (n, d), b_enc (n,), threshold (n,), window >= 0, cap >= 1 -> pre (B, cap) in x's
    dtype, idx (B, cap) int64, count (B,) int64: row b's latents j with pre[b, j] > threshold[j] - window
    in ascending j, zero-padded at latent 0, and their true number (which may exceed cap: retry with
    cap >= count.max() to get them all). `pre` is differentiable w.r.t. x, W_enc and b_enc through the
    stored slots only; threshold and window are not (the JumpReLU/gated straight-through terms are the
    caller's). Weights may be bf16 under fp32 x, as for `reference.topk_encode`: the values come in x's
    dtype, the weight gradients in the weights' dtype."""
    return ThresholdEncode.apply(x, W_enc, b_enc, threshold, window, cap, chunk)
