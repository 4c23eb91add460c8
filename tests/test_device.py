"""Device placement (trainer.device): resolution, the backend it picks, CPU runs unchanged by it, and
checkpoint state landing on the parameters' device.

    python -m pytest -q tests/test_device.py

CUDA itself is faked where only the resolution logic is under test; the one test that trains on a GPU
skips without one.
"""

from __future__ import annotations

import unittest

import pytest
import torch
from conftest import synthetic_config

from sae_dist.checkpoint import Checkpointer
from sae_dist.config import ConfigError
from sae_dist.lifecycle import build_sae
from sae_dist.parallel.dims import resolve_backend, resolve_device
from sae_dist.pipeline.group import trainer_gpus
from sae_dist.run import train
from sae_dist.trainer import Trainer, TrainState


@pytest.fixture
def four_gpus(monkeypatch):
    """What torch reports on a node with four GPUs (no GPU is touched: resolution only reads these)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_auto_is_cpu_without_cuda_and_cpu_is_always_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_and_cuda_take_the_local_rank_gpu(four_gpus):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    four_gpus.setenv("LOCAL_RANK", "2")
    four_gpus.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 2)


def test_more_ranks_than_gpus_or_one_gpu_for_all_ranks_is_refused(four_gpus):
    four_gpus.setenv("LOCAL_RANK", "5")
    with pytest.raises(ConfigError, match=r"trainer\.device \('auto'\) resolves to cuda:5 \(LOCAL_RANK=5\).*"
                                          r"sees 4 GPU\(s\); .*--nproc-per-node 4"):
        resolve_device("auto")
    four_gpus.setenv("LOCAL_RANK", "1")
    four_gpus.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"trainer\.device \('cuda:1'\) puts every process of this node on one GPU"):
        resolve_device("cuda:1")


def test_backend_auto_follows_the_device_and_nccl_needs_cuda():
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", "cpu") == "gloo"
    assert resolve_backend("auto", torch.device("cuda", 1)) == "nccl"
    assert resolve_backend("gloo", "cpu") == "gloo"
    assert resolve_backend("nccl", "cuda:0") == "nccl"
    with pytest.raises(ConfigError, match=r"parallel\.backend \(nccl\) moves CUDA tensors only, but the SAE trains "
                                          r"on cpu \(trainer\.device\); use parallel\.backend=auto or gloo"):
        resolve_backend("nccl", torch.device("cpu"))


def test_explicit_cpu_device_gives_the_default_losses(tmp_path, monkeypatch):
    # topk with dead latents covers AuxK and the firing counters; relu (a strong L1, a high lr) kills
    # latents early, so steps 9 and 12 resample some: the host-side draw of their new directions
    jobs = {
        "topk": ({"dead_tokens": 1024}, {}),
        "relu": ({"l1_coef": 50.0, "resample_every": 3, "dead_tokens": 256}, {"lr": 3e-2}),
    }
    for arch, (sae, trainer) in jobs.items():
        trainer = {"total_tokens": 256 * 12, **trainer}
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: False)  # the default (auto) is the CPU here
            default = train(synthetic_config(tmp_path / f"{arch}-auto", sae={"arch": arch, **sae}, trainer=trainer))
        cpu = train(synthetic_config(tmp_path / f"{arch}-cpu", sae={"arch": arch, **sae},
                                     trainer={**trainer, "device": "cpu"}))
        assert len(default["history"]) == 12
        assert cpu["history"] == default["history"], arch
        assert cpu["fvu"] == default["fvu"] and cpu["dead_fraction"] == default["dead_fraction"], arch


@pytest.mark.filterwarnings("ignore:.*meta parameter:UserWarning")
def test_resumed_state_lands_on_the_parameters_device(tmp_path):
    # the meta device stands in for a GPU: tensors move there without data, so placement is checked on CPU
    cfg = synthetic_config(tmp_path, trainer={"total_tokens": 256 * 3, "device": "cpu", "optimizer": "adam"})
    train(cfg)
    trainer = Trainer(cfg, build_sae(cfg, 32, device="meta"), TrainState())
    ck = Checkpointer(cfg)
    ck.load(trainer, ck.resolve("latest"))
    assert trainer.state.step == 3
    assert trainer.tokens_since_fired.device.type == "meta"
    for p in trainer.sae.parameters():
        state = trainer.optimizer.state[p]
        assert state["exp_avg"].device == state["exp_avg_sq"].device == p.device == torch.device("meta")
        assert state["step"].device.type == "cpu"  # where torch keeps Adam's step (not capturable)


def test_ray_trainer_actors_ask_for_a_gpu_only_where_the_device_can_use_one():
    assert trainer_gpus("cpu", 8, 4) == 0
    assert trainer_gpus("auto", 8, 4) == trainer_gpus("cuda", 4, 4) == 1
    assert trainer_gpus("auto", 2, 4) == 0  # too few GPUs for every rank: all ranks on CPUs
    with pytest.raises(ConfigError, match=r"trainer\.device \('cuda'\) needs one GPU per trainer rank "
                                          r"\(parallel\.dp x parallel\.fp = 4\), but the Ray cluster has 2"):
        trainer_gpus("cuda", 2, 4)
    with pytest.raises(ConfigError, match=r"trainer\.device \('cuda:1'\).*use trainer\.device=cuda or auto"):
        trainer_gpus("cuda:1", 8, 4)


@unittest.skipUnless(torch.cuda.is_available(), "trains on a CUDA device; this machine has none")
def test_cuda_run_matches_cpu_run_and_writes_host_tensors(tmp_path):
    cpu = train(synthetic_config(tmp_path / "cpu", trainer={"total_tokens": 256 * 40, "device": "cpu"}))
    cfg = synthetic_config(tmp_path / "cuda", trainer={"total_tokens": 256 * 40, "device": "cuda"})
    gpu = train(cfg)
    assert gpu["steps"] == cpu["steps"] == 40
    assert abs(gpu["fvu"] - cpu["fvu"]) < 0.02, (gpu["fvu"], cpu["fvu"])
    from sae_dist.export import load_saelens

    sae, _ = load_saelens(gpu["export_dir"])
    assert all(t.device.type == "cpu" for t in sae.state_dict().values())
    resumed = Trainer(cfg, build_sae(cfg, 32, device="cuda"), TrainState())
    ck = Checkpointer(cfg)
    ck.load(resumed, ck.resolve("latest"))
    assert resumed.tokens_since_fired.is_cuda and all(p.is_cuda for p in resumed.sae.parameters())
