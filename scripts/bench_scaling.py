"""How step time and memory per rank grow with the dictionary: TopK + AuxK, fp32 Adam, CPU, gloo.

    python scripts/bench_scaling.py                                  # d=384, k=32, B=4096; n up to 2^20, fp 1 2 4
    python scripts/bench_scaling.py --n 6144 49152 --fp 1 2 --steps 2 --warmup 1   # a quick look

Each (n, fp) runs fp fresh processes (a real gloo group for fp > 1) that share the machine's cores
(`--threads` per rank, default cores / fp). A rank records:

- its runtime: resident memory after training a tiny SAE for 3 steps (every library and code path
  loaded) and before the benchmark's SAE exists (the model does not predict it: it is the process, not
  the dictionary);
- the bytes of its tensors by the memory model's terms (weights, gradients, Adam's moments);
- its peak resident memory (getrusage), to compare with runtime + `memory_plan.cpu_peak`, with glibc's
  mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_, see main) so that freed tensors leave;
- the median step time over `--steps` steps after `--warmup`.

AuxK is on and acts from the second step (`sae.dead_tokens` = one batch), so the encoder also copies
and ranks the dead latents' columns, as in a run whose window has passed. Printed after the table: the
log-log slope of step time against n between neighbouring sizes, per fp, and the encoder-FLOP ceiling:
the fp32 matmul rate of this machine (an encoder block, (B, d) x (d, chunk), on all cores) over 2 d n
FLOP per token, against the tokens/s reached. The encoder finds the top-k as the trainer does by default
(`--select auto`, trainer.encoder_select): on CPUs with AVX512-BF16 or AMX from bf16 candidates ranked by
their exact fp32 values, the fp32 top-k proven by a rounding bound; `--select fp32` for one fp32 matmul.
The ceiling is the fp32 matmul's rate either way. `--json FILE` keeps the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_plan import GB, cpu_peak  # noqa: E402

from sae_dist import kernels  # noqa: E402
from sae_dist.config import (  # noqa: E402
    Config,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrackingConfig,
    TrainerConfig,
    sae_config,
)
from sae_dist.data.synthetic import SyntheticSource  # noqa: E402
from sae_dist.lifecycle import build_sae  # noqa: E402
from sae_dist.parallel import single_process  # noqa: E402
from sae_dist.parallel.dims import build_mesh  # noqa: E402
from sae_dist.parallel.engine import build_engine  # noqa: E402
from sae_dist.trainer import Trainer, TrainState, auto_lr  # noqa: E402


def config(d: int, n: int, k: int, batch: int, fp: int, chunk: int) -> Config:
    """The benchmark's run: TopK with AuxK acting after one batch without firing, fp32, torch engine."""
    return Config(
        model=ModelConfig(d_model=d), data=DataConfig(source="synthetic"),
        sae=sae_config(n_latents=n, k=k, dead_tokens=batch), parallel=ParallelConfig(fp=fp),
        trainer=TrainerConfig(batch_tokens=batch, total_tokens=batch * 10**6, encoder_chunk=chunk),
        tracking=TrackingConfig(enabled=False), output_dir=tempfile.gettempdir(),
    )


def _size(tensors) -> int:  # type: ignore[no-untyped-def]
    return sum(t.numel() * t.element_size() for t in tensors)


def count_gradients(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """{"grads": bytes of the gradients at the start of each update}, kept up to date by a hook: they
    are freed once applied, so after a step there are none to count."""
    seen = {"grads": 0}

    def hook(opt, args, kwargs) -> None:  # type: ignore[no-untyped-def]
        seen["grads"] = _size(p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None)

    optimizer.register_step_pre_hook(hook)
    return seen


def tensor_bytes(sae: torch.nn.Module, optimizer: torch.optim.Optimizer, grads: dict[str, int]) -> dict[str, int]:
    """This rank's bytes by the memory model's terms (`grads` from `count_gradients`). Adam's 0-dim step
    counters (4 bytes a parameter) are left out, as the model leaves them out."""
    state = [t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
    return {"weights": _size(sae.parameters()), "grads": grads["grads"], "optimizer": _size(state)}


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trainer(args: argparse.Namespace, n: int, fp: int, batch: int) -> Trainer:
    cfg = config(args.d, n, args.k, batch, fp, args.chunk)
    mesh = build_mesh(cfg.parallel, n) if fp > 1 else single_process(cfg.parallel, n)
    sae = build_sae(cfg, args.d, mesh)
    return Trainer(cfg, sae, TrainState(), engine=build_engine(cfg, sae, mesh, auto_lr(cfg)))


def _bench(rank: int, fp: int, args: argparse.Namespace, n: int) -> dict:
    # the runtime: a process that has trained a tiny SAE (3 steps, AuxK in the last) has loaded every
    # library and code path the run uses (the first optimizer alone imports ~0.15 GB of torch)
    tiny = _trainer(args, 64 * fp, fp, 64)
    for _ in range(3):
        tiny.train_step(torch.randn(64, args.d))
    del tiny
    runtime = rss_bytes()
    trainer = _trainer(args, n, fp, args.batch)
    grads = count_gradients(trainer.optimizer)
    src = SyntheticSource(args.d, 4 * args.d, 8, seed=0, chunk_tokens=args.batch)
    times, dead = [], 0.0
    for step in range(args.warmup + args.steps):
        x = src.chunk(step)
        dead = max(dead, float(trainer.dead_mask().float().mean()))  # what this step's forward copies out
        t0 = time.perf_counter()
        trainer.train_step(x)
        if fp > 1:
            dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"n": n, "fp": fp, "rank": rank, "step_s": statistics.median(times), "runtime": runtime,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "dead_local_max": dead,
            "dead_fraction": trainer.dead_fraction(), **tensor_bytes(trainer.sae, trainer.optimizer, grads)}


def _threads(args: argparse.Namespace, fp: int) -> int:
    return args.threads or max(1, (os.cpu_count() or 1) // fp)


def _worker(rank: int, fp: int, port: int, args: argparse.Namespace, n: int, out: str) -> None:
    torch.set_num_threads(_threads(args, fp))
    kernels.set_select_precision(args.select)  # as run.train does: a spawned rank starts from the default
    if fp > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=fp,
                                timeout=timedelta(seconds=3600))
    try:
        result = _bench(rank, fp, args, n)
    finally:
        if fp > 1:
            dist.destroy_process_group()
    with open(os.path.join(out, f"{n}-{fp}-{rank}.json"), "w") as fh:
        json.dump(result, fh)


def run(n: int, fp: int, args: argparse.Namespace, out: str) -> list[dict]:
    """fp fresh processes (peak memory is this run's alone) -> one row per rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(fp, port, args, n, out), nprocs=fp)
    rows = []
    for rank in range(fp):
        with open(os.path.join(out, f"{n}-{fp}-{rank}.json")) as fh:
            r = json.load(fh)
        model = cpu_peak(args.d, n, fp, args.batch, args.k, chunk=args.chunk, dead=r["dead_local_max"])
        r["model_peak"] = r["runtime"] + model["peak"]
        r["model"] = model
        rows.append(r)
    return rows


def matmul_rate(d: int, batch: int, chunk: int, repeats: int = 20) -> float:
    """fp32 FLOP/s of one encoder block, (B, d) x (d, chunk) + bias, on all of this machine's cores: the
    best of `repeats` timings after three warm-up calls. A ceiling is the best rate the machine gives;
    the median of five right at start-up once read 79.6 GFLOP/s on a CPU that gives 164-178 a minute later."""
    torch.set_num_threads(os.cpu_count() or 1)
    x, W, b = torch.randn(batch, d), torch.randn(chunk, d), torch.randn(chunk)
    for _ in range(3):
        torch.addmm(b, x, W.t())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.addmm(b, x, W.t())
        times.append(time.perf_counter() - t0)
    return 2 * batch * d * chunk / min(times)


def fits(n: int, fp: int, args: argparse.Namespace) -> tuple[bool, float]:
    """Whether fp ranks of this size fit in 90% of the memory available now (0.6 GB runtime a rank)."""
    need = fp * (cpu_peak(args.d, n, fp, args.batch, args.k, chunk=args.chunk)["peak"] + 0.6 * GB)
    with open("/proc/meminfo") as fh:
        avail = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable"))
    return need <= 0.9 * avail, need


def slope(t1: float, t2: float, n1: int, n2: int) -> float:
    """d log(time) / d log(n)."""
    return math.log(t2 / t1) / math.log(n2 / n1)


def report(rows: list[dict], rate: float, args: argparse.Namespace) -> None:
    print("| n | fp | rank | step s (median) | tokens/s | of the FLOP ceiling | weights + grads + Adam GB "
          "(model) | runtime GB | peak RSS GB | model GB | peak / model | dead |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["model"]
        state, state_model = (r["weights"] + r["grads"] + r["optimizer"],
                              m["weights"] + m["grads"] + m["optimizer"])
        tps = args.batch / r["step_s"]
        ceiling = rate / (2 * args.d * r["n"])
        print(f"| {r['n']} | {r['fp']} | {r['rank']} | {r['step_s']:.2f} | {tps:.0f} | {tps / ceiling:.0%} | "
              f"{state / GB:.3f} ({state_model / GB:.3f}) | {r['runtime'] / GB:.2f} | {r['peak_rss'] / GB:.2f} | "
              f"{r['model_peak'] / GB:.2f} | {r['peak_rss'] / r['model_peak']:.2f} | {r['dead_fraction']:.0%} |")
    print(f"\nencoder-FLOP ceiling: {rate / 1e9:.1f} GFLOP/s fp32 on {os.cpu_count()} cores "
          f"(({args.batch}, {args.d}) x ({args.d}, {args.chunk})), i.e. {rate:.3g} / (2 x {args.d} x n) tokens/s")
    rank0 = {(r["n"], r["fp"]): r for r in rows if r["rank"] == 0}
    for fp in sorted({f for _, f in rank0}):
        ns = sorted(n for n, f in rank0 if f == fp)
        pieces = [f"{a}->{b}: {slope(rank0[a, fp]['step_s'], rank0[b, fp]['step_s'], a, b):.2f}"
                  for a, b in zip(ns, ns[1:])]
        if pieces:
            print(f"fp={fp}: log-log slope of step time vs n  " + ",  ".join(pieces))
    for n in sorted({n for n, _ in rank0}):
        if (n, 1) in rank0 and (n, 2) in rank0:
            one, two = rank0[n, 1], rank0[n, 2]
            print(f"n={n}: peak RSS fp=2 / fp=1 {two['peak_rss'] / one['peak_rss']:.3f}; above the runtime "
                  f"{(two['peak_rss'] - two['runtime']) / (one['peak_rss'] - one['runtime']):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--n", type=int, nargs="+", default=[6144, 49152, 262144, 1048576])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=8192, help="trainer.encoder_chunk")
    ap.add_argument("--fp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="steps before timing (the first has no AuxK)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (0 = cores / fp)")
    ap.add_argument("--select", default="auto", choices=["auto", "fp32", "bf16"],
                    help="trainer.encoder_select: how the encoder finds the fp32 top-k (auto, the trainer's "
                    "default: bf16 candidates on CPUs with AVX512-BF16/AMX, else one fp32 matmul)")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args()
    # glibc's default (a dynamic mmap threshold of up to 32 MB) keeps freed blocks below it in its heaps,
    # so a peak would count allocator slack (+0.15 GB at n=49152); with a fixed threshold every tensor's
    # pages go back when it is freed and the peak measures what was live. The ranks inherit it.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    rate = matmul_rate(args.d, args.batch, args.chunk)
    select = kernels.resolve_select(args.select)
    print(f"TopK + AuxK, d={args.d} k={args.k}, {args.batch} tokens/step, fp32 Adam, CPU ({os.cpu_count()} cores), "
          f"{args.warmup} + {args.steps} steps per run; top-k selection: {select} (--select {args.select})")
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for n in args.n:
            for fp in args.fp:
                ok, need = fits(n, fp, args)
                if not ok or n % fp:
                    why = f"needs ~{need / GB:.1f} GB" if not ok else f"fp ({fp}) does not divide n"
                    print(f"n={n} fp={fp}: skipped, {why}", flush=True)
                    continue
                t0 = time.perf_counter()
                rows += run(n, fp, args, out)
                print(f"n={n} fp={fp}: {time.perf_counter() - t0:.0f} s", flush=True)
    rate = max(rate, matmul_rate(args.d, args.batch, args.chunk))  # again once the runs are done: the better
    report(rows, rate, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"matmul_flops": rate, "args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
