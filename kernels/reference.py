"""Torch reference kernels: the CPU path, and the ground truth for the Triton kernels' parity tests.

Both ops are `torch.autograd.Function`s with sparse backwards, so no (B, n_latents) tensor is ever
built: the encoder streams over blocks of latents keeping a running top-k, and the decoder and the
encoder weight-gradient touch only the k active rows per token.

Layout: W_enc and W_dec are both (n_latents, d_model), one row per latent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _merge_topk(vals: Tensor, idx: Tensor, new_vals: Tensor, new_idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    cat_vals = torch.cat([vals, new_vals], dim=1)
    cat_idx = torch.cat([idx, new_idx], dim=1)
    top_vals, pos = cat_vals.topk(k, dim=1, sorted=False)
    return top_vals, cat_idx.gather(1, pos)


def topk_encode_forward(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, chunk: int, aux_mask: Tensor | None = None, k_aux: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row of x @ W_enc.T + b_enc: the k largest (values, latent ids), and, over the latents where
    aux_mask is True, the k_aux largest. Streams over `chunk` latents at a time."""
    B, n = x.shape[0], W_enc.shape[0]
    k = min(k, n)
    vals = x.new_full((B, 0), float("-inf"))
    idx = torch.zeros(B, 0, dtype=torch.long, device=x.device)
    aux_vals, aux_idx = vals, idx
    want_aux = aux_mask is not None and k_aux > 0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        pre = torch.addmm(b_enc[start:stop], x, W_enc[start:stop].t())  # (B, c)
        c = stop - start
        local_idx = torch.arange(start, stop, device=x.device).expand(B, c)
        kc = min(k, c)
        cv, ci = pre.topk(kc, dim=1, sorted=False)
        vals, idx = _merge_topk(vals, idx, cv, local_idx.gather(1, ci), min(k, vals.shape[1] + kc))
        if want_aux:
            assert aux_mask is not None
            masked = pre.masked_fill(~aux_mask[start:stop], float("-inf"))
            ka = min(k_aux, c)
            av, ai = masked.topk(ka, dim=1, sorted=False)
            aux_vals, aux_idx = _merge_topk(aux_vals, aux_idx, av, local_idx.gather(1, ai), min(k_aux, aux_vals.shape[1] + ka))
    vals, order = vals.sort(dim=1, descending=True)
    idx = idx.gather(1, order)
    return vals, idx, aux_vals, aux_idx


def encoder_backward(
    x: Tensor, W_enc: Tensor, idx: Tensor, grad_vals: Tensor, need_w: bool = True
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of sum(grad_vals * pre[idx]) w.r.t. x (B, d), W_enc (n, d) and b_enc (n,).

    Only the rows of active latents receive gradient; the weight gradient is a sparse (n x B) @ (B x d)
    product, so its cost is B * k * d, not B * n * d."""
    B, K = idx.shape
    n = W_enc.shape[0]
    grad_x = F.embedding_bag(idx, W_enc, per_sample_weights=grad_vals.to(W_enc.dtype), mode="sum")
    if not need_w:
        return grad_x, None, None
    rows = idx.reshape(-1)
    cols = torch.arange(B, device=x.device).repeat_interleave(K)
    g = grad_vals.reshape(-1).to(x.dtype)
    G = torch.sparse_coo_tensor(torch.stack([rows, cols]), g, (n, B), check_invariants=False)
    grad_W = torch.sparse.mm(G, x)  # (n, d)
    grad_b = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, rows, g)
    return grad_x, grad_W, grad_b


class TopKEncode(torch.autograd.Function):
    """(values, ids, aux values, aux ids) of the streaming top-k; backward is sparse."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, chunk, aux_mask, k_aux):  # type: ignore[override]
        vals, idx, aux_vals, aux_idx = topk_encode_forward(x, W_enc, b_enc, k, chunk, aux_mask, k_aux)
        ctx.save_for_backward(x, W_enc, idx, aux_idx)
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, grad_vals, _gi, grad_aux, _gai):  # type: ignore[override]
        x, W_enc, idx, aux_idx = ctx.saved_tensors
        if grad_vals is None:
            grad_vals = torch.zeros(idx.shape, dtype=x.dtype, device=x.device)
        if aux_idx.shape[1] and grad_aux is not None:
            idx = torch.cat([idx, aux_idx], dim=1)
            grad_vals = torch.cat([grad_vals, grad_aux], dim=1)
        grad_x, grad_W, grad_b = encoder_backward(x, W_enc, idx, grad_vals, need_w=ctx.needs_input_grad[1])
        return grad_x, grad_W, grad_b, None, None, None, None


def topk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, chunk: int = 8192, aux_mask: Tensor | None = None, k_aux: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k pre-activations of x @ W_enc.T + b_enc without a (B, n) buffer.

    x (B, d), W_enc (n, d), b_enc (n,) -> values (B, k) sorted descending, ids (B, k), aux values
    (B, k_aux) and aux ids over latents where aux_mask (n,) is True (empty when aux_mask is None)."""
    return TopKEncode.apply(x, W_enc, b_enc, k, chunk, aux_mask, k_aux)


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j vals[:, j] * W_dec[idx[:, j]] -> (B, d). embedding_bag's backward is already sparse:
    dot products for vals, a scatter-add into the k rows for W_dec."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")
