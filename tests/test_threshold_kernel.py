"""Threshold encoder parity: the torch reference and the Triton kernel against float64 dense maths.

    pytest tests/test_threshold_kernel.py                            # no GPU: Triton under TRITON_INTERPRET=1
    SAE_DIST_TEST_SEED=1234 pytest tests/test_threshold_kernel.py    # replay the inputs of a failure

Inputs, seeds, devices and error bounds as in tests/test_kernels.py. The thresholds are moved so that no
float64 pre-activation lies within a margin of its cut (well above the rounding error of the path under
test), so the selection (ids, their order, counts) must equal the float64 one exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_kernels import (  # noqa: F401  (poisoned_empty is a fixture)
    DEVICE,
    NO_TRITON,
    SEED,
    _close,
    _gen,
    _LargestTensor,
    needs_triton,
    poisoned_empty,
    triton_ops,
)

from sae_dist import kernels

reference = kernels.threshold

# (B, d, n, window, cap): n a multiple of no block or chunk; cap below the busy rows' counts, and above n
CASES = [(37, 24, 100, 0.0, 8), (19, 40, 67, 0.5, 20), (6, 17, 23, 0.25, 30)]


def _problem(B, d, n, window, salt, margin=1e-3, dtype=torch.float32, w_dtype=None):
    """x with row scales from 0 to 1, W, b ~ N(0, 1) (W, b in w_dtype), fp32 thresholds ~ N(1, 2) (some
    negative), raised so that row 0 (x = 0: pre = b) selects nothing and no float64 pre-activation is
    within `margin` of its cut threshold - window."""
    g = _gen(salt)
    x = (torch.randn(B, d, generator=g) * torch.linspace(0, 1, B)[:, None]).to(dtype)
    W = torch.randn(n, d, generator=g).to(w_dtype or dtype)
    b = torch.randn(n, generator=g).to(w_dtype or dtype)
    pre64 = x.double() @ W.double().T + b.double()
    cut = torch.maximum(torch.randn(n, generator=g, dtype=torch.float64) * 2 + 1, b.double() + 2 * margin)
    for _ in range(8 * B):
        near = ((pre64 - cut).abs() < 2 * margin).any(0)  # (n,)
        if not near.any():
            break
        cut = cut + margin * near
    threshold = (cut + window).float()
    assert ((pre64 - (threshold.double() - window)).abs() >= margin).all(), "could not clear the cuts"
    return x.to(DEVICE), W.to(DEVICE), b.to(DEVICE), threshold.to(DEVICE)


def _dense64(x, W, b, threshold, window, cap):
    """Float64 (pre, idx, count, stored) of the same selection, and pre64 (B, n) with grad to x, W, b."""
    x64, W64, b64 = (t.detach().double().requires_grad_() for t in (x, W, b))
    pre64 = x64 @ W64.T + b64  # (B, n): fine at test sizes
    keep = pre64.detach() > threshold.double() - window
    count = keep.sum(1)
    idx = torch.zeros(x.shape[0], cap, dtype=torch.long, device=x.device)
    for row in range(x.shape[0]):
        ids = keep[row].nonzero().squeeze(1)[:cap]
        idx[row, : ids.numel()] = ids
    stored = torch.arange(cap, device=x.device) < count[:, None]  # (B, cap)
    return pre64.gather(1, idx) * stored, idx, count, stored, (x64, W64, b64)


def _encode_and_check(ops, B, d, n, window, cap, salt, value_bound=torch.float32, chunk=8192, **problem):
    """Forward and backward of ops.threshold_encode against float64; grads of a random weighted sum of
    pre, non-zero on the padding slots too (which must pass no gradient)."""
    x, W, b, threshold = _problem(B, d, n, window, salt, **problem)
    want_pre, want_idx, want_count, stored, leaves = _dense64(x, W, b, threshold, window, cap)
    assert (want_count == 0).any() and ((want_count > cap).any() or cap >= n), f"a dull case (seed {SEED})"
    xs, Ws, bs, ts = (t.clone().requires_grad_() for t in (x, W, b, threshold))
    pre, idx, count = ops.threshold_encode(xs, Ws, bs, ts, window, cap, chunk)
    assert (
        pre.shape == idx.shape == (B, cap) and pre.dtype == x.dtype and idx.dtype == count.dtype == torch.long
    )
    assert torch.equal(count, want_count), f"counts differ (seed {SEED})"
    assert torch.equal(idx, want_idx), f"ids differ (seed {SEED})"
    assert (pre[~stored] == 0).all(), f"padding not zero (seed {SEED})"
    _close(pre, want_pre, value_bound, "pre-activations")
    gv = torch.randn(B, cap, generator=_gen(salt + 1)).to(DEVICE)
    (gv * pre).sum().backward()
    (gv.double() * want_pre).sum().backward()
    for got, want, name, bound in zip(
        (xs.grad, Ws.grad, bs.grad), (t.grad for t in leaves), "xWb", (value_bound, W.dtype, b.dtype)
    ):
        assert got.dtype == {"x": x.dtype, "W": W.dtype, "b": b.dtype}[name]
        _close(got, want, bound, f"grad of {name}")
    assert ts.grad is None, "the threshold got a gradient"


@pytest.mark.parametrize("chunk", [7, 32, 8192])
@pytest.mark.parametrize("case", CASES)
def test_reference_threshold_encode_and_grads_match_float64_dense(case, chunk):
    _encode_and_check(reference, *case, salt=chunk, chunk=chunk)


@needs_triton
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_triton_threshold_encode_and_grads_match_float64_dense(case, deterministic):
    triton_ops.set_deterministic(deterministic)
    try:
        _encode_and_check(triton_ops, *case, salt=21)
    finally:
        triton_ops.set_deterministic(True)


@needs_triton
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("n_splits", [1, 3])
def test_triton_threshold_latent_slices_and_small_blocks_give_the_same_lists(n_splits):
    """Each latent slice writes its own list, cut at cap (busy rows overflow in the first slice already),
    and the merge puts a slice's entries after those of the slices before it."""
    B, d, n, window, cap = CASES[0]
    x, W, b, threshold = _problem(B, d, n, window, salt=31)
    want_pre, want_idx, want_count, _, _ = _dense64(x, W, b, threshold, window, cap)
    pre, idx, count = triton_ops.threshold_encode_fwd(
        x, W, b, threshold, window, cap, n_splits=n_splits, block_b=16, block_n=16, block_d=16
    )
    assert torch.equal(count, want_count) and torch.equal(idx, want_idx), f"lists differ (seed {SEED})"
    _close(pre, want_pre, torch.float32, "sliced pre-activations")


MIXED = [
    pytest.param("torch", 1e-3, torch.float32, id="torch"),
    pytest.param("triton", 0.25, torch.bfloat16, id="triton", marks=needs_triton),
]


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("path,margin,value_bound", MIXED)
def test_bf16_weights_under_fp32_activations(path, margin, value_bound):
    """trainer.param_dtype=bf16: values and the grad of x in fp32, weight grads in bf16. The torch path
    upcasts the weights (fp32 bounds), the Triton path multiplies in bf16 (x rounded: bf16 bounds and a
    wider margin around the cuts)."""
    ops = reference if path == "torch" else triton_ops
    B, d, n, window, cap = CASES[0]
    _encode_and_check(
        ops, B, d, n, window, cap, salt=71, value_bound=value_bound, margin=margin, w_dtype=torch.bfloat16
    )


def test_reference_results_do_not_depend_on_chunk_and_never_allocate_batch_by_latents():
    B, d, n, window, cap, chunk = 64, 8, 512, 0.25, 16, 64
    x, W, b, threshold = _problem(B, d, n, window, salt=5)
    results = []
    for c in (chunk, 100, n):
        xs, Ws, bs, Wd = (t.clone().requires_grad_() for t in (x, W, b, W))
        with _LargestTensor() as probe:
            pre, idx, count = reference.threshold_encode(xs, Ws, bs, threshold, window, cap, c)
            x_hat = kernels.reference.sparse_decode(pre.relu(), idx, Wd)
            x_hat.square().sum().backward()
        if c == chunk:
            assert probe.largest <= max(B * chunk, n * d), (
                f"a tensor of {probe.largest} elements; B x n = {B * n}"
            )
        results.append((pre, idx, count, xs.grad, Ws.grad, bs.grad, Wd.grad))
    assert (results[0][2] > cap).any(), f"no row overflows cap (seed {SEED})"
    for other in results[1:]:
        assert torch.equal(results[0][1], other[1]) and torch.equal(results[0][2], other[2])
        for a, b_ in zip(results[0][:1] + results[0][3:], other[:1] + other[3:]):
            _close(a, b_, torch.float32, "chunked vs unchunked")


def test_reference_gradcheck_float64():
    """No pre-activation within 1e-3 of its cut, so gradcheck's steps leave the selection as it is; cap
    half the busiest row's count, so that rows overflow and rows (row 0 at least) are padded."""
    B, d, n, window = 6, 8, 12, 0.2
    x, W, b, threshold = _problem(B, d, n, window, salt=91, dtype=torch.float64)
    count = reference.threshold_encode(x, W, b, threshold, window, n)[2]
    cap = max(1, int(count.max()) // 2)
    assert count.max() > cap > count.min(), f"counts {count.tolist()} (seed {SEED})"
    inputs = tuple(t.clone().requires_grad_() for t in (x, W, b))
    assert torch.autograd.gradcheck(
        lambda *xwb: reference.threshold_encode(*xwb, threshold, window, cap, 3)[0], inputs
    )


@pytest.mark.parametrize(
    "window,cap,shape_n,message",
    [
        (-0.1, 4, 11, r"window \(-0.1\) must be >= 0"),
        (0.0, 0, 11, r"cap \(0\) must be an int >= 1"),
        (0.0, 4.0, 11, r"cap \(4.0\) must be an int >= 1"),
        (0.0, 4, 12, r"threshold \(12,\) do not fit"),
    ],
)
def test_threshold_encode_errors_name_the_argument_and_value(window, cap, shape_n, message):
    x, W, b, _ = _problem(5, 6, 11, 0.0, salt=3)
    with pytest.raises(ValueError, match=message):
        kernels.threshold_encode(x, W, b, torch.zeros(shape_n, device=DEVICE), window, cap)


@needs_triton
def test_kernel_switch_picks_torch_or_triton(monkeypatch):
    """SAE_DIST_KERNELS picks the Function behind kernels.threshold_encode; both give the same lists."""
    monkeypatch.setitem(sys.modules, "sae_dist.kernels.triton_ops", triton_ops)
    monkeypatch.setattr(kernels, "triton_ops", triton_ops, raising=False)
    x, W, b, threshold = _problem(19, 40, 67, 0.5, salt=61)
    W.requires_grad_()
    outs = {}
    for backend, fn in (("torch", reference.ThresholdEncode), ("triton", triton_ops.ThresholdEncode)):
        monkeypatch.setenv("SAE_DIST_KERNELS", backend)
        outs[backend] = kernels.threshold_encode(x, W, b, threshold, 0.5, 20)
        assert outs[backend][0].grad_fn._forward_cls is fn, backend
    assert torch.equal(outs["torch"][1], outs["triton"][1]) and torch.equal(
        outs["torch"][2], outs["triton"][2]
    )


@pytest.mark.skipif(
    not NO_TRITON.startswith("triton was imported"), reason="the kernels loaded in this process"
)
def test_triton_threshold_kernel_in_a_fresh_process():
    env = {**os.environ, "SAE_DIST_TEST_SEED": str(SEED)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-k", "triton", __file__],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
