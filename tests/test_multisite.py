"""Dictionaries across sites: transcoders, skip-transcoders and crosscoders. The sparse path against
the dense definition in float64, ground-truth recovery on synthetic multi-site data, the whole job on
MiniLM's MLP, per-site FVU, and the site checks."""

from __future__ import annotations

import pytest
import torch
from conftest import pydoc_jsonl, synthetic_config

from sae_dist.config import ConfigError, sae_config, validate
from sae_dist.data.synthetic import SyntheticSource
from sae_dist.export import export_saelens, load_saelens
from sae_dist.run import train
from sae_dist.sae import SparseAutoencoder


def _dense_loss(x_in, y, W_enc, b_enc, W_dec, b_dec, W_skip, dead, k, k_aux, aux_coef):
    """The transcoder written densely: no b_dec on the input, the skip added to the output."""
    pre = x_in @ W_enc.T + b_enc
    top = pre.topk(k, dim=1)
    f = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    y_hat = f @ W_dec + b_dec + (x_in @ W_skip.T if W_skip is not None else 0)
    fvu = lambda a, b: (a - b).pow(2).sum() / (a - a.mean(0)).pow(2).sum()  # noqa: E731
    aux_top = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
    f_aux = torch.zeros_like(pre).scatter(1, aux_top.indices, aux_top.values.relu())
    return fvu(y, y_hat) + aux_coef * min(1.0, int(dead.sum()) / k_aux) * fvu((y - y_hat).detach(), f_aux @ W_dec)


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder"])
def test_sparse_path_matches_the_dense_definition_in_float64(arch):
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(sae_config(arch=arch, n_latents=24, k=3, k_aux=4), 6, generator=g).double()
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1, generator=g)
        sae.b_dec.normal_(generator=g)
        if arch == "skip_transcoder":
            sae.W_skip.normal_(std=0.3, generator=g)
    x = torch.randn(7, 2, 6, dtype=torch.float64, generator=g)
    dead = torch.zeros(24, dtype=torch.bool)
    dead[::3] = True
    names = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip") if hasattr(sae, n)]
    out = sae(x, dead)
    assert "auxk" in out.terms
    grads = torch.autograd.grad(out.loss, [getattr(sae, n) for n in names])
    ref_in = {n: getattr(sae, n).detach().clone().requires_grad_(True) for n in names}
    ref = _dense_loss(x[:, 0], x[:, 1], *(ref_in.get(n) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip")),
                      dead, 3, 4, sae.cfg.aux_coef)
    ref_grads = torch.autograd.grad(ref, list(ref_in.values()))
    assert torch.allclose(out.loss, ref, rtol=1e-10)
    for name, got, want in zip(names, grads, ref_grads):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-10), name


def _synthetic(tmp_path, arch, **trainer):  # type: ignore[no-untyped-def]
    """128 true features, 3 active per token (synthetic_config's data), read through 2 sites; k = 3."""
    return synthetic_config(
        tmp_path, data={"synthetic_sites": 2, "shuffle_buffer_tokens": 8192},
        sae={"arch": arch, "k": 3, "dead_tokens": 256 * 50},
        trainer={"total_tokens": 256 * 1000, "lr": 3e-3, "warmup_tokens": 2560, "log_every": 100, **trainer},
        checkpoint={"every_steps": 0},
    )


def test_transcoder_recovers_the_true_output_directions(tmp_path):
    """Input and output made of the same 128 sparse codes through two dictionaries: the decoder must
    find at least 90% of the output directions at cosine >= 0.95, with the input's encoder."""
    cfg = _synthetic(tmp_path, "transcoder")
    out = train(cfg)
    assert out["fvu"] < 0.25, out  # 1000 steps: the encoder is still learning to invert the input's dictionary
    sae, meta = load_saelens(out["export_dir"])
    truth = SyntheticSource(32, 128, 3, seed=cfg.trainer.seed, sites=2).dictionaries[1]  # (F, d) outputs
    W = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (truth @ W.T).max(dim=1).values
    assert float((best >= 0.95).float().mean()) >= 0.9, best.sort().values[:20]
    assert meta["sae_dist_arch"] == "transcoder" and meta["apply_b_dec_to_input"] is False


def test_skip_transcoder_trains_like_the_plain_one_and_exports_its_skip(tmp_path):
    """On the same two-site data the skip-transcoder reaches the plain transcoder's FVU (its skip
    starts at zero and may only help), and W_skip goes through the export and back."""
    base = train(_synthetic(tmp_path / "plain", "transcoder", total_tokens=256 * 200))
    skip = train(_synthetic(tmp_path / "skip", "skip_transcoder", total_tokens=256 * 200))
    assert skip["fvu"] <= base["fvu"] + 0.02, (skip["fvu"], base["fvu"])
    sae, _ = load_saelens(skip["export_dir"])
    assert sae.W_skip.abs().max() > 0  # it learned something; exported and loaded back


def test_transcoder_job_on_minilm_mlp_prints_heldout_fvu_and_its_export_reproduces_it(tmp_path):
    corpus = pydoc_jsonl(tmp_path / "docs.jsonl", 30)
    cfg = synthetic_config(
        tmp_path, model={"d_model": 0, "context_size": 32, "batch_contexts": 8, "dtype": "fp32",
                         "sites": ["encoder.layer.3.intermediate:in", "encoder.layer.3.output.dense:out"]},
        data={"source": "lm", "corpus": corpus, "heldout_fraction": 0.2, "shuffle_buffer_tokens": 1024},
        sae={"arch": "transcoder", "n_latents": 512, "k": 16},
        trainer={"total_tokens": 256 * 12, "eval_tokens": 512, "scale_tokens": 512},
    )
    out = train(cfg)
    assert 0 < out["fvu"] < 1 and out["l0"] <= 16
    # the export, on raw MiniLM activations, gives the job's held-out figures again
    from sae_dist.data import heldout_batches
    from sae_dist.metrics import evaluate

    sae, meta = load_saelens(out["export_dir"])
    again = evaluate(sae, heldout_batches(cfg), 1.0, cfg.trainer.eval_tokens)
    assert abs(again["fvu"] - out["fvu"]) < 1e-5
    assert meta["hook_name"] == "encoder.layer.3.intermediate" and meta["hook_name_out"] == "encoder.layer.3.output.dense"
    # the replacement model: `sae-dist eval` splices it in place of the MLP's output. Nothing upstream is
    # replaced, so the MLP output's FVU there is the job's held-out FVU, on the same tokens
    from sae_dist.features.evaluate import run_eval
    from sae_dist.features.source import load_setup

    got = run_eval(load_setup(out["export_dir"], multi_site=True), str(tmp_path / "eval"))
    assert abs(got["fvu"] - out["fvu"]) < 1e-5 and got["tokens"] == cfg.trainer.eval_tokens
    assert abs(got["l0"] - out["l0"]) < 1e-3 and abs(got["dead_fraction"] - out["dead_fraction"]) < 1e-9
    assert 0 < got["embedding_recovered"] <= 1
    # dashboards and steering read one-site SAEs: refused, saying why, before loading the LM
    with pytest.raises(ConfigError, match=r"transcoder over the sites .* dashboards and steering read one-site"):
        load_setup(out["export_dir"])


def test_site_counts_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"sae\.arch=transcoder reads exactly 2 activation sites per token, but "
                                          r"data\.synthetic_sites is 0"):
        validate(synthetic_config(tmp_path, sae={"arch": "transcoder"}))
    with pytest.raises(ConfigError, match=r"sae\.arch=topk reads one activation site, but data\.synthetic_sites is 2"):
        validate(synthetic_config(tmp_path, data={"synthetic_sites": 2}))
    # a cache carries its own count: checked when the job builds, before the first step
    with pytest.raises(ConfigError, match=r"sae\.arch=transcoder reads exactly 2 .* but the data has 0 sites"):
        train(synthetic_config(tmp_path, sae={"arch": "transcoder"}))
    with pytest.raises(ConfigError, match=r"data\.synthetic_sites \(1\) must be 0"):
        synthetic_config(tmp_path, data={"synthetic_sites": 1})


def test_crosscoder_sparse_path_matches_the_dense_definition_in_float64():
    """Per-site FVUs summed: the dense crosscoder on the concatenated sites, from its definition."""
    g = torch.Generator().manual_seed(0)
    S, d = 3, 5
    sae = SparseAutoencoder(sae_config(arch="crosscoder", n_latents=24, k=3, k_aux=4), S * d, generator=g).double()
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1, generator=g)
        sae.b_dec.normal_(generator=g)
    x = torch.randn(9, S, d, dtype=torch.float64, generator=g)
    dead = torch.zeros(24, dtype=torch.bool)
    dead[::4] = True
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]
    out = sae(x, dead)
    grads = torch.autograd.grad(out.loss, [getattr(sae, n) for n in names])
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().clone().requires_grad_(True) for n in names)
    flat = x.reshape(9, S * d)
    pre = (flat - b_dec) @ W_enc.T + b_enc
    top = pre.topk(3, dim=1)
    f = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    x_hat = (f @ W_dec + b_dec).view(9, S, d)
    fvu = lambda a, b: (a - b).pow(2).sum() / (a - a.mean(0)).pow(2).sum()  # noqa: E731
    aux_top = pre.masked_fill(~dead, float("-inf")).topk(4, dim=1)
    f_aux = torch.zeros_like(pre).scatter(1, aux_top.indices, aux_top.values.relu())
    residual = (flat - x_hat.reshape(9, -1)).detach()
    ref = sum(fvu(x[:, s], x_hat[:, s]) for s in range(S)) + sae.cfg.aux_coef * min(1.0, 6 / 4) * fvu(residual, f_aux @ W_dec)
    ref_grads = torch.autograd.grad(ref, [W_enc, b_enc, W_dec, b_dec])
    assert torch.allclose(out.loss, ref, rtol=1e-10)
    assert torch.allclose(out.terms["fvu"] * S, sum(fvu(x[:, s], x_hat[:, s]) for s in range(S)).detach())
    for name, got, want in zip(names, grads, ref_grads):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-10), name


def test_crosscoder_trains_on_three_sites_and_reports_each_sites_fvu(tmp_path):
    cfg = synthetic_config(
        tmp_path, data={"synthetic_sites": 3, "shuffle_buffer_tokens": 8192},
        sae={"arch": "crosscoder", "k": 3, "dead_tokens": 256 * 50},
        trainer={"total_tokens": 256 * 300, "lr": 3e-3, "warmup_tokens": 2560, "log_every": 100},
        checkpoint={"every_steps": 0},
    )
    out = train(cfg)
    per_site = out["fvu_per_site"]
    assert len(per_site) == 3 and all(0 < f < 0.5 for f in per_site), per_site
    sae, meta = load_saelens(out["export_dir"])
    assert meta["d_in"] == 3 * 32
    truth = SyntheticSource(32, 128, 3, seed=cfg.trainer.seed, sites=3).dictionaries  # (3, F, d)
    # a true latent's three directions, against each learned latent's three decoder blocks
    t = truth.permute(1, 0, 2).reshape(128, -1) / 3**0.5
    W = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    assert float(((t @ W.T).max(dim=1).values >= 0.9).float().mean()) >= 0.8


def _dense_clt(x_in, y, W_enc, b_enc, W_dec, b_dec, k):
    """The CLT from its definition: latent i of layer i mod L reads that layer's input; a dense
    (B, n) code per layer, decoded through the (n, L, d) decoder into every later layer."""
    B, L, d = x_in.shape
    n = W_enc.shape[0]
    layer = torch.arange(n) % L
    f = torch.zeros(B, n, dtype=x_in.dtype)
    for m in range(L):
        pre = x_in[:, m] @ W_enc.T + b_enc
        pre = pre.masked_fill(layer != m, float("-inf"))
        top = pre.topk(k, dim=1)
        f = f + torch.zeros_like(f).scatter(1, top.indices, top.values.relu())
    mask = (torch.arange(L)[None, :] >= layer[:, None]).to(x_in.dtype)  # (n, L)
    y_hat = torch.einsum("bn,nld->bld", f, W_dec.view(n, L, d) * mask[:, :, None]) + b_dec.view(L, d)
    fvu = lambda a, b: (a - b).pow(2).sum() / (a - a.mean(0)).pow(2).sum()  # noqa: E731
    return sum(fvu(y.view(B, L, d)[:, m], y_hat[:, m]) for m in range(L))


def test_clt_sparse_path_matches_the_dense_definition_and_keeps_earlier_blocks_zero():
    g = torch.Generator().manual_seed(0)
    L, d = 3, 5
    sae = SparseAutoencoder(sae_config(arch="clt", n_latents=24, k=2), d, d_out=L * d, generator=g).double()
    W = sae.W_dec.detach().view(24, L, d)
    assert all(float(W[j, :j % L].abs().sum()) == 0 for j in range(24))  # nothing into earlier layers
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1, generator=g)
        sae.b_dec.normal_(generator=g)
    x = torch.randn(9, 2 * L, d, dtype=torch.float64, generator=g)
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]
    out = sae(x)
    grads = torch.autograd.grad(out.loss, [getattr(sae, n) for n in names])
    ref_in = [getattr(sae, n).detach().clone().requires_grad_(True) for n in names]
    ref = _dense_clt(x[:, :L], x[:, L:].reshape(9, -1), *ref_in, 2)
    ref_grads = torch.autograd.grad(ref, ref_in)
    assert torch.allclose(out.loss, ref, rtol=1e-10)
    assert float(out.terms["l0"]) <= L * 2
    for name, got, want in zip(names, grads, ref_grads):
        if name == "W_dec":  # the masked blocks get no gradient at all
            want = want.view(24, L, d) * (torch.arange(L)[None, :] >= (torch.arange(24) % L)[:, None])[:, :, None]
            want = want.reshape(24, -1)
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-10), name


class _CLTSource:
    """Ground truth for a CLT: per layer l, sparse codes (k of F features) read from its input through
    E_l and written into the outputs of layers m >= l through D_{l->m}; chunks are (T, 2L, d)."""

    def __init__(self, L=3, d=24, F=32, k=2, seed=0, chunk=4096, stream=0):
        g = torch.Generator().manual_seed(seed)
        self.stream = stream
        unit = lambda *s: (lambda t: t / t.norm(dim=-1, keepdim=True))(torch.randn(*s, generator=g))  # noqa: E731
        self.L, self.d, self.F, self.k, self.seed, self.chunk_tokens = L, d, F, k, seed, chunk
        self.E = unit(L, F, d)
        self.D = unit(L, F, L, d) * (torch.arange(L)[None, None, :, None] >= torch.arange(L)[:, None, None, None])
        self.d_model, self.n_sites = d, 2 * L

    def chunk(self, i):
        g = torch.Generator().manual_seed((self.seed * 7919 + self.stream) * 100_003 + i + 1)
        T, L = self.chunk_tokens, self.L
        codes = torch.zeros(T, L, self.F)
        ids = torch.rand(T, L, self.F, generator=g).topk(self.k, dim=2).indices
        codes.scatter_(2, ids, 0.5 + torch.rand(T, L, self.k, generator=g))
        x_in = torch.einsum("tlf,lfd->tld", codes, self.E)
        y = torch.einsum("tlf,lfmd->tmd", codes, self.D)
        return torch.cat([x_in, y], dim=1)

    def chunks(self, start=0):
        i = start
        while True:
            yield self.chunk(i), i + 1
            i += 1


def test_clt_recovers_90_percent_of_a_known_cross_layer_dictionary(tmp_path):
    src = _CLTSource()
    cfg = synthetic_config(
        tmp_path, model={"d_model": src.d}, data={"shuffle_buffer_tokens": 8192},
        sae={"arch": "clt", "n_latents": 3 * 64, "k": 2},
        trainer={"total_tokens": 512 * 600, "batch_tokens": 512, "lr": 3e-3, "warmup_tokens": 5120,
                 "log_every": 100, "eval_tokens": 2048},
        checkpoint={"every_steps": 0},
    )
    held = _CLTSource(chunk=2048, stream=1)  # the same dictionary, other tokens
    out = train(cfg, source=src, heldout=[held.chunk(0)])
    assert len(out["fvu_per_site"]) == 3
    sae, meta = load_saelens(out["export_dir"])
    assert meta["d_out"] == 3 * src.d
    truth = src.D.reshape(3 * src.F, -1)  # (L F, L d): each true latent's concatenated decoders
    truth = truth / truth.norm(dim=1, keepdim=True)
    W = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (truth @ W.T).max(dim=1).values
    assert float((best >= 0.95).float().mean()) >= 0.9, (best.sort().values[:10], out["fvu"])


def test_clt_sites_out_of_layer_order_are_refused_before_training(tmp_path):
    corpus = pydoc_jsonl(tmp_path / "docs.jsonl", 12)
    sites = ["encoder.layer.1.intermediate:in", "encoder.layer.0.intermediate:in",  # layers swapped
             "encoder.layer.1.output.dense:out", "encoder.layer.0.output.dense:out"]
    cfg = synthetic_config(
        tmp_path, model={"d_model": 0, "context_size": 32, "batch_contexts": 4, "dtype": "fp32", "sites": sites},
        data={"source": "lm", "corpus": corpus, "heldout_fraction": 0.2},
        sae={"arch": "clt", "n_latents": 64, "k": 4},
    )
    with pytest.raises(ConfigError, match=r"sae\.arch=clt needs model\.sites as the 2 MLP inputs in layer order"):
        train(cfg)
    assert not (tmp_path / "results.json").exists()


def test_clt_with_muon_is_refused_before_training(tmp_path):
    cfg = synthetic_config(tmp_path, data={"synthetic_sites": 4}, sae={"arch": "clt", "n_latents": 64, "k": 4},
                           trainer={"optimizer": "muon"})
    with pytest.raises(ConfigError, match=r"trainer\.optimizer=muon .* use trainer\.optimizer=adam or signum_sf"):
        validate(cfg)


def test_clt_in_the_circuit_tracer_layout_reads_back_and_reconstructs_as_trained(tmp_path):
    """The per-layer files hold each layer's latents (ours interleaved: latent i of layer l is i L + l);
    the layout's semantics written from the files alone reproduce our reconstruction on raw
    activations, and reading them back gives our export tensor for tensor."""
    from safetensors import safe_open

    from sae_dist.circuit_tracer import load_circuit_tracer, reconstruct, write_circuit_tracer

    g = torch.Generator().manual_seed(0)
    L, d, n = 3, 8, 36
    sae = SparseAutoencoder(sae_config(arch="clt", n_latents=n, k=2), d, d_out=L * d, generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1, generator=g)
        sae.b_dec.normal_(generator=g)
    export_saelens(sae, 1.7, str(tmp_path / "sae"), {"model_name": "m", "sites": [f"s{i}" for i in range(2 * L)]})
    meta = write_circuit_tracer(str(tmp_path / "sae"), str(tmp_path / "ct"))
    assert (meta["n_layers"], meta["d_transcoder"], meta["k"]) == (L, n // L, 2)
    for layer in range(L):
        with safe_open(str(tmp_path / "ct" / f"W_dec_{layer}.safetensors"), framework="pt") as f:
            assert f.get_slice(f"W_dec_{layer}").get_shape() == [n // L, L - layer, d]
        with safe_open(str(tmp_path / "ct" / f"W_enc_{layer}.safetensors"), framework="pt") as f:
            assert sorted(f.keys()) == [f"W_enc_{layer}", f"b_dec_{layer}", f"b_enc_{layer}"]
            assert torch.equal(f.get_tensor(f"W_enc_{layer}")[1], sae.W_enc[L + layer].detach() * 1.7)
    x = torch.randn(10, 2 * L, d, generator=g)
    with torch.no_grad():
        want = (sae.decode(x * 1.7, *sae.encode_sparse(x * 1.7)) / 1.7).view(10, L, d)
        assert torch.allclose(reconstruct(str(tmp_path / "ct"), x[:, :L]), want, atol=1e-5)
    back, _ = load_circuit_tracer(str(tmp_path / "ct"))
    ours, _ = load_saelens(str(tmp_path / "sae"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(ours, name)), name
    with pytest.raises(ConfigError, match="circuit-tracer layout is for cross-layer transcoders"):
        export_saelens(SparseAutoencoder(sae_config(arch="topk", n_latents=8, k=2), d), 1.0, str(tmp_path / "t"))
        write_circuit_tracer(str(tmp_path / "t"), str(tmp_path / "ct2"))


def test_clt_replacement_model_feeds_each_layer_the_spliced_passs_own_inputs():
    """All L MLP outputs replaced at once: layer m's output in the spliced pass is the CLT's decode of
    the inputs the spliced pass itself gave layers 0..m (not the clean ones); special tokens keep the
    module's own output; the ablation zeroes every MLP output."""
    from transformers import AutoModel, AutoTokenizer

    from sae_dist.data.lm import resolve_model_path
    from sae_dist.features.replace import SiteSplice
    from sae_dist.metrics import HeldoutMeter

    path = resolve_model_path("minilm")
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    L, d = 2, 384
    sites = [f"encoder.layer.{m}.intermediate:in" for m in range(L)] + [f"encoder.layer.{m}.output.dense:out"
                                                                        for m in range(L)]
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(sae_config(arch="clt", n_latents=64, k=4), d, d_out=L * d, generator=g).eval()
    with torch.no_grad():
        sae.W_dec.mul_(5.0)  # a visible change to every later layer's input
    ids = tok(["The cat sat on the mat.", "Sparse dictionaries of a language model"], padding="max_length",
              max_length=12, truncation=True, return_tensors="pt").input_ids
    keep = ~torch.isin(ids, torch.tensor(tok.all_special_ids))
    meter = HeldoutMeter(sae, 10**6)
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        clean_in = {}
        hooks = [model.encoder.layer[1].intermediate.register_forward_pre_hook(
            lambda _m, a: clean_in.__setitem__(1, a[0]))]
        model(input_ids=ids)
        hooks[0].remove()
        own = [model.encoder.layer[m].output.dense.register_forward_hook(  # runs before the splice's hook
            lambda _m, _a, out, m=m: seen.__setitem__(f"own{m}", out.clone())) for m in range(L)]
        with SiteSplice(model, sae, sites, meter).active(keep):
            hooks = own
            for m in range(L):
                hooks.append(model.encoder.layer[m].intermediate.register_forward_pre_hook(
                    lambda _m, a, m=m: seen.__setitem__(f"in{m}", a[0])))
                hooks.append(model.encoder.layer[m].output.dense.register_forward_hook(
                    lambda _m, _a, out, m=m: seen.__setitem__(f"out{m}", out)))
            model(input_ids=ids)
            for h in hooks:
                h.remove()
        x = torch.stack([seen[f"in{m}"][keep] for m in range(L)] + [seen[f"out{m}"][keep] for m in range(L)], dim=1)
        want = sae.decode(x, *sae.encode_sparse(x)).view(-1, L, d)
        for m in range(L):
            assert torch.allclose(seen[f"out{m}"][keep], want[:, m], atol=1e-4), m
            assert torch.equal(seen[f"out{m}"][~keep], seen[f"own{m}"][~keep])  # special tokens: the module's own
        assert not torch.allclose(seen["in1"], clean_in[1], atol=1e-3)  # layer 1 read the spliced pass's input
        got = meter.result()
        assert meter.count == int(keep.sum()) and 0 < got["l0"] <= L * 4 and len(got["fvu_per_site"]) == L
        own = torch.cat([seen[f"own{m}"][keep] for m in range(L)], dim=1).double()
        fvu1 = (own[:, d:] - want[:, 1].double()).pow(2).sum() / (own[:, d:] - own[:, d:].mean(0)).pow(2).sum()
        assert abs(got["fvu_per_site"][1] - float(fvu1)) < 1e-6  # against layer 1's own output in that pass
        with SiteSplice(model, sae, sites).active(keep, zero=True):
            hooks = [model.encoder.layer[m].output.dense.register_forward_hook(
                lambda _m, _a, out, m=m: seen.__setitem__(f"zero{m}", out)) for m in range(L)]
            model(input_ids=ids)
            for h in hooks:
                h.remove()
        assert all(bool((seen[f"zero{m}"] == 0).all()) for m in range(L))
    with pytest.raises(ConfigError, match="replaces no module's output"):
        SiteSplice(model, SparseAutoencoder(sae_config(arch="crosscoder", n_latents=8, k=2), 2 * d), sites[:2])


@pytest.mark.parametrize("k_aux", [3, 1])
def test_clt_auxk_matches_its_dense_definition_per_layer_in_float64(k_aux):
    """With dead latents, each layer's k_aux best dead latents decode the residual of every output
    (no gradient into the reconstruction), scaled while fewer than L k_aux are dead. The two decodes
    run as one: AuxK's 9 latents per token as rows of the reconstruction's 6 (k_aux = 3), or the
    reconstruction's 6 as rows of AuxK's 3 (k_aux = 1)."""
    g = torch.Generator().manual_seed(0)
    L, d, n, k = 3, 5, 36, 2
    sae = SparseAutoencoder(sae_config(arch="clt", n_latents=n, k=k, k_aux=k_aux), d, d_out=L * d,
                            generator=g).double()
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1, generator=g)
        sae.b_dec.normal_(generator=g)
    x = torch.randn(9, 2 * L, d, dtype=torch.float64, generator=g)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::5] = True  # 8 dead, spread over the layers (k_aux = 3: fewer than L k_aux = 9, the scale is 8 / 9)
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]
    out = sae(x, dead)
    assert "auxk" in out.terms
    grads = torch.autograd.grad(out.loss, [getattr(sae, nm) for nm in names])
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, nm).detach().clone().requires_grad_(True) for nm in names)
    x_in, y = x[:, :L], x[:, L:].reshape(9, -1)
    main = _dense_clt(x_in, y, W_enc, b_enc, W_dec, b_dec, k)
    layer = torch.arange(n) % L
    mask = (torch.arange(L)[None, :] >= layer[:, None]).to(x.dtype)
    Wm = (W_dec.view(n, L, d) * mask[:, :, None]).reshape(n, L * d)
    f = torch.zeros(9, n, dtype=x.dtype)
    f_aux = torch.zeros(9, n, dtype=x.dtype)
    for m in range(L):
        pre = x_in[:, m] @ W_enc.T + b_enc
        top = pre.masked_fill(layer != m, float("-inf")).topk(k, dim=1)
        f = f + torch.zeros_like(f).scatter(1, top.indices, top.values.relu())
        cand = pre.masked_fill((layer != m) | ~dead, float("-inf")).topk(k_aux, dim=1)
        vals = cand.values.masked_fill(~cand.values.isfinite(), 0.0).relu()
        f_aux = f_aux + torch.zeros_like(f_aux).scatter(1, cand.indices, vals)
    residual = (y - (f @ Wm + b_dec)).detach()
    fvu = lambda a, b: (a - b).pow(2).sum() / (a - a.mean(0)).pow(2).sum()  # noqa: E731
    ref = main + sae.cfg.aux_coef * fvu(residual, f_aux @ Wm) * min(1.0, 8 / (L * k_aux))
    ref_grads = torch.autograd.grad(ref, [W_enc, b_enc, W_dec, b_dec])
    assert torch.allclose(out.loss, ref, rtol=1e-10)
    for name, got, want in zip(names, grads, ref_grads):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-10), name


def test_transcoder_from_the_activation_cache_replays_the_live_runs_losses(tmp_path):
    """Multi-site chunks written to the cache (one block of sites per token) and read back in the same
    order: training from the cache gives the live LM run's losses exactly."""
    from sae_dist.data import build_source
    from sae_dist.data.cache import write_cache

    corpus = pydoc_jsonl(tmp_path / "docs.jsonl", 30)
    over = dict(model={"d_model": 0, "context_size": 32, "batch_contexts": 8, "dtype": "fp32",
                       "sites": ["encoder.layer.3.intermediate:in", "encoder.layer.3.output.dense:out"]},
                sae={"arch": "transcoder", "n_latents": 256, "k": 8},
                trainer={"total_tokens": 256 * 8, "eval_tokens": 256, "scale_tokens": 256},
                checkpoint={"every_steps": 0})
    data = {"corpus": corpus, "heldout_fraction": 0.2, "shuffle_buffer_tokens": 1024}
    live_cfg = synthetic_config(tmp_path / "live", data={"source": "lm", **data}, **over)
    live = train(live_cfg)
    for split, tokens in (("train", 256 * 12), ("heldout", 512)):
        index = write_cache(build_source(live_cfg, split).chunks(), str(tmp_path / "cache" / split), tokens, {})
        assert index["n_sites"] == 2
    cached = train(synthetic_config(tmp_path / "cached", data={"source": "cache", "cache_dir": str(tmp_path / "cache"),
                                                              **data}, **over))
    assert cached["history"] == live["history"] and cached["fvu"] == live["fvu"]


def test_transcoder_encoder_starts_on_the_centred_input():
    """An MLP's input has a large mean; the transcoder's b_enc starts at -mean W_enc^T (times the
    first-batch scale), so every latent's pre-activation starts centred and almost all latents are
    picked on some token, where uncentred about half point away from the mean and are never picked."""
    g = torch.Generator().manual_seed(0)
    d, n, k = 16, 256, 4
    x = torch.randn(512, 2, d, generator=g)
    x[:, 0] += 3.0 * torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * d**0.5
    sae = SparseAutoencoder(sae_config(arch="transcoder", n_latents=n, k=k), d, generator=g)
    uncentred = (x[:, 0] @ sae.W_enc.detach().T).topk(k, dim=1).indices.unique().numel() / n
    sae.init_from_batch(x)
    pre = x[:, 0] @ sae.W_enc.detach().T + sae.b_enc.detach()
    assert float(pre.mean(0).abs().max()) < 1e-4 * float(pre.std(0).min())
    picked = sae.encode_sparse(x)[1].unique().numel() / n
    assert picked >= 0.9 > 0.6 >= uncentred, (picked, uncentred)
