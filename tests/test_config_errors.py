"""Bad input stops before any work with an error naming the field, the value and the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import synthetic_config

from sae_dist.config import ConfigError, DataConfig, ModelConfig, TrainerConfig, sae_config, validate
from sae_dist.data.lm import LMActivationSource
from sae_dist.run import train


def test_k_not_below_n_latents_names_both_fields():
    with pytest.raises(ConfigError, match=r"sae\.k \(64\).*sae\.n_latents \(64\)"):
        sae_config(n_latents=64, k=64)


def test_negative_encoder_scale_names_the_field_and_the_automatic_value():
    with pytest.raises(ConfigError, match=r"sae\.encoder_scale \(-0\.5\) must be >= 0 \(0 = automatic\)"):
        sae_config(arch="topk", encoder_scale=-0.5)


def test_unknown_arch_lists_the_choices():
    with pytest.raises(ConfigError, match=r"sae\.arch \('topkk'\) must be one of topk, batchtopk"):
        sae_config(arch="topkk")


def test_fp_must_divide_n_latents(tmp_path):
    cfg = synthetic_config(tmp_path, parallel={"fp": 3})
    with pytest.raises(ConfigError, match=r"parallel\.fp \(3\) must divide sae\.n_latents \(256\)"):
        validate(cfg)


def test_unknown_hook_point_suggests_close_names():
    with pytest.raises(ConfigError, match=r"model\.hook_point \('encoder\.layers\.3'\).*encoder\.layer\.3"):
        LMActivationSource(ModelConfig(hook_point="encoder.layers.3"), DataConfig())


def test_d_model_mismatch_names_the_real_width():
    with pytest.raises(ConfigError, match=r"model\.d_model \(512\) does not match.*\(384\); set model\.d_model=384"):
        LMActivationSource(ModelConfig(d_model=512), DataConfig())


def test_missing_corpus_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=r"data\.corpus \('.*nope\.jsonl'\) does not exist"):
        LMActivationSource(ModelConfig(), DataConfig(corpus=str(missing)))


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match=r"data\.corpus \('.*empty\.txt'\) has no train documents"):
        LMActivationSource(ModelConfig(), DataConfig(corpus=str(empty)))


def test_corpus_shorter_than_one_context(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(ConfigError, match=r"fewer than model\.context_size \(128\) tokens"):
        LMActivationSource(ModelConfig(), DataConfig(corpus=str(short), heldout_fraction=1e-6))


def test_missing_cache_dir(tmp_path):
    from sae_dist.data.cache import CachedSource

    with pytest.raises(ConfigError, match=r"data\.cache_dir .* holds no index\.json"):
        CachedSource(str(tmp_path / "nothing"))


def test_trainer_kernels_choice():
    with pytest.raises(ConfigError, match=r"trainer\.kernels \('cuda'\) must be auto, torch or triton"):
        TrainerConfig(kernels="cuda")


def test_trainer_device_choice():
    with pytest.raises(ConfigError, match=r"trainer\.device \('gpu'\) must be auto, cpu, cuda or cuda:N"):
        TrainerConfig(device="gpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_device_without_cuda_stops_before_any_work_naming_the_fix(tmp_path, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = synthetic_config(tmp_path / "run", trainer={"device": device})
    want = rf"trainer\.device \('{device}'\) needs CUDA, but torch\.cuda\.is_available\(\) is False.*use trainer\.device=auto or cpu"
    with pytest.raises(ConfigError, match=want):
        train(cfg)
    assert not (tmp_path / "run").exists()  # no output folder, no checkpoint, no data read


def test_nccl_with_a_cpu_device_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"parallel\.backend \(nccl\).*trainer\.device is cpu.*parallel\.backend=auto"):
        validate(synthetic_config(tmp_path, parallel={"backend": "nccl"}, trainer={"device": "cpu"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto resolves to cpu
    cfg = synthetic_config(tmp_path / "run", parallel={"backend": "nccl"})
    with pytest.raises(ConfigError, match=r"parallel\.backend \(nccl\).*trains on cpu \(trainer\.device\); use parallel\.backend=auto or gloo"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_cli_reports_config_error_before_loading_anything(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sae_dist", "sae.k=7000", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "config error: sae.k (7000) must be in [1, sae.n_latents (6144))" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_lm_dtype_lists_the_choices():
    with pytest.raises(ConfigError, match=r"model\.dtype \('fp16'\) must be auto, fp32 or bf16"):
        ModelConfig(dtype="fp16")
