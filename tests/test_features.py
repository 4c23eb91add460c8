"""Feature tools: the SAE spliced into the LM (loss / embedding recovered), the streaming
feature collector, dashboards and their Neuronpedia export, steering, SAELens interop.

A tiny randomly initialised GPT-2 (2 layers, d=64) with MiniLM's offline tokenizer stands in for a
causal LM; MiniLM itself is the encoder. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import random
import urllib.request
from threading import Thread

import pytest
import torch

from sae_dist.config import ConfigError, sae_config
from sae_dist.data.lm import resolve_model_path
from sae_dist.export import export_saelens
from sae_dist.features.collect import FeatureCollector
from sae_dist.features.splice import SpliceMeter
from sae_dist.sae import SparseAutoencoder

WORDS = ("the cat sat on a mat while python objects call functions with arguments and return values "
         "every module imports names from other modules before the interpreter runs the code").split()


def identity_sae(d: int, scale: float = 1.0) -> SparseAutoencoder:
    """A TopK SAE that reconstructs exactly: latents +e_i and -e_i, k = d (relu(x) - relu(-x) = x)."""
    sae = SparseAutoencoder(sae_config(n_latents=2 * d, k=d), d)
    W = torch.cat([torch.eye(d), -torch.eye(d)]) * scale
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def zero_sae(d: int) -> SparseAutoencoder:
    sae = identity_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def write_corpus(path, n_docs: int = 60, seed: int = 0) -> str:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 80))) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs))
    return str(path)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("minilm"))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, minilm_tokenizer):
    """(folder, model, tokenizer): GPT2Config(n_layer=2, n_embd=64) with random weights, saved locally."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = minilm_tokenizer
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=tok.vocab_size,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder), model, tok


@pytest.fixture(scope="module")
def minilm():
    from sae_dist.data.lm import load_model

    return load_model("minilm")


def tiny_run(tmp_path, model_dir: str, sae: SparseAutoencoder, hook: str = "transformer.h.0",
             heldout_fraction: float = 0.4) -> str:
    """A run folder as the trainer leaves it: sae/ export plus the Hydra config naming the corpus."""
    export_saelens(sae, 2.0, str(tmp_path / "sae"), {"hook_name": hook, "model_name": model_dir, "context_size": 32})
    corpus = write_corpus(tmp_path / "corpus.txt")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        f"data:\n  corpus: {corpus}\n  heldout_fraction: {heldout_fraction}\n  text_field: text\n")
    return str(tmp_path)


def _recovered(model, module, sae, causal: bool, ids: torch.Tensor, keep: torch.Tensor) -> dict:
    meter = SpliceMeter(model, module, sae, causal)
    meter.add(ids, keep)
    return meter.result()


def _ids(tok, n: int = 3, T: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2000, 8000, (n, T), generator=g)
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    return ids, (ids != tok.cls_token_id) & (ids != tok.sep_token_id)


def test_causal_identity_sae_recovers_all_lm_loss_and_zero_sae_none(tiny_gpt2):
    _, model, tok = tiny_gpt2
    ids, keep = _ids(tok)
    module = model.transformer.h[0]
    ident = _recovered(model, module, identity_sae(64), True, ids, keep)
    assert abs(ident["ce_zero_ablate"] - ident["ce_clean"]) > 1e-3  # the ablation reaches the output
    assert ident["ce_sae"] == pytest.approx(ident["ce_clean"], abs=1e-6)
    assert ident["lm_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert ident["kl_div_with_ablation"] > 1e-3 and ident["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
    assert ident["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    everywhere = torch.ones_like(keep)  # the ablation zeroes special positions too: a zero SAE spliced
    zero = _recovered(model, module, zero_sae(64), True, ids, everywhere)  # everywhere equals it
    assert zero["lm_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_div_score"] == pytest.approx(0.0, abs=1e-6)
    half = _recovered(model, module, identity_sae(64, scale=0.5**0.5), True, ids, keep)  # x^ = x / 2
    assert half["lm_loss_recovered"] < 0.99  # a lossy SAE costs loss: the spliced output is used


def test_encoder_identity_sae_recovers_the_embedding_and_zero_sae_none(minilm, minilm_tokenizer):
    model, _ = minilm
    ids, keep = _ids(minilm_tokenizer, n=2, T=20)
    module = model.encoder.layer[3]
    ident = _recovered(model, module, identity_sae(384), False, ids, keep)
    assert ident["embedding_cos_distance_zero_ablate"] > 1e-2
    assert ident["embedding_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert ident["embedding_mse_recovered"] == pytest.approx(1.0, abs=1e-4)
    zero = _recovered(model, module, zero_sae(384), False, ids, torch.ones_like(keep))  # zeroed everywhere
    assert zero["embedding_recovered"] == pytest.approx(0.0, abs=1e-6)
    half = _recovered(model, module, identity_sae(384, scale=0.5**0.5), False, ids, keep)
    assert half["embedding_recovered"] < 0.99


def test_eval_cli_on_a_run_folder_writes_metrics_and_density_plot(tmp_path, tiny_gpt2, capsys):
    from sae_dist.features.cli import eval_main

    run = tiny_run(tmp_path, tiny_gpt2[0], identity_sae(64))  # exported with scale 2: folding must be exact
    eval_main([run, "--tokens", "256", "--batch-contexts", "4"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["lm_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["l0"] <= 64 and metrics["tokens"] == 256  # exactly the tokens asked for
    assert metrics["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["kl_div_score"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["average_max_decoder_cosine_sim"] == pytest.approx(0.0, abs=1e-6)  # +-e_i: cos 0 or -1
    core = json.loads((tmp_path / "eval" / "core.json").read_text())
    assert core["eval_type_id"] == "core" and core["eval_config"]["batch_size_prompts"] == 4
    m = core["eval_result_metrics"]
    assert set(m) == {"model_behavior_preservation", "model_performance_preservation", "reconstruction_quality",
                      "shrinkage", "sparsity", "token_stats", "misc_metrics"}
    assert m["model_performance_preservation"]["ce_loss_score"] == metrics["lm_loss_recovered"]
    assert m["reconstruction_quality"]["explained_variance"] == metrics["explained_variance"]
    assert m["token_stats"]["total_tokens_eval_sparsity_variance"] == 256
    assert m["misc_metrics"]["frac_alive"] == 1 - metrics["dead_fraction"]
    assert core["sae_cfg_dict"]["d_sae"] == 128
    pytest.importorskip("matplotlib")
    assert (tmp_path / "eval" / "feature_density.png").stat().st_size > 1000
    assert "LM loss recovered 100.00%" in capsys.readouterr().out


def test_collector_matches_brute_force_top_contexts_counts_and_samples():
    torch.manual_seed(0)
    n, k, C, T, K, R = 40, 4, 5, 9, 3, 4
    features = torch.arange(1, n, 3)
    col = FeatureCollector(n, features, T, top_k=K, n_samples=R)
    dense, ctx_ids = [], []
    for _ in range(12):
        ids = torch.randint(0, 500, (C, T))
        keep = torch.rand(C, T) > 0.2
        vals, idx = torch.randn(int(keep.sum()), n).topk(k, dim=1)
        col.update(ids, keep, vals.relu(), idx)
        full = torch.zeros(C, T, n)
        full[keep] = torch.zeros(int(keep.sum()), n).scatter(1, idx, vals.relu())
        dense.append(full)
        ctx_ids.append(ids)
    full, all_ids = torch.cat(dense), torch.cat(ctx_ids)  # (contexts, T, n), (contexts, T)
    st = col.result()
    assert st.tokens == int((full.abs().sum(-1) > 0).sum()) or st.tokens >= int((full.abs().sum(-1) > 0).sum())
    for s, f in enumerate(features.tolist()):
        per_ctx = full[:, :, f].max(1).values
        want = per_ctx.topk(K)
        assert torch.allclose(st.top.value[s], want.values)
        assert st.count[s] == int((full[:, :, f] > 0).sum())
        for j in range(K):
            c = int(st.top.ctx[s, j])
            assert torch.allclose(st.top.acts[s, j].float(), full[c, :, f], atol=1e-2)  # per-token highlighting
            assert torch.equal(st.context_tokens[c].long(), all_ids[c])
        fired = int((full[:, :, f] > 0).sum())
        assert int((st.samples.ctx[s] >= 0).sum()) == min(R, fired)
        for j in range(min(R, fired)):
            c, p = int(st.samples.ctx[s, j]), int(st.samples.pos[s, j])
            assert float(full[c, p, f]) == pytest.approx(float(st.samples.value[s, j]))
    assert len(st.context_tokens) <= len(features) * (K + R)


def test_collector_state_does_not_grow_with_tokens():
    col = FeatureCollector(64, torch.arange(64), 8, top_k=2, n_samples=2)
    sizes = []
    for step in range(40):
        ids = torch.randint(0, 100, (4, 8))
        keep = torch.ones(4, 8, dtype=torch.bool)
        vals, idx = torch.rand(32, 64).topk(4, dim=1)
        col.update(ids, keep, vals, idx)
        if step in (19, 39):
            sizes.append(sum(t.numel() for t in (col.top.acts, col.samples.acts, col.hist)))
    assert sizes[0] == sizes[1]
    assert len(col.context_tokens) <= col._prune_at


NEURONPEDIA_FEATURE_KEYS = {
    "feature_index", "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
    "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "decoder_weights_dist", "neuron_alignment_indices", "neuron_alignment_values",
    "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
    "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1", "activations",
}
NEURONPEDIA_ACTIVATION_KEYS = {"tokens", "values", "bin_min", "bin_max", "bin_contains", "qualifying_token_index"}


def build_tiny_dashboard(tmp_path, tiny_gpt2, n_features: int = 24) -> str:
    """A dashboard of a random SAE on the tiny GPT-2 (the browser test uses it too)."""
    from sae_dist.features.dashboard import build_dashboard
    from sae_dist.features.source import load_setup

    torch.manual_seed(0)
    sae = SparseAutoencoder(sae_config(n_latents=96, k=6), 64, generator=torch.Generator().manual_seed(0))
    run = tiny_run(tmp_path, tiny_gpt2[0], sae)
    out = str(tmp_path / "dashboard")
    build_dashboard(load_setup(run), out, torch.arange(n_features), tokens=1024, batch_contexts=8, top_k=5,
                    n_samples=6, neuronpedia=True)
    return out


def test_dashboard_site_has_pages_search_data_and_neuronpedia_batches(tmp_path, tiny_gpt2):
    out = build_tiny_dashboard(tmp_path, tiny_gpt2)
    summary = json.load(open(os.path.join(out, "features.json")))
    assert [row[0] for row in summary] == list(range(24))
    assert sum(row[1] > 0 for row in summary) > 12
    page = open(os.path.join(out, "f", str(summary[0][0]) + ".html")).read()
    for part in ("Top activations", "Quantile samples", "Activation histogram", "Promotes", "Suppresses",
                 "Nearest features", 'class="tok on'):
        assert part in page
    batch = json.load(open(os.path.join(out, "neuronpedia", "batch-0.json")))
    assert {"model_id", "layer", "sae_id_suffix", "features"} <= set(batch)
    feat = batch["features"][0]
    assert NEURONPEDIA_FEATURE_KEYS <= set(feat)
    assert len(feat["pos_str"]) == 10 and feat["pos_values"] == sorted(feat["pos_values"], reverse=True)
    assert feat["activations"] and NEURONPEDIA_ACTIVATION_KEYS <= set(feat["activations"][0])
    act = feat["activations"][0]
    assert len(act["tokens"]) == len(act["values"]) == 32 and max(act["values"]) > 0


def test_dashboard_alive_builds_the_first_latents_that_fire_not_the_first_ids(tmp_path, tiny_gpt2):
    """--alive TOKENS: a probe pass picks the first N latents that fire, so a dictionary whose first ids
    are dead (a short run of a very large one) still gets pages with activations."""
    from sae_dist.features.cli import dashboard_main

    sae = SparseAutoencoder(sae_config(n_latents=96, k=6), 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc[:48] = -1e4  # the first half never fires
    run = tiny_run(tmp_path, tiny_gpt2[0], sae)
    out = str(tmp_path / "dash")
    dashboard_main(["build", run, "--features", "8", "--alive", "512", "--tokens", "1024", "--batch-contexts", "8",
                    "--top-k", "5", "--samples", "6", "--out", out])
    summary = json.load(open(os.path.join(out, "features.json")))
    ids = [row[0] for row in summary]
    assert len(ids) == 8 and ids == sorted(ids) and min(ids) >= 48, ids
    assert all(row[1] > 0 for row in summary)
    with pytest.raises(ConfigError, match="--alive"):
        dashboard_main(["build", run, "--alive", "512", "--feature-ids", "1,2", "--out", out])


def test_dashboard_server_serves_the_site_on_localhost(tmp_path):
    from sae_dist.features.serve import make_server

    (tmp_path / "index.html").write_text("<h1>features</h1>")
    server = make_server(str(tmp_path), port=0)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as resp:
            assert b"features" in resp.read()
    finally:
        server.shutdown()
        server.server_close()


def test_clamping_a_feature_changes_what_a_causal_lm_generates(tiny_gpt2):
    from sae_dist.features.steer import generate, steering_fn

    _, model, tok = tiny_gpt2
    sae = SparseAutoencoder(sae_config(n_latents=96, k=6), 64, generator=torch.Generator().manual_seed(0)).eval()
    module = model.transformer.h[0]
    prompt = "the cat sat on the"
    base = generate(model, tok, prompt, 12)
    assert torch.equal(base, generate(model, tok, prompt, 12, module, steering_fn(sae, 5, 0.0, "add")))
    clamped = generate(model, tok, prompt, 12, module, steering_fn(sae, 5, 40.0, "clamp"))
    assert clamped.shape == base.shape and not torch.equal(clamped, base)
    assert torch.equal(clamped[:, : base.shape[1] - 12], base[:, : base.shape[1] - 12])  # the prompt is kept


def test_steer_cli_prints_baseline_and_steered_text(tmp_path, tiny_gpt2, capsys):
    from sae_dist.features.cli import steer_main

    sae = SparseAutoencoder(sae_config(n_latents=96, k=6), 64, generator=torch.Generator().manual_seed(0))
    run = tiny_run(tmp_path, tiny_gpt2[0], sae)
    steer_main([run, "--feature", "5", "--value", "80", "--prompt", "the cat sat", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    baseline, steered = out.split("--- feature 5 clamp 80.0")
    assert baseline.startswith("--- baseline") and baseline.split("\n")[1] != steered.split("\n")[1]


def test_export_loads_in_saelens_with_the_same_reconstruction(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install sae-lens)")
    torch.manual_seed(0)
    ours = SparseAutoencoder(sae_config(n_latents=96, k=6), 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours.b_dec.normal_()
        ours.b_enc.normal_(std=0.1)
    export_saelens(ours, 1.7, str(tmp_path), {"hook_name": "blocks.0.hook_resid_post", "model_name": "gpt2",
                                              "context_size": 32})
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = torch.randn(20, 32)
    with torch.no_grad():
        want = ours.decode_sparse(*ours.encode_sparse(x * 1.7)) / 1.7
        got = theirs.decode(theirs.encode(x))
    assert torch.allclose(got, want, atol=1e-4)


def test_export_loads_in_saebench(tmp_path):
    pytest.importorskip(
        "sae_bench",
        reason="sae-bench not installed: its pins (numpy 1.26, fsspec 2025.3, datasets 3.6) would downgrade this "
        "environment; SAEBench evaluates SAELens SAEs, which the SAELens test covers",
    )
    from sae_lens import SAE

    export_saelens(identity_sae(16), 1.0, str(tmp_path), {"hook_name": "blocks.0.hook_resid_post",
                                                            "model_name": "gpt2", "context_size": 32})
    sae = SAE.load_from_disk(str(tmp_path))
    assert sae.cfg.d_sae == 32
