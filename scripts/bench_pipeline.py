"""Pipeline throughput, all figures from one run on this machine:

    python scripts/bench_pipeline.py [--tokens 65536] [--producers 2] [--repeats 3]

1. producers alone: N MiniLM producer actors, chunks pulled as fast as they come (no training);
2. trainer alone: the TopK SAE (default size) training on activations already in memory;
3. end to end: the trainer fed by the producers through the training path's shuffle buffer (steady-state
   tokens/s of the training loop over whole shuffle blocks);
4. fan-out: 3 SAE sizes from one in-process LM stream vs the largest alone (LM-bound).
Prints medians over --repeats and the ratio e2e / min(producers, trainer).

--split-cores P: the producer actors' processes are pinned to the first P cores and the trainer (this
process, one torch thread per core) to the rest, for 1-3 alike: each side has its own cores as on a
cluster, where producers and trainers run on their own GPUs, and the ratio measures what the pipeline
itself costs. Without it both sides share all cores, and "end to end" also pays for their contention.
Ray's own processes (raylet, object store) are not pinned.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
import torch  # noqa: E402

from sae_dist import kernels  # type: ignore[attr-defined]  # noqa: E402
from sae_dist.config import (  # noqa: E402
    ClusterConfig,
    Config,
    DataConfig,
    ModelConfig,
    TrackingConfig,
    TrainerConfig,
    sae_config,
)
from sae_dist.data import BatchStream  # noqa: E402
from sae_dist.data.lm import LMActivationSource  # noqa: E402
from sae_dist.lifecycle import build_sae  # noqa: E402
from sae_dist.pipeline.fanout import train_fanout  # noqa: E402
from sae_dist.pipeline.launch import build_stream_source, max_in_flight, start_producers  # noqa: E402
from sae_dist.trainer import Trainer, TrainState  # noqa: E402


def config(tokens: int, producers: int, out: str, select: str = "auto", in_flight: int = 0, **sae) -> Config:
    return Config(
        model=ModelConfig(batch_contexts=16),
        data=DataConfig(shuffle_buffer_tokens=16384),
        sae=sae_config(**sae),
        trainer=TrainerConfig(total_tokens=tokens, log_every=10_000, encoder_select=select),
        tracking=TrackingConfig(enabled=False),
        cluster=ClusterConfig(producers=producers, producer_cpus=1.0, max_in_flight=in_flight),
        output_dir=out,
    )


def pull(source, tokens: int) -> float:
    t0, have = time.perf_counter(), 0
    for acts, _ in source.chunks():
        have += acts.shape[0]
        if have >= tokens:
            break
    return have / (time.perf_counter() - t0)


def train_rate(cfg: Config, batches) -> float:
    sae = build_sae(cfg, 384)
    trainer = Trainer(cfg, sae, TrainState(scale=1.0))
    steps = cfg.trainer.total_tokens // cfg.trainer.batch_tokens
    it = iter(batches)
    trainer.train_step(next(it))  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(it))
    return steps * cfg.trainer.batch_tokens / (time.perf_counter() - t0)


def stream_rate(cfg: Config, stream: BatchStream) -> tuple[float, float]:
    """Steady-state tokens/s of training through the shuffle buffer: from the first batch of block 2 (the
    third) to the first batch of the block --tokens later. Each end is just after a block was assembled, so the
    window holds whole fills and whole blocks of training, and chunks already in flight at its start are
    matched by those in flight at its end. (Before block 0 the trainer waits for a whole block: a start-up
    latency a long run pays once: returned second.)"""
    sae = build_sae(cfg, 384)
    trainer = Trainer(cfg, sae, TrainState(scale=1.0))
    t_start, marks, trained = time.perf_counter(), {}, 0
    want = None
    for x in stream:
        if stream.taken == 1:  # the first batch of block `stream.block`, assembled just now
            marks[stream.block] = (time.perf_counter(), trained)
            if want is None and stream.block == 2:
                want = trained + cfg.trainer.total_tokens
            elif want is not None and trained >= want:
                break
        trainer.train_step(x)
        trained += x.shape[0]
    (t0, n0), (t1, n1) = marks[2], marks[max(marks)]
    return (n1 - n0) / (t1 - t0), marks[0][0] - t_start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--select", default="auto", choices=["auto", "fp32", "bf16"], help="trainer.encoder_select")
    ap.add_argument("--fanout-only", action="store_true")
    ap.add_argument("--stream-only", action="store_true", help="skip the fan-out part")
    ap.add_argument("--max-in-flight", type=int, default=0, help="cluster.max_in_flight (0 = auto)")
    ap.add_argument("--split-cores", type=int, default=0, metavar="P",
                    help="pin producers to the first P cores and the trainer to the others")
    args = ap.parse_args()
    if not args.fanout_only:
        bench_stream(args)
    if not args.stream_only:
        bench_fanout(args)


def bench_stream(args: argparse.Namespace) -> None:
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cfg = config(args.tokens, args.producers, "/tmp/bench_pipeline", args.select, args.max_in_flight)
    print(f"cluster.max_in_flight: {max_in_flight(cfg)} chunks of {cfg.model.batch_contexts} contexts")
    kernels.set_select_precision(args.select)  # as run.train does
    producers = start_producers(cfg)
    if args.split_cores:
        cores = sorted(os.sched_getaffinity(0))
        if not 0 < args.split_cores < len(cores):
            raise SystemExit(f"--split-cores ({args.split_cores}) must leave cores for both sides of {len(cores)}")
        prod_cores, train_cores = set(cores[: args.split_cores]), set(cores[args.split_cores :])
        for pid in ray.get([p.__ray_call__.remote(lambda self: os.getpid()) for p in producers], timeout=60):
            pin(pid, prod_cores)
        pin(os.getpid(), train_cores)
        torch.set_num_threads(len(train_cores))
        print(f"producers on cores {sorted(prod_cores)}, trainer on cores {sorted(train_cores)}")
    source = build_stream_source(cfg, producers)
    prod, alone, e2e, per_chunk, util = [], [], [], {"alone": [], "e2e": []}, []
    memory = [a for _, (a, _) in zip(range(64), LMActivationSource(cfg.model, cfg.data).chunks())]
    mem_batches = list(BatchStream(_Fixed(memory), cfg.trainer.batch_tokens, 0))
    for _ in range(args.repeats):
        before = busy(producers)
        prod.append(pull(source, args.tokens))
        per_chunk["alone"].append(busy(producers, before)[0])
        alone.append(train_rate(cfg, iter(mem_batches * 100)))
        # the training path: a shuffle buffer of whole chunks (without one, each chunk would give one batch
        # and drop its remainder)
        stream = BatchStream(source, cfg.trainer.batch_tokens, cfg.data.shuffle_buffer_tokens)
        before = busy(producers)
        rate, startup_s = stream_rate(cfg, stream)
        e2e.append(rate)
        each, share = busy(producers, before)
        per_chunk["e2e"].append(each)
        util.append(share)
    p, a, e = (statistics.median(v) for v in (prod, alone, e2e))
    print(f"producers alone ({args.producers}): {p:,.0f} tokens/s")
    print(f"trainer alone:            {a:,.0f} tokens/s")
    print(f"end to end:               {e:,.0f} tokens/s  = {e / min(p, a):.2f} x min(producers, trainer)")
    print(f"start-up: {startup_s:.1f} s until the first shuffle block is assembled (last repeat)")
    print(f"producer compute per chunk: {statistics.median(per_chunk['alone']) * 1e3:.0f} ms alone, "
          f"{statistics.median(per_chunk['e2e']) * 1e3:.0f} ms end to end; producers busy "
          f"{statistics.median(util):.0%} of the end-to-end wall time")
    for prod_actor in producers:
        ray.kill(prod_actor, no_restart=True)
    ray.shutdown()


def bench_fanout(args: argparse.Namespace) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    fan_cfg = config(args.tokens, 0, "/tmp/bench_fanout", args.select, fanout_n_latents=[1536, 3072, 6144])
    big_cfg = config(args.tokens, 0, "/tmp/bench_fanout_big", args.select, fanout_n_latents=[6144])
    fan, big = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        train_fanout(fan_cfg)
        fan.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        train_fanout(big_cfg)
        big.append(time.perf_counter() - t0)
    f, b = statistics.median(fan), statistics.median(big)
    print(f"fan-out 3 sizes (1536, 3072, 6144), selection {args.select}: {f:.1f} s; 6144 alone: {b:.1f} s; "
          f"ratio {f / b:.2f}")


def busy(producers: list, before: tuple | None = None) -> tuple:
    """(busy s, chunks served, wall s) summed over producers now; given `before`, (busy s per chunk,
    busy share of the wall time per producer) since then."""
    stats = ray.get([p.stats.remote() for p in producers], timeout=60)
    now = (sum(s["busy_s"] for s in stats), sum(s["served"] for s in stats), time.perf_counter())
    if before is None:
        return now
    d_busy, d_served, d_wall = (a - b for a, b in zip(now, before))
    return d_busy / max(d_served, 1), d_busy / len(producers) / d_wall


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of process pid (threads started later inherit it) onto `cores`."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that just ended
            pass


class _Fixed:
    d_model = 384

    def __init__(self, chunks):
        self.list = chunks

    def chunks(self, start=0):
        for i, c in enumerate(self.list[start:], start + 1):
            yield c, i


if __name__ == "__main__":
    main()
