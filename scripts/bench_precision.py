"""fp32 vs bf16 weights (trainer.param_dtype) under DeepSpeed ZeRO on CPU (gloo), same data and layout.

    python scripts/bench_precision.py                         # d=384 n=49152 k=32, 4096 tokens, dp=2 ZeRO-2
    python scripts/bench_precision.py --dp 1 --offload        # one rank, Adam and masters in host memory

Each precision runs in fresh processes (dp of them, cores / dp torch threads each), so peak RSS is its
own. Reported per precision (rank 0): median step time after warm-up, the model's weight bytes, the
bytes of ZeRO's fp32 master partition + Adam's moments on that rank, peak resident memory, and the loss
after the last step. The last lines give the bf16 / fp32 ratios.
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
from sae_dist.kernels import set_select_precision

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
from sae_dist.parallel.dims import build_mesh
from sae_dist.parallel.engine import build_engine
from sae_dist.trainer import Trainer, TrainState, auto_lr


def _config(args: argparse.Namespace, dtype: str) -> Config:
    return Config(
        model=ModelConfig(d_model=args.d), data=DataConfig(source="synthetic"),
        sae=sae_config(n_latents=args.n, k=args.k),
        parallel=ParallelConfig(dp=args.dp, engine="deepspeed", zero_stage=args.zero_stage,
                                offload_optimizer=args.offload),
        trainer=TrainerConfig(batch_tokens=args.batch, total_tokens=args.batch * args.dp * 10**6,
                              encoder_chunk=args.chunk, param_dtype=dtype, device="cpu"),
        tracking=TrackingConfig(enabled=False), output_dir=tempfile.gettempdir(),
    )


def _bench(rank: int, dtype: str, args: argparse.Namespace) -> dict:
    cfg = _config(args, dtype)
    set_select_precision(cfg.trainer.encoder_select)
    mesh = build_mesh(cfg.parallel, args.n)
    sae = build_sae(cfg, args.d, mesh)
    trainer = Trainer(cfg, sae, TrainState(), engine=build_engine(cfg, sae, mesh, auto_lr(cfg)))
    src = SyntheticSource(args.d, 4 * args.d, 8, seed=0, chunk_tokens=args.batch * args.dp)
    times, loss = [], float("nan")
    for step in range(args.warmup + args.steps):
        x = src.chunk(step)[rank * args.batch : (rank + 1) * args.batch]
        t0 = time.perf_counter()
        loss = float(trainer.train_step(x).loss)
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    zero = trainer.engine.optimizer
    masters = sum(t.numel() * t.element_size() for t in zero.single_partition_of_fp32_groups)
    adam = sum(t.numel() * t.element_size() for st in zero.optimizer.state.values() for t in st.values()
               if torch.is_tensor(t) and t.dim() > 0)
    return {"step_ms": 1000 * statistics.median(times), "loss": loss,
            "weights_mb": sum(p.numel() * p.element_size() for p in sae.parameters()) / 2**20,
            "master_adam_mb": (masters + adam) / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _worker(rank: int, port: int, dtype: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.dp))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.dp))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.dp,
                            timeout=timedelta(seconds=600))
    try:
        result = _bench(rank, dtype, args)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(os.path.join(out, f"{dtype}.json"), "w") as fh:
            json.dump(result, fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--n", type=int, default=49152)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096, help="tokens per replica per step")
    ap.add_argument("--chunk", type=int, default=8192, help="trainer.encoder_chunk")
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--offload", action="store_true", help="parallel.offload_optimizer")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    print(f"TopK SAE d={args.d} n={args.n} k={args.k}, {args.batch} tokens x dp={args.dp}, ZeRO-{args.zero_stage}"
          f"{' offload' if args.offload else ''}, CPU, {os.cpu_count()} cores")
    print("| weights | step ms (median) | weights MB / rank | masters + Adam MB / rank | peak RSS MB | loss |")
    print("|---|---|---|---|---|---|")
    res = {}
    with tempfile.TemporaryDirectory() as out:
        for dtype in ("fp32", "bf16"):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_worker, args=(port, dtype, args, out), nprocs=args.dp)
            with open(os.path.join(out, f"{dtype}.json")) as fh:
                r = res[dtype] = json.load(fh)
            print(f"| {dtype} | {r['step_ms']:.0f} | {r['weights_mb']:.1f} | {r['master_adam_mb']:.1f} | "
                  f"{r['peak_rss_mb']:.0f} | {r['loss']:.4f} |")
    a, b = res["bf16"], res["fp32"]
    print(f"bf16 / fp32: step time {a['step_ms'] / b['step_ms']:.2f}x, weights {a['weights_mb'] / b['weights_mb']:.2f}x, "
          f"peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x, loss {a['loss'] / b['loss']:.4f}x")


if __name__ == "__main__":
    main()
