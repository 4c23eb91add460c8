"""trainer.param_dtype=bf16: bf16 weights and gradients, fp32 masters and Adam in DeepSpeed's optimizer.

    python -m pytest -q tests/test_mixed_precision.py

The multi-rank checks (ZeRO partitions that cut decoder rows, losses against fp32) are in
test_parallel.py; the bit-identical resume from S3 in test_checkpoint_s3.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from conftest import synthetic_config
from safetensors.torch import load_file

from sae_dist.config import ConfigError, TrainerConfig, validate
from sae_dist.parallel.engine import engine_name

OVERRIDES = {
    "model": {"d_model": 64},
    "data": {"synthetic_n_features": 256, "synthetic_k": 4},
    "sae": {"n_latents": 512, "k": 8, "dead_tokens": 20000},
    "trainer": {"total_tokens": 512 * 60, "batch_tokens": 512, "encoder_chunk": 128, "log_every": 20, "device": "cpu",
                "optimizer": "adam", "lazy_rows": "off"},  # both engines run dense Adam: a difference is the weights' precision
}


def _job(tmp_path, name, **trainer):
    return synthetic_config(tmp_path / name, **(OVERRIDES | {"trainer": OVERRIDES["trainer"] | trainer}))


def test_one_process_bf16_job_reaches_fp32_fvu_and_exports_the_fp32_masters(tmp_path):
    """`sae-dist trainer.param_dtype=bf16` on one process: engine auto picks DeepSpeed (in a one-process
    group it sets up and tears down); held-out FVU within 2% of the fp32 job; the export holds the fp32
    masters, whose decoder rows are unit-norm to fp32 precision (bf16 rows are off by up to ~4e-3)."""
    pytest.importorskip("deepspeed")
    from sae_dist.run import train

    fp32 = train(_job(tmp_path, "fp32"))
    bf16 = train(_job(tmp_path, "bf16", param_dtype="bf16"))
    assert (fp32["engine"], bf16["engine"]) == ("torch", "deepspeed")
    assert not dist.is_initialized()
    assert bf16["steps"] == fp32["steps"] == 60
    assert abs(bf16["fvu"] - fp32["fvu"]) < 0.02 * fp32["fvu"], (bf16["fvu"], fp32["fvu"])
    # DeepSpeed in fp32 gives this job's fp32 result bit for bit: a difference is bf16 weights at work
    assert bf16["fvu"] != fp32["fvu"]
    weights = load_file(f"{bf16['export_dir']}/sae_weights.safetensors")
    scale = json.loads(open(f"{bf16['export_dir']}/cfg.json").read())["sae_dist_scale"]
    W = weights["W_dec"] * scale  # the export folds the activation scale in
    assert W.dtype == torch.float32 and (W.norm(dim=1) - 1).abs().max() < 1e-5
    assert not torch.equal(W, W.bfloat16().float())


@pytest.mark.parametrize("arch", ["matryoshka", "jumprelu", "gated"])
def test_bf16_weights_train_every_sparse_family_like_fp32(tmp_path, arch):
    """The families on the sparse kernels take bf16 weights (their own per-latent parameters too):
    held-out FVU within 3% of the fp32 job's, and not bit-identical to it."""
    pytest.importorskip("deepspeed")
    from sae_dist.run import train

    sae = OVERRIDES["sae"] | {"arch": arch}
    fp32 = train(synthetic_config(tmp_path / "fp32", **(OVERRIDES | {"sae": sae})))
    bf16 = train(synthetic_config(tmp_path / "bf16", **(OVERRIDES | {"sae": sae, "trainer": OVERRIDES["trainer"] | {
        "param_dtype": "bf16"}})))
    assert bf16["engine"] == "deepspeed" and bf16["steps"] == fp32["steps"] == 60
    assert abs(bf16["fvu"] - fp32["fvu"]) < 0.03 * fp32["fvu"] and bf16["fvu"] != fp32["fvu"], (bf16, fp32)
    assert bf16["l0"] > 0


@pytest.mark.parametrize(("arch", "sites"), [("transcoder", 2), ("skip_transcoder", 2), ("crosscoder", 3), ("clt", 4)])
def test_bf16_weights_train_every_multisite_family_like_fp32(tmp_path, arch, sites):
    """The families across sites take bf16 weights too: held-out FVU within 5% of the fp32 job's (the
    crosscoder over 3 sites was 3.1% above it on 2026-12-02, the others within 3%), not bit-identical to
    it; a CLT's decoder blocks before each latent's layer stay exactly zero in the fp32
    masters the export holds (DeepSpeed's masters, Adam and row renormalisation never write into them)."""
    pytest.importorskip("deepspeed")
    from sae_dist.archs.clt import valid_blocks
    from sae_dist.run import train

    sae = OVERRIDES["sae"] | {"arch": arch}
    data = OVERRIDES["data"] | {"synthetic_sites": sites}
    fp32 = train(synthetic_config(tmp_path / "fp32", **(OVERRIDES | {"sae": sae, "data": data})))
    bf16 = train(synthetic_config(tmp_path / "bf16", **(OVERRIDES | {"sae": sae, "data": data, "trainer": OVERRIDES[
        "trainer"] | {"param_dtype": "bf16"}})))
    assert bf16["engine"] == "deepspeed" and bf16["steps"] == fp32["steps"] == 60
    assert abs(bf16["fvu"] - fp32["fvu"]) < 0.05 * fp32["fvu"] and bf16["fvu"] != fp32["fvu"], (bf16, fp32)
    if arch == "clt":
        W = load_file(f"{bf16['export_dir']}/sae_weights.safetensors")["W_dec"]
        L = sites // 2
        blocks = W.view(W.shape[0], L, -1)
        assert W.dtype == torch.float32 and blocks[~valid_blocks(W.shape[0], L)].abs().max() == 0
        assert blocks[valid_blocks(W.shape[0], L)].abs().amax(dim=1).min() > 0


def test_engine_auto_is_deepspeed_for_bf16(tmp_path):
    assert engine_name(synthetic_config(tmp_path, trainer={"param_dtype": "bf16"})) == "deepspeed"
    assert engine_name(synthetic_config(tmp_path, trainer={"param_dtype": "fp32"})) == "torch"


def test_bf16_with_the_torch_engine_is_refused_naming_both_settings(tmp_path):
    cfg = synthetic_config(tmp_path, trainer={"param_dtype": "bf16"}, parallel={"engine": "torch"})
    with pytest.raises(ConfigError, match=r"trainer\.param_dtype \(bf16\).*parallel\.engine is torch.*engine=deepspeed"):
        validate(cfg)


@pytest.mark.parametrize("arch", ["relu"])
def test_bf16_with_a_dense_architecture_is_refused(tmp_path, arch):
    cfg = synthetic_config(tmp_path, trainer={"param_dtype": "bf16"}, sae={"arch": arch})
    with pytest.raises(ConfigError, match=rf"trainer\.param_dtype \(bf16\).*sae\.arch is {arch}.*param_dtype=fp32"):
        validate(cfg)


def test_bf16_fanout_is_refused(tmp_path):
    cfg = synthetic_config(tmp_path, trainer={"param_dtype": "bf16"}, sae={"fanout_n_latents": [64, 128]})
    with pytest.raises(ConfigError, match=r"trainer\.param_dtype \(bf16\).*sae\.fanout_n_latents \(\[64, 128\]\)"):
        validate(cfg)


def test_unknown_param_dtype_lists_the_choices():
    with pytest.raises(ConfigError, match=r"trainer\.param_dtype \('fp16'\) must be fp32 or bf16"):
        TrainerConfig(param_dtype="fp16")
