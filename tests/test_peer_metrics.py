"""Our core metrics against the peers' own code on the same model, SAE and tokens: SAELens's
`run_evals` and SAEBench's `run_evals` + `calculate_misc_metrics`, run in their own venv
(scripts/peer_venv.sh) by tests/peer_core.py. Skipped, with the reason, where that venv is absent.

The model is a tiny randomly initialised GPT-2 (offline), so the KL and CE scores are checked too.
docs/eval.md lists where the peers' definitions differ from each other and which one each figure follows.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch
from safetensors.torch import save_file

from sae_dist.config import sae_config
from sae_dist.data.lm import resolve_model_path
from sae_dist.export import export_saelens, load_saelens
from sae_dist.features.splice import SpliceMeter
from sae_dist.metrics import HeldoutMeter, weight_metrics
from sae_dist.sae import SparseAutoencoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.environ.get("SAE_DIST_PEER_PYTHON") or os.path.join(REPO, ".venv-peer", "bin", "python")
READY = os.path.join(os.path.dirname(os.path.dirname(PEER)), "READY")
"""scripts/peer_venv.sh writes it last, once the peers import."""


def _peer_or_skip(timeout_s: float = 1200) -> None:
    """CI builds the peer venv in the background while the other tests run ($SAE_DIST_PEER_BUILD_PID):
    wait for that build to end, then skip, saying why, where there is no usable peer venv."""
    pid = int(os.environ.get("SAE_DIST_PEER_BUILD_PID", "0") or 0)
    deadline = time.monotonic() + timeout_s
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            break
        time.sleep(5)
    if not os.path.exists(PEER) or not (os.environ.get("SAE_DIST_PEER_PYTHON") or os.path.exists(READY)):
        pytest.skip(f"no peer venv at {PEER}: `bash scripts/peer_venv.sh` builds one (SAEBench 0.6.0 and SAELens "
                    "6.54.12 beside the CPU torch; their pins would downgrade this environment)")


SAELENS = ("explained_variance", "explained_variance_legacy", "mse", "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio",
           "relative_reconstruction_bias", "l0", "l1", "kl_div_score", "kl_div_with_ablation", "kl_div_with_sae")
RENAMED = {"ce_loss_score": "lm_loss_recovered", "ce_loss_with_ablation": "ce_zero_ablate",
           "ce_loss_with_sae": "ce_sae", "ce_loss_without_sae": "ce_clean"}
SAEBENCH_ONLY = ("frac_alive", "freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
                 "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim")


def _model(folder):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=tok.vocab_size,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                     tie_word_embeddings=False)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # peaked next-token distributions: CE gaps far above float32 rounding
        model.lm_head.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(4))
    model.save_pretrained(folder)
    return model, tok


def _tokens(tok, batches=3, contexts=4, T=24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2000, 8000, (batches * contexts, T), generator=g)
    ids[:, 0], ids[:, -1], ids[::3, 9] = tok.cls_token_id, tok.sep_token_id, tok.sep_token_id  # a document break
    return ids


def _fitted_sae(model, ids, keep) -> SparseAutoencoder:
    """A TopK SAE fitted for a moment to the layer's activations, so that the figures mean something."""
    with torch.no_grad():
        x = model(input_ids=ids, output_hidden_states=True).hidden_states[1][keep]
    sae = SparseAutoencoder(sae_config(n_latents=256, k=8), 64, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        sae(x).loss.backward()
        opt.step()
    return sae.eval()


def test_core_metrics_equal_saelens_and_saebench_on_the_same_model_sae_and_tokens(tmp_path):
    _peer_or_skip()
    model, tok = _model(tmp_path / "model")
    ids = _tokens(tok)
    special = sorted(set(tok.all_special_ids))
    keep = ~torch.isin(ids, torch.tensor(special))
    ours = _fitted_sae(model, ids, keep)
    export_saelens(ours, 1.0, str(tmp_path / "sae"), {"hook_name": "transformer.h.0", "model_name": "tiny",
                                                      "context_size": 24})
    sae, _ = load_saelens(str(tmp_path / "sae"))

    heldout = HeldoutMeter(sae, int(keep.sum()))
    splice = SpliceMeter(model, model.transformer.h[0], sae, True, heldout)
    for b in range(0, len(ids), 4):  # the batches the peers get
        splice.add(ids[b : b + 4], keep[b : b + 4])
    got = heldout.result() | splice.result() | weight_metrics(sae, max_cos_latents=0)

    save_file({"tokens": ids.contiguous()}, str(tmp_path / "tokens.safetensors"))
    job = {"export_dir": str(tmp_path / "sae"), "model_dir": str(tmp_path / "model"), "hook": "transformer.h.0",
           "tokens": str(tmp_path / "tokens.safetensors"), "batch_contexts": 4, "ignore": special}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([PEER, os.path.join(REPO, "tests", "peer_core.py"), str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    peer = json.loads(proc.stdout.strip().splitlines()[-1])

    assert 0.1 < got["kl_div_score"] < 0.99 and 0.1 < got["explained_variance"] < 0.99  # figures that say something
    for key in (*SAELENS, *RENAMED):
        want = peer["saelens"][key]
        assert got[RENAMED.get(key, key)] == pytest.approx(want, rel=1e-5, abs=1e-6), ("saelens", key)
    if "saebench" not in peer:
        pytest.skip(f"SAEBench not importable in the peer venv: {peer.get('saebench_missing')}")
    saebench = {k: k for k in (*SAELENS, *RENAMED, *SAEBENCH_ONLY)} | {
        "mse": "mse_saebench", "explained_variance": "explained_variance_saebench"}  # its own two formulas
    for key, ours_key in saebench.items():
        want = peer["saebench"][key]
        assert got[RENAMED.get(ours_key, ours_key)] == pytest.approx(want, rel=1e-5, abs=1e-6), ("saebench", key)


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder"])
def test_saelens_loads_our_transcoder_export_in_its_transcoder_layout(tmp_path, arch):
    """SAELens's own `SAE.load_from_disk` builds its transcoder class from our export; its encode, kept at
    the top k, gives our codes, and its decode (plus its skip path) gives our reconstruction of the MLP
    output, on raw activations (the training scale folded in)."""
    _peer_or_skip()
    g = torch.Generator().manual_seed(0)
    d, n = 16, 48
    sae = SparseAutoencoder(sae_config(arch=arch, n_latents=n, k=4), d, generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1, generator=g)
        sae.b_dec.normal_(generator=g)
        if hasattr(sae, "W_skip"):
            sae.W_skip.normal_(std=0.3, generator=g)
    export_saelens(sae, 1.7, str(tmp_path / "sae"), {"hook_name": "h.0.mlp.in", "hook_name_out": "h.0.mlp.out",
                                                     "model_name": "m", "sites": ["h.0.mlp:in", "h.0.mlp:out"]})
    x = torch.randn(12, d, generator=g)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    proc = subprocess.run([PEER, os.path.join(REPO, "tests", "peer_transcoder.py"), str(tmp_path / "sae"),
                           str(tmp_path / "x.safetensors"), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert built == {"class": {"transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder"}[arch], "d_out": d}
    from safetensors.torch import load_file

    peer = load_file(str(tmp_path / "out.safetensors"))
    ours, _ = load_saelens(str(tmp_path / "sae"))
    both = torch.stack([x, x], dim=1)  # (B, 2, d): the input site; the output site is not read to encode
    with torch.no_grad():
        vals, idx = ours.encode_sparse(both)
        codes = torch.zeros(12, n).scatter(1, idx, vals)
        recon = ours.decode(both, vals, idx)
    assert torch.allclose(peer["codes"], codes, atol=1e-5)
    assert torch.allclose(peer["recon"], recon, atol=1e-5)


def test_circuit_tracer_loads_our_clt_and_reconstructs_as_we_do(tmp_path):
    """circuit-tracer's own `load_clt` reads the folder `sae-dist convert --to circuit-tracer` writes: it
    infers our sizes from the files, its per-layer pre-activations are ours (latent i of layer l is our
    latent i L + l), and its decode of them, kept at the top k per layer, is our reconstruction of every
    layer's MLP output on raw activations (the training scale folded in)."""
    _peer_or_skip()
    from safetensors.torch import load_file

    from sae_dist.circuit_tracer import write_circuit_tracer

    g = torch.Generator().manual_seed(0)
    L, d, n, k, B = 3, 16, 36, 2, 10
    sae = SparseAutoencoder(sae_config(arch="clt", n_latents=n, k=k), d, d_out=L * d, generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(mean=0.5, std=0.1, generator=g)  # every token has active latents in every layer
        sae.b_dec.normal_(generator=g)
    scale = 1.7
    export_saelens(sae, scale, str(tmp_path / "sae"), {"model_name": "m", "sites": [f"s{i}" for i in range(2 * L)]})
    write_circuit_tracer(str(tmp_path / "sae"), str(tmp_path / "ct"))
    x = torch.randn(B, 2 * L, d, generator=g)
    save_file({"x": x[:, :L].transpose(0, 1).contiguous()}, str(tmp_path / "x.safetensors"))
    proc = subprocess.run([PEER, os.path.join(REPO, "tests", "peer_clt.py"), str(tmp_path / "ct"),
                           str(tmp_path / "x.safetensors"), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert built == {"n_layers": L, "d_transcoder": n // L, "d_model": d, "activation": "relu"}
    peer = load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        W, b = sae.W_enc.view(n // L, L, d), sae.b_enc.view(n // L, L)  # latent i of layer l: our i L + l
        pre = torch.stack([(x[:, layer] * scale) @ W[:, layer].t() + b[:, layer] for layer in range(L)])
        want = (sae.decode(x * scale, *sae.encode_sparse(x * scale)) / scale).view(B, L, d).transpose(0, 1)
    # circuit-tracer's encoder reads raw activations (the scale folded into its weights): its
    # pre-activations equal ours on the scaled inputs, and its reconstruction ours unscaled
    assert torch.allclose(peer["pre"], pre, atol=1e-4)
    assert torch.allclose(peer["recon"], want, atol=1e-5)
