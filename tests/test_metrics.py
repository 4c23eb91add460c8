"""The held-out metrics (sae_dist.metrics) against their formulas in docs/eval.md, computed here the
plain way: every token's reconstruction in one tensor, every pairwise cosine in one matrix."""

from __future__ import annotations

import pytest
import torch

from sae_dist.config import sae_config
from sae_dist.metrics import evaluate, max_cosine_similarity, weight_metrics
from sae_dist.sae import SparseAutoencoder


def _sae(d=16, n=64, k=4, seed=0) -> SparseAutoencoder:
    sae = SparseAutoencoder(sae_config(n_latents=n, k=k), d, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return sae.eval()


def test_heldout_metrics_equal_their_formulas_over_exactly_the_first_tokens():
    sae = _sae()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(100, 16, generator=g) * 3 + 1 for _ in range(4)]
    got = evaluate(sae, batches, 1.0, 250)  # two whole batches and half of the third

    rows, counted = [], 250
    with torch.no_grad():
        for x in batches[:3]:  # each batch encoded whole, as the metrics do
            vals, idx = sae.encode_sparse(x)
            f = torch.zeros(x.shape[0], 64).scatter_(1, idx, vals)
            rows.append((x, sae.decode_sparse(vals, idx), f))
    x = torch.cat([r[0] for r in rows])[:counted].double()
    x_hat = torch.cat([r[1] for r in rows])[:counted].double()
    f = torch.cat([r[2] for r in rows])[:counted].double()
    err = (x - x_hat).pow(2).sum(1)
    fvu = err.sum() / (x - x.mean(0)).pow(2).sum()
    legacy = torch.cat([1 - err[i : i + 100] / (x[i : i + 100] - x[i : i + 100].mean(0)).pow(2).sum(1)
                        for i in range(0, counted, 100)]).mean()
    density = (f > 0).double().mean(0)
    cuts = [slice(i, min(i + 100, counted)) for i in range(0, counted, 100)]  # the batches as counted
    rrb = torch.stack([x_hat[c].pow(2).sum(1).mean() / (x[c] * x_hat[c]).sum(1).mean() for c in cuts]).mean()
    sb_x2 = torch.stack([x[c].pow(2).sum(1).mean() for c in cuts]).mean()
    sb_err = torch.stack([err[c].mean() for c in cuts]).mean()
    want = {
        "fvu": fvu, "explained_variance": 1 - fvu, "explained_variance_legacy": legacy,
        "mse": err.mean(), "cossim": torch.nn.functional.cosine_similarity(x, x_hat, dim=1, eps=0).mean(),
        "l2_norm_in": x.norm(dim=1).mean(), "l2_norm_out": x_hat.norm(dim=1).mean(),
        "l2_ratio": (x_hat.norm(dim=1) / x.norm(dim=1)).mean(),
        "relative_reconstruction_bias": rrb,
        "l0": (f > 0).double().sum(1).mean(), "l1": f.sum(1).mean(),
        "dead_fraction": (density == 0).double().mean(), "frac_alive": (density > 0).double().mean(),
        "freq_over_1_percent": (density > 0.01).double().mean(), "freq_over_10_percent": (density > 0.1).double().mean(),
        "dense_fraction": (density > 0.1).double().mean(),
        "normalized_freq_over_1_percent": density[density > 0.01].sum() / density.sum(),
        "normalized_freq_over_10_percent": density[density > 0.1].sum() / density.sum(),
        "tokens": torch.tensor(250.0),
        "mse_saebench": torch.cat([err[c] / len(err[c]) for c in cuts]).mean(),
        "explained_variance_saebench": 1 - sb_err / (sb_x2 - (sb_x2 / 16) ** 2),
    }
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), rel=1e-9, abs=1e-12), key
    assert 0 < got["fvu"] < 1.5 and 0 < got["freq_over_10_percent"] < 1  # a case where the figures say something


def test_scale_is_applied_to_the_activations_and_fvu_does_not_depend_on_it():
    sae = _sae()
    x = [torch.randn(64, 16, generator=torch.Generator().manual_seed(5))]
    a, b = evaluate(sae, x, 1.0, 64), evaluate(sae, [x[0] * 2.5], 1.0, 64)
    assert evaluate(sae, x, 2.5, 64) == b
    assert a["fvu"] != b["fvu"]  # the SAE is not scale-invariant: the scale reached the SAE


def test_blocked_max_cosine_equals_the_full_matrix_and_ignores_only_the_latent_itself():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 24, generator=g)
    w[7] = 3 * w[5]  # a duplicate direction has cosine 1 with its twin
    unit = torch.nn.functional.normalize(w, dim=1)
    full = unit @ unit.t()
    full.fill_diagonal_(-float("inf"))
    want = full.max(1).values
    got = max_cosine_similarity(w, torch.arange(300), query_block=64, key_block=50)
    assert torch.allclose(got, want, atol=1e-6) and got[5] == pytest.approx(1.0, abs=1e-6)
    some = torch.tensor([0, 5, 77, 299])
    assert torch.allclose(max_cosine_similarity(w, some, query_block=3, key_block=37), want[some], atol=1e-6)


def test_sampled_max_cosine_is_within_its_standard_error_of_the_exact_average():
    sae = _sae(d=32, n=2048, k=8)
    exact = weight_metrics(sae, max_cos_latents=0)
    sampled = weight_metrics(sae, max_cos_latents=256, seed=1)
    assert exact["max_cos_latents"] == 2048 and sampled["max_cos_latents"] == 256
    for name in ("encoder", "decoder"):
        key = f"average_max_{name}_cosine_sim"
        assert exact[f"{key}_stderr"] == 0 and 0 < sampled[f"{key}_stderr"] < 0.01
        assert abs(sampled[key] - exact[key]) < 4 * sampled[f"{key}_stderr"]
