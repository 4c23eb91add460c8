"""Training step of the sparse TopK SAE (`sae_dist.kernels`) against a dense torch TopK SAE, and of
the sparse JumpReLU SAE (the threshold encoder) against a dense JumpReLU.

    python scripts/bench_kernels.py                    # CPU: d=384 k=32 B=4096, n=6144 and 49152; memory at n=262144
    python scripts/bench_kernels.py --family jumprelu  # the same cases for JumpReLU (thresholds set for L0 ~ k)
    python scripts/bench_kernels.py --cases 768:32768:32:16384 4096:262144:32:16384 --memory-cases  # GPU
    SAE_DIST_KERNELS=torch python scripts/bench_kernels.py ...   # force the torch reference on a GPU

A case is d:n:k:B. Speed: one process per case runs dense and sparse steps (forward, backward, Adam)
alternately, from the same weights on the same batches; medians over --steps after --warmup, and the
largest relative loss difference between the two trajectories. Memory: one process per (case, path);
peak RSS (CPU) or peak allocated (GPU) above the level after a tiny warm-up model, against the bytes of
parameters + gradients + Adam state. JumpReLU: the sparse step is the library's SAE module
(`sae=jumprelu`, all its terms) and the dense one the same loss on a (B, n) matrix; thresholds start at
the level where a latent fires with probability k / n on the bench's unit-variance inputs. On a GPU also tokens/s and the fraction of the bf16 matmul ceiling
(a 8192^3 bf16 matmul timed in the same process); FLOPs counted are 2*B*n*d for the encoder plus
8*B*k*d for the sparse decoder and gradients.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from sae_dist import kernels  # type: ignore[attr-defined]  # kernels/ installs as sae_dist.kernels

log = logging.getLogger("bench_kernels")


def build(
    d: int, n: int, dtype: torch.dtype, device: str
) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(n, d, generator=g)
    W = W / W.norm(dim=1, keepdim=True)
    params = [W.clone(), torch.zeros(n), W, torch.zeros(d)]  # W_enc, b_enc, W_dec, b_dec
    params = [torch.nn.Parameter(p.to(device=device, dtype=dtype)) for p in params]
    return params, torch.optim.Adam(params, lr=1e-4, fused=True)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def dense_loss(params: list[torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    W_enc, b_enc, W_dec, b_dec = params
    pre = F.linear(x - b_dec, W_enc, b_enc)  # (B, n)
    vals, idx = pre.topk(k, dim=1)
    f = torch.zeros_like(pre).scatter(1, idx, F.relu(vals))  # (B, n)
    return fvu(x, f @ W_dec + b_dec)


def sparse_loss(params: list[torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    W_enc, b_enc, W_dec, b_dec = params
    vals, idx, _, _ = kernels.topk_encode(x - b_dec, W_enc, b_enc, k)  # (B, k)
    return fvu(x, kernels.sparse_decode(F.relu(vals), idx, W_dec) + b_dec)


def _jump_threshold(n: int, k: int) -> float:
    """The t with P(z > t) = k / n for z ~ N(0, 1): the pre-activations of unit rows on N(0, I) inputs."""
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - k / n)))


def build_jumprelu(d: int, n: int, k: int, dtype: torch.dtype, device: str):  # type: ignore[no-untyped-def]
    """(SAE module, its Adam) with thresholds for L0 ~ k; the dense path trains a copy of its tensors."""
    from sae_dist.config import sae_config
    from sae_dist.sae import SparseAutoencoder

    sae = SparseAutoencoder(sae_config(arch="jumprelu", n_latents=n, k=min(k, n - 1), init_l0=0,
                                       max_active=n), d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.log_threshold.fill_(math.log(_jump_threshold(n, k)))
    sae = sae.to(device=device, dtype=dtype)
    return sae, torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)


def sparse_jumprelu_loss(sae, x: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return sae(x).loss


def dense_jumprelu_loss(params: list[torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    from sae_dist.archs.jumprelu import JumpReluFn, StepFn

    W_dec, W_enc, b_enc, b_dec, log_t = params
    pre = F.linear(x - b_dec, W_enc, b_enc)  # (B, n)
    t = log_t.exp().expand_as(pre)
    f = JumpReluFn.apply(pre, t, 1e-3)  # (B, n)
    return fvu(x, f @ W_dec + b_dec) + 1e-3 * StepFn.apply(pre, t, 1e-3).sum(1).mean()


def build_family(family: str, path: str, d: int, n: int, k: int, dtype: torch.dtype, device: str):  # type: ignore[no-untyped-def]
    """(loss_fn, params, optimizer) of one path of one family."""
    if family == "topk":
        return (sparse_loss if path == "sparse" else dense_loss), *build(d, n, dtype, device)
    sae, opt = build_jumprelu(d, n, k, dtype, device)
    if path == "sparse":
        return sparse_jumprelu_loss, sae, opt
    params = [torch.nn.Parameter(p.detach().clone()) for p in sae.parameters()]
    return dense_jumprelu_loss, params, torch.optim.Adam(params, lr=1e-4, fused=True)


def _tensors(params) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return list(params.parameters()) if isinstance(params, torch.nn.Module) else list(params)


def step(loss_fn, params, opt, x, k) -> tuple[float, float, float, float]:  # type: ignore[no-untyped-def]
    """(loss, forward s, backward s, optimizer s)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    loss = loss_fn(params, x, k)
    sync()
    t1 = time.perf_counter()
    loss.backward()
    sync()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return loss.item(), t1 - t0, t2 - t1, time.perf_counter() - t2


def batches(B: int, d: int, count: int, dtype: torch.dtype, device: str):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(1)
    for _ in range(count):
        yield torch.randn(B, d, generator=g).to(device=device, dtype=dtype)


def bf16_ceiling(device: str) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0)


def speed_worker(d: int, n: int, k: int, B: int, args: argparse.Namespace) -> dict:
    built = {p: build_family(args.family, p, d, n, k, args.dtype, args.device) for p in ("dense", "sparse")}
    paths = {p: b[0] for p, b in built.items()}
    models = {p: b[1:] for p, b in built.items()}
    times: dict[str, list[tuple[float, float, float]]] = {p: [] for p in paths}
    losses: dict[str, list[float]] = {p: [] for p in paths}
    for i, x in enumerate(batches(B, d, args.warmup + args.steps, args.dtype, args.device)):
        took = {}
        for p, fn in paths.items():
            loss, *t = step(fn, *models[p], x, k)
            losses[p].append(loss)
            took[p] = sum(t)
            if i >= args.warmup:
                times[p].append(tuple(t))  # type: ignore[arg-type]
        log.info("d=%d n=%d step %d: dense %.3fs, sparse %.3fs", d, n, i, took["dense"], took["sparse"])
    out: dict[str, float | str] = {
        f"{p}_{part}": statistics.median(t[j] for t in times[p])
        for p in paths
        for j, part in enumerate(("fwd", "bwd", "opt"))
    }
    for p in paths:
        out[p] = statistics.median(sum(t) for t in times[p])
    out["loss_rel_diff"] = max(abs(a - b) / abs(a) for a, b in zip(losses["dense"], losses["sparse"]))
    out["backend"] = kernels.backend_for(_tensors(models["sparse"][0])[0])
    stats = kernels.reference.SELECT_STATS
    out["fallback"] = stats["fallback_rows"] / stats["rows"] if stats["rows"] else 0.0
    if args.device == "cuda":
        out["ceiling_flops"] = bf16_ceiling(args.device)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def memory_worker(d: int, n: int, k: int, B: int, path: str, args: argparse.Namespace) -> dict:
    for x in batches(64, d, 2, args.dtype, args.device):  # library buffers and threads are not the model's
        small = build_family(args.family, path, d, 64, min(k, 8), args.dtype, args.device)
        step(small[0], *small[1:], x, min(k, 8))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/statm") as f:
            base = int(f.read().split()[1]) * resource.getpagesize()
    fn, model, opt = build_family(args.family, path, d, n, k, args.dtype, args.device)
    params = _tensors(model)
    for x in batches(B, d, 3, args.dtype, args.device):
        step(fn, model, opt, x, k)
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    size = sum(t.numel() * t.element_size() for t in params + state)
    size += sum(p.numel() * p.element_size() for p in params)  # gradients, freed by zero_grad
    return {"peak": peak, "model_bytes": size}


def run_case(spec: str, args: argparse.Namespace, worker: str, path: str = "") -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--cases", spec, "--device", args.device, "--path", path,
           "--dtype", str(args.dtype).removeprefix("torch."), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--select", args.select, "--family", args.family]  # fmt: skip
    run = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    cpu_cases = ["384:6144:32:4096", "384:49152:32:4096"]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=cpu_cases, help="speed cases d:n:k:B")
    ap.add_argument(
        "--memory-cases", nargs="*", default=["384:262144:32:4096"], help="sparse-only memory cases"
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--speed-only", action="store_true", help="skip the memory runs")
    ap.add_argument("--family", default="topk", choices=["topk", "jumprelu"],
                    help="topk: TopK (streaming top-k encoder); jumprelu: JumpReLU (threshold encoder)")
    ap.add_argument("--worker", choices=["speed", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--path", default="", help=argparse.SUPPRESS)
    ap.add_argument("--select", default="auto", choices=["auto", "fp32", "bf16"],
                    help="how the sparse path finds the exact fp32 top-k (trainer.encoder_select)")
    args = ap.parse_args()
    kernels.set_select_precision(args.select)
    args.dtype = getattr(torch, args.dtype)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.worker:
        d, n, k, B = map(int, args.cases[0].split(":"))
        result = (
            speed_worker(d, n, k, B, args)
            if args.worker == "speed"
            else memory_worker(d, n, k, B, args.path, args)
        )
        print(json.dumps(result))
        return
    gb = 2.0**30
    print(
        f"{args.family}: device {args.device}, {args.dtype}, selection {args.select} "
        f"({'fp32' if kernels.reference.SELECT_DTYPE is None else 'bf16 candidates, exact fp32 top-k'}), {torch.get_num_threads()} threads, medians of {args.steps} steps after "
        f"{args.warmup}, load average {os.getloadavg()[0]:.1f} at start\n"
    )
    print(
        "| d | n | k | B | kernels | dense step s | sparse step s (fwd/bwd/opt) | speed-up | loss rel. diff | rows recomputed in fp32 | tokens/s | of bf16 ceiling |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.cases:
        d, n, k, B = map(int, spec.split(":"))
        r = run_case(spec, args, "speed")
        tps = flops = "-"
        if "ceiling_flops" in r:
            tps = f"{B / r['sparse']:,.0f}"
            flops = f"{(2 * B * n * d + 8 * B * k * d) / r['sparse'] / r['ceiling_flops']:.1%} ({r['gpu']})"
        print(f"| {d} | {n} | {k} | {B} | {r['backend']} | {r['dense']:.3f} | {r['sparse']:.3f} ({r['sparse_fwd']:.3f}/"
              f"{r['sparse_bwd']:.3f}/{r['sparse_opt']:.3f}) | {r['dense'] / r['sparse']:.2f}x | {r['loss_rel_diff']:.1e} | {r['fallback']:.1%} | {tps} | {flops} |")  # fmt: skip
    if args.speed_only:
        return
    print("\n| d | n | k | B | path | peak GiB above start | params+grads+Adam GiB | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    mem = [(s, p) for s in args.cases for p in ("dense", "sparse")] + [
        (s, "sparse") for s in args.memory_cases
    ]
    for spec, path in mem:
        d, n, k, B = map(int, spec.split(":"))
        r = run_case(spec, args, "memory", path)
        print(
            f"| {d} | {n} | {k} | {B} | {path} | {r['peak'] / gb:.2f} | {r['model_bytes'] / gb:.2f} | {r['peak'] / r['model_bytes']:.2f} |"
        )
    for spec in args.memory_cases:
        d, n, k, B = map(int, spec.split(":"))
        print(
            f"\n(dense at n={n} not run: each (B, n) activation buffer alone is {B * n * 4 / gb:.1f} GiB in fp32)"
        )


if __name__ == "__main__":
    main()
