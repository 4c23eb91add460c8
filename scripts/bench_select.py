"""The CPU encoder's selection: grouped top-k (kernels/reference.py) against plain torch.topk.

    python scripts/bench_select.py                       # B=4096, d=384, n=32768, k=32, k_aux=192
    python scripts/bench_select.py --dead 1.0 --repeats 3

For each fraction of dead latents (AuxK's mask) it times the streaming encoder forward twice in the
same process on the same inputs: the baseline (per block, `torch.topk` over the whole block and, for
AuxK, the dead columns copied out and ranked by `torch.topk`) and `reference._stream_topk` as
shipped. Both give the same values (checked here before timing). Printed: the time of the matmuls
alone, each path's median over `--repeats`, the ratio, and the share of each path's time that is
the matmul (the fraction of the encoder-FLOP ceiling the forward reaches).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels import reference  # noqa: E402


def baseline(x, W, b, k, chunk, mask, k_aux):  # type: ignore[no-untyped-def]
    """The plain selection: torch.topk over each block, the dead columns copied out for AuxK."""
    tops, auxes = [], []
    for start in range(0, W.shape[0], chunk):
        pre = torch.addmm(b[start:start + chunk], x, W[start:start + chunk].t())
        v, i = pre.topk(k, dim=1, sorted=False)
        tops.append((v, i + start))
        dead = mask[start:start + chunk].nonzero().squeeze(1)
        if dead.numel():
            av, ai = pre.index_select(1, dead).topk(min(k_aux, dead.numel()), dim=1, sorted=False)
            auxes.append((av, dead[ai] + start))
    v = torch.cat([t[0] for t in tops], 1).topk(k, dim=1).values
    av = torch.cat([t[0] for t in auxes], 1).topk(k_aux, dim=1).values if auxes else None
    return v, av


def timed(f, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--k-aux", type=int, default=192, help="sae.k_aux (default d/2)")
    ap.add_argument("--chunk", type=int, default=8192, help="trainer.encoder_chunk")
    ap.add_argument("--dead", type=float, nargs="+", default=[0.0, 0.3, 0.9, 1.0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d)
    W = torch.randn(args.n, args.d) / args.d**0.5
    b = torch.randn(args.n) * 0.1
    print(f"B={args.batch} d={args.d} n={args.n} k={args.k} k_aux={args.k_aux} chunk={args.chunk} "
          f"threads={torch.get_num_threads()}")
    matmul = timed(lambda: [torch.addmm(b[s:s + args.chunk], x, W[s:s + args.chunk].t())
                            for s in range(0, args.n, args.chunk)], args.repeats)
    print(f"matmuls alone: {matmul:.3f} s")
    print("dead  baseline s  grouped s  ratio  matmul share (baseline -> grouped)")
    for frac in args.dead:
        mask = torch.rand(args.n, generator=torch.Generator().manual_seed(1)) < frac
        v, av, = baseline(x, W, b, args.k, args.chunk, mask, args.k_aux)
        got = reference._stream_topk(x, W, b, args.k, args.chunk, mask, args.k_aux, None)
        if not torch.equal(got[0], v) or (av is not None and not torch.equal(
                got[2].sort(dim=1, descending=True).values, av)):
            raise SystemExit(f"dead={frac}: the grouped selection differs from torch.topk")
        t0 = timed(lambda m=mask: baseline(x, W, b, args.k, args.chunk, m, args.k_aux), args.repeats)
        t1 = timed(lambda m=mask: reference._stream_topk(x, W, b, args.k, args.chunk, m, args.k_aux, None),
                   args.repeats)
        print(f"{frac:4.2f}  {t0:10.3f}  {t1:9.3f}  {t0 / t1:5.2f}x  {matmul / t0:.0%} -> {matmul / t1:.0%}")


if __name__ == "__main__":
    main()
