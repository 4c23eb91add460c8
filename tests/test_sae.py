"""The SAE architectures: float64 gradient checks, training on synthetic data, decoder constraints."""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_config

from sae_dist.config import sae_config
from sae_dist.run import train
from sae_dist.sae import SparseAutoencoder

_OWN = {
    "topk": {"k_aux": 4}, "batchtopk": {"k_aux": 4}, "matryoshka": {"k_aux": 4, "prefixes": [3, 10, 24]},
    "jumprelu": {"bandwidth": 0.5, "threshold_init": 0.1, "init_l0": 0}, "gated": {"init_l0": 0, "l1_coef": 0.5},
    "relu": {},
}


def _tiny(arch: str, **kw) -> SparseAutoencoder:
    cfg = sae_config(arch=arch, n_latents=24, k=3, **{**_OWN[arch], **kw})
    g = torch.Generator().manual_seed(1)
    sae = SparseAutoencoder(cfg, d_model=6, encoder_chunk=7, generator=g).double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=g)
        sae.b_dec.normal_(0, 0.1, generator=g)
    return sae


@pytest.mark.parametrize("arch", sorted(_OWN))
def test_float64_gradcheck_every_arch(arch):
    sae = _tiny(arch)
    x = torch.randn(5, 6, dtype=torch.float64)
    # JumpReLU's threshold gradient is a straight-through estimate, not the true derivative, so the
    # check covers the parameters whose gradients are exact; the threshold is held fixed. Gated's
    # auxiliary loss decodes through a frozen copy of the decoder (a stop-gradient by design), so there
    # the decoder is held fixed; test_sparse_threshold_families_match_their_dense_form checks it.
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] if arch != "gated" else ["W_enc", "b_enc", "r_mag", "b_mag"]
    inputs = [getattr(sae, n).detach().clone().requires_grad_(True) for n in names]

    def fn(*ps):
        params = dict(zip(names, ps))
        return torch.func.functional_call(sae, params, (x,)).loss

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def _dense_topk_auxk_loss(x, W_enc, b_enc, W_dec, b_dec, dead, k, k_aux, aux_coef):
    """TopK + AuxK written densely from the paper's definitions, as an independent reference."""
    pre = (x - b_dec) @ W_enc.T + b_enc
    top = pre.topk(k, dim=1)
    f = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    x_hat = f @ W_dec + b_dec
    fvu = lambda a, b: (a - b).pow(2).sum() / (a - a.mean(0)).pow(2).sum()  # noqa: E731
    residual = (x - x_hat).detach()
    aux_top = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
    f_aux = torch.zeros_like(pre).scatter(1, aux_top.indices, aux_top.values.relu())
    scale = min(1.0, int(dead.sum()) / k_aux)
    return fvu(x, x_hat) + aux_coef * scale * fvu(residual, f_aux @ W_dec)


def test_auxk_gradient_matches_dense_reference():
    sae = _tiny("topk")
    x = torch.randn(7, 6, dtype=torch.float64)
    dead = torch.zeros(24, dtype=torch.bool)
    dead[::3] = True
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]
    loss = sae(x, dead).loss
    grads = torch.autograd.grad(loss, [getattr(sae, n) for n in names])
    ref_in = [getattr(sae, n).detach().clone().requires_grad_(True) for n in names]
    ref = _dense_topk_auxk_loss(x, *ref_in, dead, sae.cfg.k, sae.k_aux, sae.cfg.aux_coef)
    ref_grads = torch.autograd.grad(ref, ref_in)
    assert torch.allclose(loss, ref, rtol=1e-10)
    assert "auxk" in sae(x, dead).terms
    for name, g, r in zip(names, grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-10), name


def test_topk_gives_exactly_k_active_and_unit_decoder_after_step(tmp_path):
    cfg = synthetic_config(tmp_path, trainer={"total_tokens": 256 * 5})
    out = train(cfg)
    assert out["l0"] <= cfg.sae.k + 1e-6
    from sae_dist.export import load_saelens

    sae, meta = load_saelens(out["export_dir"])
    norms = sae.W_dec.norm(dim=1) * meta["sae_dist_scale"]
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


# FVU bounds on the synthetic task (d=32, 128 true features, 3 active, 256 latents, 40 steps of 256
# tokens): the mean-only predictor has FVU 1.0; a dictionary that has found most true directions is far
# below. The bound is loose enough for every arch's short run yet fails for an SAE that did not learn.
@pytest.mark.parametrize(
    "arch,sae_over,bound",
    [
        ("topk", {}, 0.35),
        ("batchtopk", {}, 0.35),
        ("jumprelu", {"l0_coef": 2e-4, "threshold_init": 0.05, "bandwidth": 0.05}, 0.35),
        ("relu", {"l1_coef": 0.3, "resample_every": 20}, 0.35),
    ],
)
def test_every_arch_learns_synthetic_data(tmp_path, arch, sae_over, bound):
    cfg = synthetic_config(tmp_path, sae={"arch": arch, **sae_over},
                           trainer={"total_tokens": 256 * 150, "lr": 3e-3, "warmup_tokens": 2560})
    out = train(cfg)
    assert out["fvu"] < bound, out
    assert out["l0"] > 0


def test_batchtopk_threshold_ignores_a_batch_where_nothing_fired():
    sae = _tiny("batchtopk")
    x = torch.randn(5, 6, dtype=torch.float64)
    sae(x)
    learned = float(sae.threshold)
    assert learned >= 0
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)  # every pre-activation negative: no latent fires
    sae(x)
    assert float(sae.threshold) == learned


def _fvu(a, b):
    return (a - b).pow(2).sum() / (a - a.mean(0)).pow(2).sum()


class _DenseJump(torch.autograd.Function):
    """H(pre - t) * pre (or H alone) on a dense (B, n) matrix, with Gemma Scope's pseudo-derivatives
    written out here independently of sae_dist.archs."""

    @staticmethod
    def forward(ctx, pre, t, eps, times_pre):
        ctx.save_for_backward(pre, t)
        ctx.eps, ctx.times_pre = eps, times_pre
        step = (pre > t).to(pre.dtype)
        return step * pre if times_pre else step

    @staticmethod
    def backward(ctx, g):
        pre, t = ctx.saved_tensors
        kernel = ((pre - t).abs() < ctx.eps / 2).to(pre.dtype) / ctx.eps
        if ctx.times_pre:
            return g * (pre > t), (-t * kernel * g).sum(0), None, None
        return None, (-kernel * g).sum(0), None, None


def _dense_jumprelu_loss(x, W_enc, b_enc, W_dec, b_dec, log_threshold, cfg):
    pre = (x - b_dec) @ W_enc.T + b_enc
    t = log_threshold.exp()
    f = _DenseJump.apply(pre, t, cfg.bandwidth, True)
    l0 = _DenseJump.apply(pre, t, cfg.bandwidth, False).sum(1).mean()
    return _fvu(x, f @ W_dec + b_dec) + cfg.l0_coef * l0


def _dense_gated_loss(x, W_enc, b_enc, W_dec, b_dec, r_mag, b_mag, cfg):
    proj = (x - b_dec) @ W_enc.T
    gate = proj + b_enc
    f = (gate > 0).to(x.dtype) * (r_mag.exp() * proj + b_mag).relu()
    aux = _fvu(x, gate.relu() @ W_dec.detach() + b_dec.detach())
    return _fvu(x, f @ W_dec + b_dec) + cfg.l1_coef * gate.relu().sum(1).mean() / x.shape[1] + aux


def _dense_matryoshka_loss(x, W_enc, b_enc, W_dec, b_dec, cfg):
    pre = ((x - b_dec) @ W_enc.T + b_enc).relu()
    keep = torch.zeros(pre.numel(), dtype=torch.bool)
    keep[pre.flatten().topk(x.shape[0] * cfg.k).indices] = True
    f = pre * keep.view_as(pre)
    losses = [_fvu(x, f[:, :m] @ W_dec[:m] + b_dec) for m in cfg.prefix_sizes()]
    return torch.stack(losses).mean()


@pytest.mark.parametrize("arch", ["jumprelu", "gated", "matryoshka"])
def test_sparse_families_match_their_dense_form(arch):
    """The sparse path (threshold kernel / batch selection + prefix buckets) against the family's dense
    definition in float64: loss, reconstruction and every parameter's gradient, straight-through
    threshold gradients included."""
    own = {"jumprelu": {"bandwidth": 0.3, "threshold_init": 0.2, "l0_coef": 0.05},
           "gated": {"l1_coef": 0.7}, "matryoshka": {"aux_coef": 0.0}}[arch]
    sae = _tiny(arch, **own)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("r_mag", "b_mag", "log_threshold"):
            if hasattr(sae, name):
                getattr(sae, name).add_(0.3 * torch.randn(sae.n_local, generator=g, dtype=torch.float64))
    x = torch.randn(9, 6, dtype=torch.float64, generator=g)
    names = [n for n, _ in sae.named_parameters()]
    out = sae(x)
    grads = torch.autograd.grad(out.loss, [getattr(sae, n) for n in names])
    ref_in = {n: getattr(sae, n).detach().clone().requires_grad_(True) for n in names}
    dense = {"jumprelu": _dense_jumprelu_loss, "gated": _dense_gated_loss, "matryoshka": _dense_matryoshka_loss}[arch]
    ref = dense(x, **ref_in, cfg=sae.cfg)
    ref_grads = torch.autograd.grad(ref, list(ref_in.values()))
    assert 0 < float(out.terms["l0"]) < sae.n_local  # neither empty nor dense: the test means something
    assert torch.allclose(out.loss, ref, rtol=1e-10, atol=0), (float(out.loss), float(ref))
    for name, got, want in zip(names, grads, ref_grads):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-10), f"{name}: {(got - want).abs().max()}"


def test_matryoshka_smallest_prefix_is_trained_to_reconstruct_alone():
    """The point of the method: with the same selection, a Matryoshka loss moves the first latents
    toward reconstructing on their own; plain BatchTopK's loss ignores how they do alone."""
    mat, plain = _tiny("matryoshka", aux_coef=0.0), _tiny("batchtopk", aux_coef=0.0)
    plain.load_state_dict(mat.state_dict())
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = mat(x)
    assert torch.allclose(out.x_hat, plain(x).x_hat)
    assert not torch.allclose(out.terms["fvu_prefix0"], out.terms["fvu"])
    assert not torch.allclose(out.loss, out.terms["fvu"])  # the prefixes' losses count too


def test_topk_encoder_starts_at_the_least_squares_scale_of_its_first_reconstruction():
    """sae.encoder_scale=0 (topk's default) scales the transposed decoder so that on the first batch
    <x - b_dec, r> = <r, r> for the decoded top-k r: the selection is unchanged (b_enc is 0) and the
    reconstruction error can only fall. A positive value is taken as it is."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(8, 16, generator=g)
    x = (torch.randn(512, 8, generator=g) * torch.linspace(3, 0.3, 8)) @ basis + 2.0  # anisotropic, off-centre

    def fresh(**kw) -> SparseAutoencoder:
        cfg = sae_config(arch="topk", n_latents=96, k=6, **kw)
        return SparseAutoencoder(cfg, d_model=16, encoder_chunk=32, generator=torch.Generator().manual_seed(1)).double()

    plain, auto = fresh(encoder_scale=1.0), fresh()
    xd = x.double()
    with torch.no_grad():
        W = plain.W_enc.clone()
        plain.init_from_batch(xd)
        assert torch.equal(plain.W_enc, W)  # 1.0: Gao et al.'s plain transpose
        auto.init_from_batch(xd)
        s = float(auto.W_enc.norm(dim=1).mean())
        assert 0.2 < s < 0.95 and torch.allclose(auto.W_enc, W * s)  # k correlated directions overshoot
        vals, idx = auto.encode_sparse(xd)
        r = auto.decode_sparse(vals, idx) - auto.b_dec
        xc = xd - auto.b_dec
        assert float((xc * r).sum() / r.pow(2).sum()) == pytest.approx(1.0, rel=1e-9)
        assert torch.equal(idx.sort(1).values, plain.encode_sparse(xd)[1].sort(1).values)  # same selection
        err = lambda sae: float((xd - sae(xd).x_hat).pow(2).sum())  # noqa: E731
        assert err(auto) < err(plain)
        half = fresh(encoder_scale=0.5)
        half.init_from_batch(xd)
        assert torch.allclose(half.W_enc, W * 0.5)


def test_trained_fraction_counts_the_latents_that_fired_in_training(tmp_path):
    """One step of 16 tokens with k = 4 can fire at most 64 of 256 latents; the held-out dead fraction
    (another set of tokens) says nothing of that, the training counters do."""
    one = train(synthetic_config(tmp_path / "one", trainer={"total_tokens": 16, "batch_tokens": 16, "warmup_tokens": 0}))
    assert one["steps"] == 1
    assert 4 / 256 <= one["trained_fraction"] <= 64 / 256, one["trained_fraction"]
    many = train(synthetic_config(tmp_path / "many", trainer={"total_tokens": 256 * 20}))
    assert many["trained_fraction"] > 64 / 256 and many["trained_fraction"] >= 1 - many["dead_fraction"] - 0.05
