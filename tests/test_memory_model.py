"""The memory model (scripts/memory_plan.py) against the bytes of the tensors a training step really
holds, through the same bookkeeping scripts/bench_scaling.py reports with: if the code changes what it
keeps, the model's table stops matching here, not silently in docs/memory.md."""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import bench_scaling  # noqa: E402
import memory_plan  # noqa: E402

from sae_dist.optim import ChunkedAdam  # noqa: E402
from sae_dist.sae import SparseAutoencoder  # noqa: E402

D, N, K, B = 48, 768, 8, 128


def _trained(n: int, fp: int) -> tuple[bench_scaling.Trainer, dict[str, int]]:
    """This rank's trainer for a shard of n / fp latents after 3 steps (AuxK acts in the last two), and
    its tensors' bytes by the model's terms."""
    cfg = bench_scaling.config(D, n, K, B, 1, 256)
    # a shard's tensors: n / fp rows and the replicated b_dec (its collectives are not needed here)
    sae = SparseAutoencoder(cfg.sae, D, n_local=n // fp, seed=0)
    trainer = bench_scaling.Trainer(cfg, sae, bench_scaling.TrainState())
    grads = bench_scaling.count_gradients(trainer.optimizer)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        trainer.train_step(torch.randn(B, D, generator=g))
    assert all(p.grad is None for p in trainer.sae.parameters()), "gradients outlived their update"
    return trainer, bench_scaling.tensor_bytes(trainer.sae, trainer.optimizer, grads)


@pytest.mark.parametrize("fp", [1, 2, 4])
def test_weights_gradients_and_adam_state_are_the_bytes_the_model_counts(fp: int) -> None:
    trainer, measured = _trained(N, fp)
    model = memory_plan.plan(D, N, 1, fp, "fp32", "torch", batch=B, k=K)
    assert trainer.optimizer_name == "adam"
    assert measured == {"weights": model.weights, "grads": model.grads, "optimizer": model.optimizer}
    cpu = memory_plan.cpu_peak(D, N, fp, batch=B, k=K)
    assert {key: cpu[key] for key in measured} == measured
    # the temporaries: AuxK's second decoder gradient in the backward (dead latents: the default
    # planning case), Adam's slice of at most ADAM_CHUNK elements in the update
    assert isinstance(trainer.optimizer, ChunkedAdam)
    decoder = trainer.sae.W_dec.numel() * trainer.sae.W_dec.element_size()
    assert cpu["transient"] == max(decoder, min(trainer.sae.W_dec.numel(), trainer.optimizer.chunk) * 4)
    live = memory_plan.cpu_peak(D, N, fp, batch=B, k=K, dead=0.0)
    assert live["transient"] == min(trainer.sae.W_dec.numel(), trainer.optimizer.chunk) * 4
    assert cpu["peak"] == measured["weights"] + measured["optimizer"] + max(cpu["buffers"],
                                                                            measured["grads"] + cpu["transient"])


def test_the_forward_buffer_term_grows_with_the_dead_latents_that_auxk_copies_out() -> None:
    live = memory_plan.plan(D, 4096, 1, 1, batch=B, k=K, chunk=1024, dead=0.0).buffers
    dead = memory_plan.plan(D, 4096, 1, 1, batch=B, k=K, chunk=1024, dead=1.0).buffers
    assert dead - live == B * 1024 * 4  # one (B, chunk) fp32 block of dead columns


def test_the_scaling_bench_slope_and_fit_check() -> None:
    assert bench_scaling.slope(1.0, 4.0, 1000, 4000) == pytest.approx(1.0)
    assert bench_scaling.slope(1.0, 2.0, 1000, 4000) == pytest.approx(0.5)
    ok, need = bench_scaling.fits(6144, 1, argparse.Namespace(d=384, k=32, batch=4096, chunk=8192))
    assert ok and 0.6e9 < need < 2e9


_HUGE_PAGES_PROBE = """
import re
import sae_dist, torch
t = torch.ones(64 << 18)  # 64 MiB, over glibc's mmap threshold: fresh pages
huge = 0
with open("/proc/self/smaps") as f:
    lines = f.read().splitlines()
for i, line in enumerate(lines):  # the mapping that holds t
    if m := re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line):
        lo, hi = int(m[1], 16), int(m[2], 16)
        if lo <= t.data_ptr() < hi:
            huge = int(next(x for x in lines[i + 1:] if x.startswith("AnonHugePages:")).split()[1])
            break
print(huge)
"""


def _thp_mode() -> str:
    """The kernel's transparent-huge-page mode (always, madvise, never), 'never' where it has none."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


@pytest.mark.skipif(_thp_mode() == "never", reason="this kernel offers no transparent huge pages")
def test_importing_sae_dist_first_puts_large_tensors_on_huge_pages_unless_the_environment_says_no():
    """sae_dist sets THP_MEM_ALLOC_ENABLE=1 before torch's first allocation: a 64 MiB tensor then lies
    on transparent huge pages; THP_MEM_ALLOC_ENABLE=0 in the environment is kept (THP in `madvise`
    mode: none)."""
    import subprocess

    def huge_kib(env_value: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        if env_value is not None:
            env["THP_MEM_ALLOC_ENABLE"] = env_value
        out = subprocess.run([sys.executable, "-c", _HUGE_PAGES_PROBE], env=env, capture_output=True, text=True,
                             check=True)
        return int(out.stdout.strip())

    assert huge_kib(None) >= 2 << 10  # some of the 64 MiB on 2 MiB pages (all of it, where memory is not fragmented)
    if _thp_mode() == "madvise":
        assert huge_kib("0") == 0
