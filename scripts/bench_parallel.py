"""Step time and memory per rank of a TopK SAE for fp in {1, 2, ...} on CPU (gloo), same data.

    python scripts/bench_parallel.py                               # d=256, n=16384, k=32, 1024 tokens
    python scripts/bench_parallel.py --d 512 --n 65536 --fp 1 2 4 --steps 10

Each fp runs fp processes of `--threads` torch threads (default: the machine's cores / fp, so every
run uses the same cores). Reported per rank: median step time, parameter + gradient + Adam bytes, and
peak resident memory (which includes the ~0.3 GB torch runtime).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_dist.config import (
    Config,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrackingConfig,
    TrainerConfig,
    sae_config,
)
from sae_dist.data.synthetic import SyntheticSource
from sae_dist.lifecycle import build_sae
from sae_dist.parallel import single_process
from sae_dist.parallel.dims import build_mesh
from sae_dist.parallel.engine import build_engine
from sae_dist.trainer import Trainer, TrainState, auto_lr


def _config(args: argparse.Namespace, fp: int) -> Config:
    return Config(
        model=ModelConfig(d_model=args.d), data=DataConfig(source="synthetic"),
        sae=sae_config(n_latents=args.n, k=args.k), parallel=ParallelConfig(fp=fp),
        trainer=TrainerConfig(batch_tokens=args.batch, total_tokens=args.batch * 10**6, encoder_chunk=args.chunk),
        tracking=TrackingConfig(enabled=False), output_dir=tempfile.gettempdir(),
    )


def _bench(rank: int, fp: int, args: argparse.Namespace) -> dict:
    cfg = _config(args, fp)
    mesh = build_mesh(cfg.parallel, args.n) if fp > 1 else single_process(cfg.parallel, args.n)
    sae = build_sae(cfg, args.d, mesh)
    trainer = Trainer(cfg, sae, TrainState(), engine=build_engine(cfg, sae, mesh, auto_lr(cfg)))
    src = SyntheticSource(args.d, 4 * args.d, 8, seed=0, chunk_tokens=args.batch)
    times = []
    for step in range(args.warmup + args.steps):
        x = src.chunk(step)
        t0 = time.perf_counter()
        trainer.train_step(x)
        if fp > 1:
            dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    tensors = [p for p in sae.parameters()] + [p.grad for p in sae.parameters() if p.grad is not None]
    tensors += [t for st in trainer.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    return {"fp": fp, "rank": rank, "step_ms": 1000 * statistics.median(times),
            "state_mb": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _worker(rank: int, fp: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // fp))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=fp,
                            timeout=timedelta(seconds=600))
    try:
        result = _bench(rank, fp, args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"{fp}-{rank}.json"), "w") as fh:
        json.dump(result, fh)


def _run(fp: int, args: argparse.Namespace, out: str) -> None:
    if fp == 1:  # a fresh process too, so peak RSS is this run's alone
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=_single, args=(args, out))
        p.start()
        p.join()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(fp, port, args, out), nprocs=fp)


def _single(args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    with open(os.path.join(out, "1-0.json"), "w") as fh:
        json.dump(_bench(0, 1, args), fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=4096, help="trainer.encoder_chunk")
    ap.add_argument("--fp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (0 = cores / fp)")
    args = ap.parse_args()
    print(f"TopK SAE d={args.d} n={args.n} k={args.k}, {args.batch} tokens/step, CPU, {os.cpu_count()} cores")
    print("| fp | rank | step ms (median) | params+grads+Adam MB | peak RSS MB |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for fp in args.fp:
            _run(fp, args, out)
            for rank in range(fp):
                with open(os.path.join(out, f"{fp}-{rank}.json")) as fh:
                    r = json.load(fh)
                print(f"| {fp} | {rank} | {r['step_ms']:.0f} | {r['state_mb']:.1f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
