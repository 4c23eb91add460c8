"""Memory and speed of a cross-layer transcoder's training step (`sae=clt`: the library's module, TopK
per layer, AuxK on, Adam), against the bytes of its parameters + gradients + Adam state.

    python scripts/bench_clt.py                          # L = 6 layers, d = 384, n = 49152, k = 16 per layer, B = 4096
    python scripts/bench_clt.py --layers 2 6 12 --n 24576

One process per case (peak RSS is per process): a tiny CLT warms up the libraries first, then the peak
RSS above that level over --steps steps is the step's memory. The dense alternative would hold a
(B, n) code matrix per layer (B n L floats: 3 GiB at the defaults) and its gradient; the sparse path
holds the (B, L k) codes and B x chunk encoder blocks. Time: the median step after the first.

`--baseline` adds, per case, the decode the CLT had before its bag decode (2026-12-02): every active
latent decoded over all L d columns (its zero blocks included, their gradient zeroed after), the
reconstruction's and AuxK's entries cut into rows of one width and decoded in one call. Same process
layout, same inputs: the ratio of the two step times is the bag decode's gain.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from sae_dist.config import sae_config
from sae_dist.optim import build_optimizer
from sae_dist.sae import SparseAutoencoder


class _MaskEarlierBlocks(torch.autograd.Function):
    """The baseline's gradient mask: identity on W_dec; zeroes the blocks before each latent's layer."""

    @staticmethod
    def forward(ctx, W, layers):  # type: ignore[override]
        ctx.layers = layers
        return W.view_as(W)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        from sae_dist.archs.clt import valid_blocks

        g = grad.view(grad.shape[0], ctx.layers, -1)
        g.mul_(valid_blocks(grad.shape[0], ctx.layers, grad.device).unsqueeze(2).to(g.dtype))
        return grad, None


def full_width_decode(self, sae, pairs):  # type: ignore[no-untyped-def]
    """The baseline for CrossLayerTranscoder._triangle: each selection's rows cut to the narrowest
    width c (zero-weight padding), all decoded over the full (n, L d) rows in one sparse decode, and
    each token's rows summed."""
    import torch.nn.functional as F

    from sae_dist import kernels

    L = sae.d_out // sae.d_model
    c = min(v.shape[1] for v, _ in pairs)
    vals, ids, rows = [], [], []
    for v, i in pairs:
        r = -(-v.shape[1] // c)
        extra = r * c - v.shape[1]
        vals.append(F.pad(v, (0, extra)).reshape(-1, c))
        ids.append(F.pad(i, (0, extra)).reshape(-1, c))
        rows.append(r)
    out = kernels.sparse_decode(torch.cat(vals), torch.cat(ids), _MaskEarlierBlocks.apply(sae.W_dec, L))
    parts, start = [], 0
    for (v, _), r in zip(pairs, rows):
        B = v.shape[0]
        parts.append(out[start:start + B * r].view(B, r, -1).sum(1))
        start += B * r
    return torch.cat(parts)


def worker(L: int, d: int, n: int, k: int, B: int, steps: int, chunk: int, baseline: bool = False) -> dict:
    if baseline:
        from sae_dist.archs.clt import CrossLayerTranscoder

        CrossLayerTranscoder._triangle = full_width_decode  # type: ignore[method-assign]

    def build(n_latents: int, kk: int) -> tuple[SparseAutoencoder, torch.optim.Optimizer]:
        sae = SparseAutoencoder(sae_config(arch="clt", n_latents=n_latents, k=kk, dead_tokens=1), d, d_out=L * d,
                                encoder_chunk=chunk, generator=torch.Generator().manual_seed(0))
        return sae, build_optimizer("adam", list(sae.parameters()), lr=1e-4)  # the trainer's Adam

    def one(sae: SparseAutoencoder, opt: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor) -> float:
        t0 = time.perf_counter()
        out = sae(x, dead)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    g = torch.Generator().manual_seed(1)
    small, small_opt = build(8 * L, 2)
    for _ in range(2):
        one(small, small_opt, torch.randn(64, 2 * L, d, generator=g), torch.zeros(8 * L, dtype=torch.bool))
    del small, small_opt
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize()
    sae, opt = build(n, k)
    dead = torch.rand(n, generator=g) < 0.5  # AuxK selects and decodes too
    times = [one(sae, opt, torch.randn(B, 2 * L, d, generator=g), dead) for _ in range(steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    params = sum(p.numel() * p.element_size() for p in sae.parameters())
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"peak": peak, "model_bytes": 2 * params + state, "step_s": statistics.median(times[1:]),
            "dense_codes_bytes": B * n * L * 4}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[6])
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--n", type=int, default=49152, help="latents over all layers")
    p.add_argument("--k", type=int, default=16, help="per layer")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunk", type=int, default=8192, help="trainer.encoder_chunk: latents per encoder block")
    p.add_argument("--baseline", action="store_true", help="also time the full-width decode it replaced")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--as-baseline", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.d, a.n, a.k, a.batch, a.steps, a.chunk, a.as_baseline)))  # noqa: T201
        return
    print(f"d={a.d} n={a.n} k={a.k} per layer B={a.batch} encoder_chunk={a.chunk} threads={torch.get_num_threads()}")  # noqa: T201
    print("| layers | decode | step s | tokens/s | peak GiB above start | params+grads+Adam GiB | ratio | dense codes GiB |")  # noqa: T201
    print("|---|---|---|---|---|---|---|---|")  # noqa: T201
    gb = 2**30
    for L in a.layers:
        for base in ([False, True] if a.baseline else [False]):
            cmd = [sys.executable, __file__, "--worker", str(L), "--d", str(a.d), "--n", str(a.n), "--k", str(a.k),
                   "--batch", str(a.batch), "--steps", str(a.steps), "--chunk", str(a.chunk)]
            cmd += ["--as-baseline"] if base else []
            # glibc's mmap threshold fixed at 128 KiB, as in bench_scaling.py: freed tensors leave the process
            # instead of staying as slack in glibc's heaps (blocks up to 32 MB by default)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
            r = json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=env
                                          ).stdout.strip().splitlines()[-1])
            print(f"| {L} | {'full width (before)' if base else 'bag'} | {r['step_s']:.2f} | {a.batch / r['step_s']:.0f} | "  # noqa: T201
                  f"{r['peak'] / gb:.2f} | {r['model_bytes'] / gb:.2f} | {r['peak'] / r['model_bytes']:.2f} | "
                  f"{r['dense_codes_bytes'] / gb:.2f} |")


if __name__ == "__main__":
    main()
