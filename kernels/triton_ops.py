"""Triton path of `sae_dist.kernels`: the same ops as `reference.py` and `threshold.py`, same signatures,
same grads.

    topk_encode(x, W_enc, b_enc, k, chunk, aux_mask, k_aux) -> (vals, idx, aux_vals, aux_idx)
    threshold_encode(x, W_enc, b_enc, threshold, window, cap, chunk) -> (pre, idx, count)
    sparse_decode(vals, idx, W_dec) -> (B, d)

Forward and backward are all sparse Triton kernels (`triton_encoder.py`, `triton_threshold.py`,
`triton_decoder.py`); nothing of size B x n is allocated. Weight gradients are deterministic unless
`set_deterministic(False)` (atomic adds: faster when few latents are very hot, run-to-run bit
differences). fp32 and bf16 inputs, fp32 accumulation; bf16 weights under fp32 activations
(trainer.param_dtype=bf16) give values and the decode in fp32 and weight gradients in bf16. Runs on
CUDA, or on CPU tensors under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .reference import merge_aux_grads
from .threshold import stored_grads
from .triton_decoder import gather_dot, gather_sum, scatter_rows
from .triton_encoder import topk_encode_fwd
from .triton_threshold import threshold_encode_fwd

_deterministic = True


def set_deterministic(on: bool) -> None:
    """Sorted segment sums (on, the default) or atomic adds (off) for the sparse weight gradients."""
    global _deterministic
    _deterministic = on


def _grad_buffer(W: Tensor) -> Tensor | None:
    """The deterministic segment sums write each row once, so they store straight into the weights'
    dtype; atomic adds accumulate in an fp32 buffer (None: scatter_rows allocates it)."""
    return torch.empty(W.shape, dtype=W.dtype, device=W.device) if _deterministic else None


class TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, chunk, aux_mask, k_aux):  # type: ignore[override]
        vals, idx, aux_vals, aux_idx = topk_encode_fwd(x, W_enc, b_enc, k, aux_mask, k_aux)
        ctx.save_for_backward(x, W_enc, idx, aux_idx)
        ctx.mark_non_differentiable(idx, aux_idx)
        ctx.b_dtype = b_enc.dtype
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, grad_vals, _gi, grad_aux, _gai):  # type: ignore[override]
        x, W_enc, idx, aux_idx = ctx.saved_tensors
        idx, grad_vals = merge_aux_grads(x, idx, aux_idx, grad_vals, grad_aux)
        return (*_encoder_backward(ctx, x, W_enc, idx, grad_vals), None, None, None, None)


class ThresholdEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, threshold, window, cap, chunk):  # type: ignore[override]
        pre, idx, count = threshold_encode_fwd(x, W_enc, b_enc, threshold, window, cap)
        ctx.save_for_backward(x, W_enc, idx, count)
        ctx.mark_non_differentiable(idx, count)
        ctx.b_dtype = b_enc.dtype
        return pre, idx, count

    @staticmethod
    def backward(ctx, grad_pre, _gi, _gc):  # type: ignore[override]
        x, W_enc, idx, count = ctx.saved_tensors
        ids, grad_pre = stored_grads(idx, count, grad_pre, W_enc.shape[0])
        return (*_encoder_backward(ctx, x, W_enc, ids, grad_pre), None, None, None, None)


def _encoder_backward(
    ctx: Any, x: Tensor, W_enc: Tensor, idx: Tensor, grad_vals: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of sum(grad_vals * pre[idx]) w.r.t. x, W_enc and b_enc, those the Function's ctx asks for."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = gather_sum(grad_vals, idx, W_enc).to(x.dtype) if need_x else None
    grad_W = grad_b = None
    if need_w or need_b:
        gw, gb = scatter_rows(
            grad_vals, idx, x, W_enc.shape[0], with_bias=need_b, deterministic=_deterministic,
            out=_grad_buffer(W_enc),
        )  # fmt: skip
        grad_W = gw.to(W_enc.dtype) if need_w else None
        grad_b = gb.to(ctx.b_dtype) if need_b and gb is not None else None
    return grad_x, grad_W, grad_b


class SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, idx, W_dec):  # type: ignore[override]
        ctx.save_for_backward(vals, idx, W_dec)
        return gather_sum(vals, idx, W_dec)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        vals, idx, W_dec = ctx.saved_tensors
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_vals = gather_dot(grad_out, idx, W_dec).to(vals.dtype)
        if ctx.needs_input_grad[2]:
            grad_W, _ = scatter_rows(
                vals, idx, grad_out, W_dec.shape[0], deterministic=_deterministic, out=_grad_buffer(W_dec)
            )
            grad_W = grad_W.to(W_dec.dtype)
        return grad_vals, None, grad_W


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    chunk: int = 8192,
    aux_mask: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See `reference.topk_encode`; `chunk` is unused (the kernel streams over its own latent blocks)."""
    return TopKEncode.apply(x, W_enc, b_enc, k, chunk, aux_mask, k_aux)


def threshold_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    threshold: Tensor,
    window: float,
    cap: int,
    chunk: int = 8192,
) -> tuple[Tensor, Tensor, Tensor]:
    """See `threshold.threshold_encode`; `chunk` is unused (the kernel streams over its own latent blocks)."""
    return ThresholdEncode.apply(x, W_enc, b_enc, threshold, window, cap, chunk)


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """See `reference.sparse_decode`: sum_j vals[:, j] * W_dec[idx[:, j]] -> (B, d)."""
    return SparseDecode.apply(vals, idx, W_dec)
