"""Kernels of the SAE hot path: a streaming top-k encoder, a streaming threshold encoder (JumpReLU and
gated SAEs) and a sparse decoder.

Installed as `sae_dist.kernels`. `topk_encode`, `threshold_encode` and `sparse_decode` are the one
dispatch point: Triton on a CUDA device (when Triton is installed), the torch reference in `reference.py`
and `threshold.py` otherwise.
`bag_decode` (a sparse decode over bags of any length) and `triangle_decode` (on it, the cross-layer
transcoder's triangle of decoder blocks) are torch's embedding_bag on every device.
`set_backend("torch")` or the environment variable SAE_DIST_KERNELS=torch forces the reference.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import reference
from . import threshold as _threshold

_backend = "auto"


def set_backend(name: str) -> None:
    """auto, torch or triton (the trainer.kernels config field)."""
    global _backend
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel backend ({name!r}) must be auto, torch or triton")
    _backend = name


def set_select_precision(name: str) -> None:
    """How the torch path finds the fp32 top-k (the trainer.encoder_select config field): fp32, bf16
    (bf16 candidates, exact fp32 ranking, proven complete: see `reference._certified_topk`) or auto
    (bf16 where the CPU has native bf16 dot products)."""
    reference.SELECT_DTYPE = torch.bfloat16 if resolve_select(name) == "bf16" else None


def resolve_select(name: str) -> str:
    """trainer.encoder_select as this machine runs it: fp32 or bf16 (auto: bf16 where the CPU has native
    bf16 dot products)."""
    if name not in ("auto", "fp32", "bf16"):
        raise ValueError(f"trainer.encoder_select ({name!r}) must be auto, fp32 or bf16")
    if name == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return name


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on this CPU (Linux /proc/cpuinfo; False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def backend_for(t: Tensor) -> str:
    """The path a call on tensor t takes: `torch` or `triton`."""
    forced = os.environ.get("SAE_DIST_KERNELS", _backend)
    if forced == "torch":
        return "torch"
    if forced == "triton":
        return "triton"
    return "triton" if t.is_cuda and _triton_available() else "torch"


def _triton_available() -> bool:
    try:
        from . import triton_ops  # noqa: F401
    except ImportError:
        return False
    return True


def topk_encode(x, W_enc, b_enc, k, chunk=8192, aux_mask=None, k_aux=0):  # type: ignore[no-untyped-def]
    if backend_for(x) == "triton":
        from . import triton_ops

        return triton_ops.topk_encode(x, W_enc, b_enc, k, chunk, aux_mask, k_aux)
    return reference.topk_encode(x, W_enc, b_enc, k, chunk, aux_mask, k_aux)


def threshold_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    threshold: Tensor,
    window: float,
    cap: int,
    chunk: int = 8192,
) -> tuple[Tensor, Tensor, Tensor]:
    """(pre, idx, count): per row, the latents j with x . W_enc[j] + b_enc[j] > threshold[j] - window in
    ascending j, their pre-activations and ids in (B, cap) slots and their TRUE count, which may exceed
    cap (only the first cap are stored: retry with cap >= count.max()). See `threshold.threshold_encode`."""
    if backend_for(x) == "triton":
        from . import triton_ops

        return triton_ops.threshold_encode(x, W_enc, b_enc, threshold, window, cap, chunk)
    return _threshold.threshold_encode(x, W_enc, b_enc, threshold, window, cap, chunk)


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    if backend_for(vals) == "triton":
        from . import triton_ops

        return triton_ops.sparse_decode(vals, idx, W_dec)
    return reference.sparse_decode(vals, idx, W_dec)


def bag_decode(vals: Tensor, idx: Tensor, offsets: Tensor, W_dec: Tensor) -> Tensor:
    """sparse_decode over bags of any length (reference.bag_decode): torch's embedding_bag on every
    device; no Triton kernel of its own yet."""
    return reference.bag_decode(vals, idx, offsets, W_dec)


def triangle_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, layers: int) -> Tensor:
    """The cross-layer transcoder's decode (reference.triangle_decode): latent j writes into the L
    blocks of W_dec's row from its layer j mod L on; bag_decode's kernels on every device."""
    return reference.triangle_decode(vals, idx, W_dec, layers)


__all__ = [
    "topk_encode",
    "threshold_encode",
    "sparse_decode",
    "bag_decode",
    "triangle_decode",
    "set_backend",
    "set_select_precision",
    "resolve_select",
    "backend_for",
    "reference",
]
