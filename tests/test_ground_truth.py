"""The trainer recovers a known dictionary: 512 random unit directions in d=64, 4 active per sample."""

from __future__ import annotations

from conftest import synthetic_config

from sae_dist.data.synthetic import SyntheticSource
from sae_dist.export import load_saelens
from sae_dist.run import train


def test_topk_recovers_90_percent_of_true_directions(tmp_path):
    cfg = synthetic_config(
        tmp_path,
        model={"d_model": 64},
        data={"synthetic_n_features": 512, "synthetic_k": 4, "shuffle_buffer_tokens": 8192},
        sae={"n_latents": 1024, "k": 4, "dead_tokens": 20000},
        trainer={"total_tokens": 1024 * 1200, "batch_tokens": 1024, "lr": 2e-3, "warmup_tokens": 1024 * 50,
                 "encoder_chunk": 1024, "log_every": 100},
        checkpoint={"every_steps": 0},
    )
    out = train(cfg)
    sae, _ = load_saelens(out["export_dir"])
    truth = SyntheticSource(64, 512, 4, seed=cfg.trainer.seed).dictionary
    dec = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (truth @ dec.T).max(dim=1).values  # (512,) best cosine per true direction
    recovered = (best >= 0.95).float().mean().item()
    assert recovered >= 0.90, f"recovered {recovered:.2%} of the true directions; FVU {out['fvu']:.3f}"
