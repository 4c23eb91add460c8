"""Kernel parity (docs/design.md §4): the torch reference and the Triton kernels against float64 dense maths.

    pytest tests/test_kernels.py                              # no GPU: Triton runs under TRITON_INTERPRET=1
    pytest tests/test_kernels.py                              # with a GPU: the same checks on compiled kernels
    SAE_DIST_TEST_DEVICE=cpu pytest tests/test_kernels.py     # force the interpreter on a GPU machine
    SAE_DIST_TEST_SEED=1234 pytest tests/test_kernels.py      # replay the inputs of a failure

Inputs are fresh every run (seed from os.urandom, printed in every failure message). Shapes include
non-powers of two in B, d, n and k. Every buffer the Triton launchers allocate is poisoned (NaN, or a
huge id) so that an unwritten output fails.

Error bounds, inputs ~ N(0, 1), against float64 on the same (rounded) inputs:
    fp32:  |err| <= 1e-4 + 1e-4 |ref|   (pre-activations, decode, every gradient)
    bf16:  |err| <= 2e-2 + 2e-2 |ref|   (bf16 inputs and outputs, fp32 accumulation)
Top-k ids must equal the float64 top-k as sets wherever the float64 gap between the k-th and (k+1)-th
value exceeds twice the bound; elsewhere every chosen id must be within the bound of the k-th value.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import unittest

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sae_dist import kernels
from sae_dist.config import sae_config
from sae_dist.sae import SparseAutoencoder

DEVICE = os.environ.get("SAE_DIST_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
reference = kernels.reference
SEED = int(os.environ.get("SAE_DIST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
BOUNDS = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2)}
# (B, d, n, k, k_aux, n_dead): n not a multiple of any latent block, k up to n - 3, rows short of aux latents
SHAPES = [(37, 24, 100, 5, 7, 30), (19, 40, 67, 20, 12, 5), (6, 17, 23, 20, 3, 2)]


def _load_triton_ops():
    """(module, why not). Triton picks interpreter or compiler when a function is decorated, its own
    library included, and checks the choice again on lazy imports, so without a GPU TRITON_INTERPRET=1 is
    set before triton is first imported and stays set (harmless there: nothing can compile)."""
    if DEVICE == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            return None, "triton was imported without TRITON_INTERPRET=1 before this module"
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module("sae_dist.kernels.triton_ops"), ""
    except ImportError as e:
        return None, f"triton is not importable ({e})"


triton_ops, NO_TRITON = _load_triton_ops()
needs_triton = pytest.mark.skipif(triton_ops is None, reason=NO_TRITON)


def _gen(salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + salt)


def _randn(*shape, g, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def _close(actual, expected, dtype, what):
    atol, rtol = BOUNDS[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what} (seed {SEED}): {m}"
    )


def _check_topk(vals, idx, pre64, k, dtype, what, mask=None):
    """vals (B, k) sorted descending with ids idx are a valid top-k of pre64 (B, n) float64."""
    atol, rtol = BOUNDS[dtype]
    if mask is not None:
        pre64 = pre64.masked_fill(~mask, float("-inf"))
    finite = torch.isfinite(pre64.gather(1, idx))
    _close(
        vals.masked_fill(~finite, 0), pre64.gather(1, idx).masked_fill(~finite, 0), dtype, what + " values"
    )
    assert torch.equal(torch.isfinite(vals), finite), f"{what}: -inf padding misplaced (seed {SEED})"
    ref = pre64.topk(min(k + 1, pre64.shape[1]), dim=1).values
    kth = ref[:, k - 1 : k]
    tol = 2 * (atol + rtol * kth.abs())
    assert (pre64.gather(1, idx)[finite.all(1)] >= (kth - tol)[finite.all(1)]).all(), (
        f"{what}: not a top-k (seed {SEED})"
    )
    for row in range(idx.shape[0]):
        chosen = idx[row][finite[row]]
        assert chosen.unique().numel() == chosen.numel(), f"{what}: repeated id in row {row} (seed {SEED})"
        if ref.shape[1] > k and ref[row, k - 1] - ref[row, k] > tol[row, 0]:
            want = pre64[row].topk(k).indices
            assert set(chosen.tolist()) == set(want.tolist()), f"{what}: row {row} ids differ (seed {SEED})"


def _problem(B, d, n, n_dead, salt, dtype=torch.float32):
    """x, W, b ~ N(0, 1) and an aux mask of n_dead latents, never latent 0 (the id of -inf padding)."""
    g = _gen(salt)
    x, W, b = _randn(B, d, g=g, dtype=dtype), _randn(n, d, g=g, dtype=dtype), _randn(n, g=g, dtype=dtype)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[1 + torch.randperm(n - 1, generator=g)[:n_dead]] = True
    return x, W, b, dead.to(DEVICE)


def _dense64_encode_grads(x, W, b, idx, aux_idx, gv, ga):
    x64, W64, b64 = (t.detach().double().requires_grad_() for t in (x, W, b))
    pre = x64 @ W64.T + b64
    loss = (gv.double() * pre.gather(1, idx)).sum() + (ga.double() * pre.gather(1, aux_idx)).sum()
    loss.backward()
    return x64.grad, W64.grad, b64.grad


def _encode_and_check(ops_module, B, d, n, k, k_aux, n_dead, salt, dtype=torch.float32, **kw):
    """Forward and backward of ops_module.topk_encode against float64 dense maths."""
    x, W, b, dead = _problem(B, d, n, n_dead, salt, dtype)
    pre64 = x.double() @ W.double().T + b.double()
    xs, Ws, bs = (t.clone().requires_grad_() for t in (x, W, b))
    vals, idx, aux_vals, aux_idx = ops_module.topk_encode(xs, Ws, bs, k, aux_mask=dead, k_aux=k_aux, **kw)
    assert vals.shape == (B, min(k, n)) and aux_vals.shape == (B, min(k_aux, n)) and vals.dtype == dtype
    assert (vals[:, 1:] <= vals[:, :-1]).all(), f"values not sorted descending (seed {SEED})"
    _check_topk(vals, idx, pre64, min(k, n), dtype, "top-k")
    _check_topk(aux_vals, aux_idx, pre64, min(k_aux, n), dtype, "aux top-k", mask=dead)
    g = _gen(salt + 1)
    gv, ga = _randn(*vals.shape, g=g, dtype=dtype), _randn(*aux_vals.shape, g=g, dtype=dtype)
    ga = ga.masked_fill(~torch.isfinite(aux_vals), 0)
    loss = (gv * vals).sum() + (ga * aux_vals.masked_fill(~torch.isfinite(aux_vals), 0)).sum()
    loss.backward()
    for got, want, name in zip(
        (xs.grad, Ws.grad, bs.grad), _dense64_encode_grads(x, W, b, idx, aux_idx, gv, ga), "xWb"
    ):
        assert got.dtype == dtype
        _close(got, want, dtype, f"encoder grad of {name}")
    return vals, idx, Ws.grad


def _decode_and_check(ops_module, B, d, n, k, salt, dtype=torch.float32):
    g = _gen(salt)
    vals, W = _randn(B, k, g=g, dtype=dtype), _randn(n, d, g=g, dtype=dtype)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)]).to(DEVICE)
    idx[: B // 2, 0] = idx[0, 0]  # one hot latent shared by half the rows: scatter collisions
    grad_out = _randn(B, d, g=g)
    vs, Ws = vals.clone().requires_grad_(), W.clone().requires_grad_()
    out = ops_module.sparse_decode(vs, idx, Ws)
    out.backward(grad_out.to(out.dtype))
    v64, W64 = vals.double().requires_grad_(), W.double().requires_grad_()
    out64 = (v64.unsqueeze(2) * W64[idx]).sum(1)
    out64.backward(grad_out.to(dtype).double())
    _close(out, out64, dtype, "decode")
    _close(vs.grad, v64.grad, dtype, "decode grad of vals")
    _close(Ws.grad, W64.grad, dtype, "decode grad of W_dec")
    return out, Ws.grad


class _LargestTensor(TorchDispatchMode):
    """Numel of the largest dense tensor (nnz for sparse ones) any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() if t.layout == torch.strided else t._nnz())
        return out


@pytest.mark.parametrize("chunk", [7, 32, 8192])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_topk_encode_and_grads_match_float64_dense(shape, chunk):
    _encode_and_check(reference, *shape, salt=chunk)


def test_reference_topk_handles_k_above_n_and_rows_short_of_aux_latents():
    x, W, b, dead = _problem(6, 8, 4, 1, salt=3)
    dead[:] = False
    dead[2] = True
    vals, idx, aux_vals, aux_idx = reference.topk_encode(x, W, b, 9, 2, dead, 3)
    assert vals.shape == (6, 4) and sorted(idx[0].tolist()) == [0, 1, 2, 3]
    assert (aux_idx[:, 0] == 2).all() and torch.isinf(aux_vals[:, 1:]).all() and (aux_idx[:, 1:] == 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_sparse_decode_and_grads_match_float64_dense(shape):
    B, d, n, k = shape[:4]
    _decode_and_check(reference, B, d, n, k, salt=11)


@pytest.mark.parametrize("table_dtype", [torch.float64, torch.bfloat16])
def test_bag_decode_and_grads_match_float64_dense_over_bags_of_any_length(table_dtype):
    g = torch.Generator().manual_seed(3)
    n, d, sizes = 40, 6, [3, 0, 5, 1, 7, 2]  # an empty bag, and rows repeated within and across bags
    E = sum(sizes)
    vals = torch.randn(E, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.randint(0, n, (E,), generator=g)
    idx[1] = idx[0]
    offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
    W = torch.randn(n, d, dtype=torch.float64, generator=g).to(table_dtype).requires_grad_(True)
    out = reference.bag_decode(vals, idx, offsets, W)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=g)
    gv, gW = torch.autograd.grad(out, [vals, W], grad_out)
    # dense: a (bags, n) code matrix
    bag = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    Wr = W.detach().double().requires_grad_(True)
    vr = vals.detach().clone().requires_grad_(True)
    codes = torch.zeros(len(sizes), n, dtype=torch.float64).index_put((bag, idx), vr, accumulate=True)
    ref = codes @ Wr
    rv, rW = torch.autograd.grad(ref, [vr, Wr], grad_out)
    assert out.dtype == torch.float64 and torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gv, rv, rtol=1e-12, atol=1e-12)
    assert gW.dtype == table_dtype and not gW[torch.tensor([i for i in range(n) if i not in set(idx.tolist())])].any()
    assert torch.allclose(gW.double(), rW, rtol=1e-2 if table_dtype == torch.bfloat16 else 1e-12, atol=1e-12)


@pytest.mark.parametrize("table_dtype", [torch.float64, torch.bfloat16])
def test_triangle_decode_and_grads_match_float64_dense_over_the_blocks_on_or_after_each_layer(table_dtype):
    """Latent j (layer j mod L) writes into blocks >= its layer; the blocks before it are never read
    (filled with garbage here) and get no gradient; items at zero (a ReLU's zeros, padding) add nothing
    and get gradient 0; a latent repeated in a row sums."""
    g = torch.Generator().manual_seed(4)
    L, n, d, R, c = 3, 12, 5, 7, 4
    vals = torch.randn(R, c, dtype=torch.float64, generator=g)
    vals[1, 2] = vals[4] = 0.0
    idx = torch.randint(0, n, (R, c), generator=g)
    idx[0, 1] = idx[0, 0]
    W = torch.randn(n, L, d, dtype=torch.float64, generator=g).to(table_dtype)
    valid = torch.arange(L).unsqueeze(0) >= (torch.arange(n) % L).unsqueeze(1)  # (n, L)
    W = W.view(n, L * d).requires_grad_(True)
    v = vals.clone().requires_grad_(True)
    out = reference.triangle_decode(v, idx, W, L)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=g)
    gv, gW = torch.autograd.grad(out, [v, W], grad_out)
    Wr = (W.detach().double().view(n, L, d) * valid.unsqueeze(2)).view(n, L * d).requires_grad_(True)
    vr = vals.clone().requires_grad_(True)
    codes = torch.zeros(R, n, dtype=torch.float64).index_put((torch.arange(R).unsqueeze(1).expand(R, c), idx), vr,
                                                             accumulate=True)
    ref = codes @ Wr
    rv, rW = torch.autograd.grad(ref, [vr, Wr], grad_out)
    tol = {"rtol": 1e-2, "atol": 1e-2} if table_dtype == torch.bfloat16 else {"rtol": 1e-12, "atol": 1e-12}
    assert out.dtype == torch.float64 and torch.allclose(out, ref, **tol)
    assert torch.allclose(gv, torch.where(vals != 0, rv, 0.0), **tol) and (gv[vals == 0] == 0).all()
    assert gW.dtype == table_dtype and not gW.view(n, L, d)[~valid].any()
    rW = (rW.view(n, L, d) * valid.unsqueeze(2)).view(n, L * d)  # the dense gradient on the blocks in use
    assert torch.allclose(gW.double(), rW, rtol=1e-2 if table_dtype == torch.bfloat16 else 1e-12, atol=1e-12)


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [2, 3])
def test_scatter_rows_split_over_threads_gives_the_serial_sums_bit_for_bit(monkeypatch, table_dtype, threads):
    """The decoder's weight gradient, split into row ranges over threads, is the one serial product's
    to the bit (each row's entries are summed in the same order), row ranges left empty included."""
    g = torch.Generator().manual_seed(5)
    n, d, E, B = 50, 7, 3000, 40
    idx = torch.randint(0, n // 2, (E,), generator=g)  # the upper half of the rows gets nothing
    bags = torch.randint(0, B, (E,), generator=g).sort().values
    w, x = torch.randn(E, generator=g), torch.randn(B, d, generator=g)
    serial = reference.scatter_rows(w, idx, x, n, table_dtype, bags=bags)
    before = torch.get_num_threads()
    monkeypatch.setattr(reference, "PARALLEL_MIN_ENTRIES", 1)
    try:
        torch.set_num_threads(threads)
        assert reference._row_parts(E, n, x.device) == threads
        split = reference.scatter_rows(w, idx, x, n, table_dtype, bags=bags)
        tokens = reference.scatter_rows(w.view(B, -1), idx.view(B, -1), x, n, table_dtype)  # (B, K): row b's
    finally:
        torch.set_num_threads(before)
    assert split.dtype == table_dtype and torch.equal(split, serial)
    want = torch.zeros(n, d, dtype=torch.float64).index_add_(0, idx, w.double()[:, None] * x.double()[bags])
    assert torch.allclose(split.double(), want, rtol=1e-2 if table_dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    rows = torch.arange(B).repeat_interleave(E // B)
    assert torch.equal(tokens, reference.scatter_rows(w, idx, x, n, table_dtype, bags=rows))


def test_scatter_rows_over_threads_inside_a_backward_with_inputs_that_require_grad(monkeypatch):
    """Grad mode is per thread: the pool's threads have it on while a backward pass runs, so the split
    product must not refuse inputs that require grad (a JumpReLU/gated encoder's x does)."""
    g = torch.Generator().manual_seed(6)
    n, d, B, K = 40, 5, 30, 4
    idx = torch.randint(0, n, (B, K), generator=g)
    x = torch.randn(B, d, generator=g, requires_grad=True)
    w = torch.randn(B, K, generator=g, requires_grad=True)
    monkeypatch.setattr(reference, "PARALLEL_MIN_ENTRIES", 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert reference._row_parts(idx.numel(), n, x.device) == 2  # the pool's path, not the serial one
        with torch.no_grad():
            got = reference.scatter_rows(w, idx, x, n)
    finally:
        torch.set_num_threads(before)
    want = torch.zeros(n, d, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), w.detach().double().reshape(-1, 1) * x.detach().double().repeat_interleave(K, 0))
    assert torch.allclose(got.double(), want, atol=1e-5)


@pytest.mark.parametrize("select", ["fp32", "bf16"])
def test_reference_results_do_not_depend_on_chunk_and_never_allocate_batch_by_latents(select):
    from sae_dist import kernels as K

    B, d, n, k, k_aux, chunk = 64, 8, 512, 4, 6, 64
    K.set_select_precision(select)
    # the running top-k buffers up to 8 x (kept per row) columns: over-selected in bf16, never n
    buffered = 8 * (reference.OVERSELECT if select == "bf16" else 1) * max(k, k_aux)
    results = []
    for c in (chunk, 100, n):
        x, W, b, dead = _problem(B, d, n, 40, salt=5)
        xs, Ws, bs, Wd = (
            x.requires_grad_(),
            W.requires_grad_(),
            b.requires_grad_(),
            W.detach().clone().requires_grad_(),
        )
        with _LargestTensor() as probe:
            vals, idx, aux, aux_idx = reference.topk_encode(xs, Ws, bs, k, c, dead, k_aux)
            x_hat = reference.sparse_decode(vals.relu(), idx, Wd)
            (x_hat.square().sum() + aux.masked_fill(~torch.isfinite(aux), 0).sum()).backward()
        if c == chunk:
            assert probe.largest <= max(B * chunk, n * d, B * buffered), (
                f"a tensor of {probe.largest} elements; B x n = {B * n}"
            )
        results.append((vals, idx, aux_idx, xs.grad, Ws.grad, bs.grad, Wd.grad))
    for other in results[1:]:
        assert torch.equal(results[0][1], other[1]) and torch.equal(
            results[0][2].sort(1)[0], other[2].sort(1)[0]
        )
        for a, b in zip(results[0][3:] + results[0][:1], other[3:] + other[:1]):
            _close(a, b, torch.float32, "chunked vs unchunked")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN (floats) or a huge id (ints) while a Triton launcher runs."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(True if t.dtype == torch.bool else torch.iinfo(t.dtype).max)

    monkeypatch.setattr(torch, "empty", empty)


@needs_triton
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_topk_encode_and_grads_match_float64_dense(shape, deterministic, poisoned_empty):
    triton_ops.set_deterministic(deterministic)
    try:
        _encode_and_check(triton_ops, *shape, salt=21)
    finally:
        triton_ops.set_deterministic(True)


@needs_triton
@pytest.mark.parametrize("shape", [(9, 24, 150, 5, 70, 100), (6, 17, 90, 4, 80, 30)])
def test_triton_wide_auxk_runs_over_the_dead_latents(shape, poisoned_empty):
    """k_aux above FUSED_AUX_MAX (the SAE's default d/2 is): AuxK is a separate pass over the dead
    latents, the same results and gradients; fewer dead latents than k_aux pad with -inf at latent 0."""
    from sae_dist.kernels.triton_encoder import FUSED_AUX_MAX, _pad

    assert _pad(shape[4]) > FUSED_AUX_MAX
    _encode_and_check(triton_ops, *shape, salt=81)


@needs_triton
@pytest.mark.parametrize("n_splits", [1, 3])
def test_triton_encoder_latent_splits_and_small_blocks_give_the_same_top_k(n_splits, poisoned_empty):
    x, W, b, dead = _problem(37, 24, 100, 30, salt=31)
    pre64 = x.double() @ W.double().T + b.double()
    vals, idx, aux, aux_idx = triton_ops.topk_encode_fwd(
        x, W, b, 5, dead, 7, n_splits=n_splits, block_b=16, block_n=16, block_d=16
    )
    _check_topk(vals, idx, pre64, 5, torch.float32, "split top-k")
    _check_topk(aux, aux_idx, pre64, 7, torch.float32, "split aux top-k", mask=dead)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_sparse_decode_and_grads_match_float64_dense(shape, poisoned_empty):
    B, d, n, k = shape[:4]
    _decode_and_check(triton_ops, B, d, n, k, salt=41)


@needs_triton
def test_triton_bf16_encode_and_decode_within_bf16_bounds(poisoned_empty):
    _encode_and_check(triton_ops, *SHAPES[0], salt=51, dtype=torch.bfloat16)
    _decode_and_check(triton_ops, 37, 24, 100, 5, salt=52, dtype=torch.bfloat16)


MIXED = [
    pytest.param("torch", "fp32", id="torch-fp32-select"),
    pytest.param("torch", "bf16", id="torch-bf16-select"),
    pytest.param("triton", "fp32", id="triton", marks=needs_triton),
]


@pytest.mark.parametrize("path,select", MIXED)
def test_bf16_weights_under_fp32_activations(path, select, poisoned_empty):
    """trainer.param_dtype=bf16: weights stored in bf16, activations, values and the decode in fp32,
    weight gradients in bf16. The torch path upcasts the weights (fp32 bounds on the values), with either
    top-k selection; the Triton path multiplies in bf16 (x rounded: bf16 bounds), accumulates in fp32."""
    kernels.set_select_precision(select)
    ops = reference if path == "torch" else triton_ops
    value_bound = torch.float32 if path == "torch" else torch.bfloat16
    B, d, n, k, k_aux, n_dead = SHAPES[0]
    x, W, b, dead = _problem(B, d, n, n_dead, salt=71)
    W, b = W.to(torch.bfloat16), b.to(torch.bfloat16)
    pre64 = x.double() @ W.double().T + b.double()
    xs, Ws, bs = x.clone().requires_grad_(), W.clone().requires_grad_(), b.clone().requires_grad_()
    vals, idx, aux_vals, aux_idx = ops.topk_encode(xs, Ws, bs, k, aux_mask=dead, k_aux=k_aux)
    assert vals.dtype == aux_vals.dtype == torch.float32
    _check_topk(vals, idx, pre64, k, value_bound, "mixed top-k")
    _check_topk(aux_vals, aux_idx, pre64, k_aux, value_bound, "mixed aux top-k", mask=dead)
    g = _gen(72)
    gv, ga = _randn(*vals.shape, g=g), _randn(*aux_vals.shape, g=g).masked_fill(~torch.isfinite(aux_vals), 0)
    ((gv * vals).sum() + (ga * aux_vals.masked_fill(~torch.isfinite(aux_vals), 0)).sum()).backward()
    want = _dense64_encode_grads(x, W, b, idx, aux_idx, gv, ga)
    assert (xs.grad.dtype, Ws.grad.dtype, bs.grad.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)
    _close(xs.grad, want[0], value_bound, "mixed encoder grad of x")
    _close(Ws.grad, want[1], torch.bfloat16, "mixed encoder grad of W")
    _close(bs.grad, want[2], torch.bfloat16, "mixed encoder grad of b")

    vals = _randn(B, k, g=g)
    grad_out = _randn(B, d, g=g)
    vs, Wd = vals.clone().requires_grad_(), W.clone().requires_grad_()
    out = ops.sparse_decode(vs, idx, Wd)
    out.backward(grad_out)
    v64, W64 = vals.double().requires_grad_(), W.double().requires_grad_()
    out64 = (v64.unsqueeze(2) * W64[idx]).sum(1)
    out64.backward(grad_out.double())
    assert (out.dtype, vs.grad.dtype, Wd.grad.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    _close(out, out64, torch.float32, "mixed decode")
    _close(vs.grad, v64.grad, torch.float32, "mixed decode grad of vals")
    _close(Wd.grad, W64.grad, torch.bfloat16, "mixed decode grad of W_dec")


@needs_triton
def test_triton_weight_grads_are_bitwise_deterministic():
    first = _decode_and_check(triton_ops, 37, 24, 100, 5, salt=61)[1]
    again = _decode_and_check(triton_ops, 37, 24, 100, 5, salt=61)[1]
    assert torch.equal(first, again)


@needs_triton
def test_sae_topk_auxk_step_is_the_same_on_triton_and_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_dist.kernels.triton_ops", triton_ops)
    monkeypatch.setattr(kernels, "triton_ops", triton_ops, raising=False)
    cfg = sae_config(arch="topk", n_latents=100, k=5, k_aux=7)
    x = _randn(37, 24, g=_gen(71))
    dead = torch.zeros(100, dtype=torch.bool, device=DEVICE)
    dead[::3] = True
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SAE_DIST_KERNELS", backend)
        sae = SparseAutoencoder(
            cfg, d_model=24, encoder_chunk=33, generator=torch.Generator().manual_seed(SEED)
        ).to(DEVICE)
        out = sae(x, dead)
        out.loss.backward()
        grads[backend] = [out.loss.detach()] + [p.grad for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    for name, a, b in zip(["loss", "W_enc", "b_enc", "W_dec", "b_dec"], grads["torch"], grads["triton"]):
        _close(b, a, torch.float32, f"SAE {name} triton vs torch")


def test_triton_kernels_compile_for_a100_and_h100_without_spills(tmp_path):
    """Triton's compiler and ptxas (shipped with Triton) build every kernel for sm_80 and sm_90 with the
    launchers' constexprs, no GPU needed; none spills registers to local memory (the fused AuxK did at
    k_aux = 384 before it moved to its own pass, the threshold encoder at 64 rows per program)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "compile_kernels.py")
    proc = subprocess.run([sys.executable, script, "--d", "768", "--k-aux", "64", "384"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| 768")]
    # fp32 and bf16, sm_80 and sm_90: the top-k encoder alone and with AuxK 64 fused (384 is a torch pass),
    # the threshold encoder, 4 more
    assert len(rows) == 2 * 2 * 7, proc.stdout
    assert sum("threshold_encode" in r[2] for r in rows) == 2 * 2, proc.stdout
    assert {r[3].strip() for r in rows} == {"sm_80", "sm_90a"}
    for r in rows:
        assert r[5].strip() == "0 / 0", f"{r[2]} on {r[3]} spills: {r[5]}"


@pytest.mark.skipif(
    not NO_TRITON.startswith("triton was imported"), reason="the kernels loaded in this process"
)
def test_triton_kernels_in_a_fresh_process():
    env = {**os.environ, "SAE_DIST_TEST_SEED": str(SEED)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-k", "triton", __file__],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


@unittest.skipUnless(torch.cuda.is_available(), "compiling the Triton kernels needs a CUDA GPU")
@needs_triton
@pytest.mark.skipif(
    torch.cuda.is_available() and DEVICE != "cuda", reason="SAE_DIST_TEST_DEVICE=cpu: interpreted"
)
def test_compiled_kernels_match_reference_at_training_shape():
    B, d, n, k = 2048, 384, 20000, 32
    x, W, b, dead = _problem(B, d, n, 3000, salt=81)
    got = triton_ops.topk_encode(x, W, b, k, aux_mask=dead, k_aux=d // 2)
    want = reference.topk_encode(x, W, b, k, 8192, dead, d // 2)
    _close(got[0], want[0], torch.float32, "compiled top-k values")
    assert (got[1] == want[1]).float().mean() > 0.999, f"compiled top-k ids differ (seed {SEED})"
    _close(got[2].sort(1)[0], want[2].sort(1)[0], torch.float32, "compiled aux values")
    vals = got[0].relu().requires_grad_()
    Ws = W.clone().requires_grad_()
    Wr = W.clone().requires_grad_()
    triton_ops.sparse_decode(vals, got[1], Ws).square().sum().backward()
    reference.sparse_decode(vals.detach(), got[1], Wr).square().sum().backward()
    _close(Ws.grad, Wr.grad, torch.float32, "compiled decoder weight grad")


def _select_both(x, W, b, k, chunk, dead, k_aux):  # type: ignore[no-untyped-def]
    from sae_dist.kernels import reference as R

    from sae_dist import kernels as K

    K.set_select_precision("fp32")
    exact = R.topk_encode_forward(x, W, b, k, chunk, dead, k_aux)
    before = dict(R.SELECT_STATS)
    K.set_select_precision("bf16")
    try:
        fast = R.topk_encode_forward(x, W, b, k, chunk, dead, k_aux)
    finally:
        K.set_select_precision("fp32")
    fallback = R.SELECT_STATS["fallback_rows"] - before["fallback_rows"]
    return exact, fast, fallback


@pytest.mark.parametrize("near_ties", [False, True])
def test_bf16_selection_gives_exactly_the_fp32_topk(near_ties):
    """trainer.encoder_select=bf16: bf16 candidates, exact fp32 ranking, and the rounding bound that
    proves completeness; rows it cannot prove (forced here by near-duplicate latents) fall back to fp32."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    B, d, n, k = 257, 96, 1000, 16
    x = torch.randn(B, d, generator=g)
    W = torch.randn(n, d, generator=g) / d**0.5
    b = torch.randn(n, generator=g) * 0.1
    if near_ties:  # 100 near-copies of each of 10 latents: bf16 cannot order them
        W = W[:10].repeat(100, 1) * (1 + 1e-4 * torch.randn(n, 1, generator=g))
        b = b[:10].repeat(100)
    dead = torch.rand(n, generator=g) < 0.2
    exact, fast, fallback = _select_both(x, W, b, k, 300, dead, 24)
    if near_ties:
        assert fallback > 0  # the bound noticed
    pre = x.double() @ W.double().T + b.double()  # (B, n) fine at this size
    for j in (0, 2):
        assert torch.equal(fast[j + 1].sort(1).values, exact[j + 1].sort(1).values), "selections differ"
        assert torch.allclose(fast[j].double(), pre.gather(1, fast[j + 1]), rtol=0, atol=1e-5)
    assert bool(dead[fast[3]].all())
    assert torch.allclose(fast[0], exact[0], rtol=1e-6, atol=1e-6)  # sorted the same way


def test_bf16_rounding_bound_holds_for_every_latent():
    """The bound `_bf16_upper_bound` rests on: exact <= bound(bf16 value) for all (row, latent), at
    several scales and with large biases."""
    from sae_dist.kernels import reference as R

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for scale, bias in ((1.0, 0.0), (1e3, 5.0), (1e-3, 1e-2)):
        x = torch.randn(300, 384, generator=g) * scale
        W = torch.randn(2000, 384, generator=g) * torch.rand(2000, 1, generator=g)
        b = torch.randn(2000, generator=g) * bias * scale
        approx = torch.addmm(b.bfloat16(), x.bfloat16(), W.bfloat16().t()).float()
        exact = x.double() @ W.double().T + b.double()
        slack = R._bf16_slack(x, W, b)
        upper = torch.stack([R._bf16_upper_bound(col, slack) for col in approx.T], dim=1).double()
        assert bool((exact <= upper).all()), float((exact - upper).max())
        lower = -torch.stack([R._bf16_upper_bound(-col, slack) for col in approx.T], dim=1).double()
        assert bool((exact >= lower).all())  # and symmetric: the error itself is bounded


@pytest.mark.parametrize("select", ["fp32", "bf16"])
def test_mostly_dead_blocks_skip_entries_below_the_running_floors(monkeypatch, select):
    """Blocks that are mostly dead pass to the running selections only their entries above both
    selections' k-th values so far (`_above_floor`): the top-k and AuxK's top k_aux stay those of float64
    dense maths, gradients included, and the short cut does run (after the first blocks) and is refused
    while a floor is still -inf."""
    from sae_dist import kernels as K

    calls = {"packed": 0, "refused": 0}
    real = reference._above_floor

    def counted(pre, floor, keep):  # type: ignore[no-untyped-def]
        out = real(pre, floor, keep)
        calls["packed" if out is not None else "refused"] += 1
        return out

    monkeypatch.setattr(reference, "_above_floor", counted)
    K.set_select_precision(select)
    fallback = reference.SELECT_STATS["fallback_rows"]
    try:
        # 90% dead: every 128-latent block has >= max(k, k_aux, 64) dead ones (3x both in bf16)
        _encode_and_check(reference, 48, 16, 4096, 4, 24, 3686, salt=11, chunk=128)
    finally:
        K.set_select_precision("fp32")
    assert calls["packed"] > 10 and calls["refused"] >= 1, calls
    # bf16: the candidates came from the short cut, not from the fp32 recompute of rows it left unproven
    assert reference.SELECT_STATS["fallback_rows"] == fallback


def test_above_floor_packs_exactly_the_entries_above_each_rows_floor():
    """`_above_floor` keeps each row's entries strictly above its floor, with their columns, and pads
    with -inf at column 0; it steps aside while a floor is -inf or when over an eighth of the block
    passes."""
    g = _gen(13)
    B, c = 9, 256
    pre = torch.randn(B, c, generator=g)
    floor = pre.topk(5, dim=1).values[:, -1] - 1e-3 * torch.rand(B, generator=g)  # ~5 above each
    floor[2] = pre[2].max()  # none above in this row
    keep = torch.empty(B * c, dtype=torch.bool)
    vals, idx = reference._above_floor(pre, floor, keep)
    for r in range(B):
        want = sorted((pre[r] > floor[r]).nonzero().squeeze(1).tolist())
        got = sorted(idx[r][torch.isfinite(vals[r])].tolist())
        assert got == want, f"row {r}"
        assert torch.equal(vals[r][torch.isfinite(vals[r])], pre[r, idx[r][torch.isfinite(vals[r])]])
        assert (idx[r][~torch.isfinite(vals[r])] == 0).all()
    assert vals.shape[1] == max(len((pre[r] > floor[r]).nonzero()) for r in range(B))
    assert reference._above_floor(pre, torch.full((B,), -1.0), keep) is None  # most entries pass
    assert reference._above_floor(pre, floor.index_fill(0, torch.tensor([4]), float("-inf")), keep) is None
