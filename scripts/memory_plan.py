"""Per-rank memory of a feature-parallel SAE: weights, gradients, optimizer state and buffers.

    python scripts/memory_plan.py --d 4096 --n 16777216 --gpus 8 16 32        # every layout, what fits
    python scripts/memory_plan.py --d 768 --n 65536 --dp 2 --fp 2 --dtype fp32 # one layout
    python scripts/memory_plan.py --d 4096 --n 16777216 --gpus 32 --markdown   # the tables in docs/memory.md
    python scripts/memory_plan.py --cpu --d 384 --n 262144 1048576 --fp 1 2 4 --batch 4096  # CPU peak per rank

The model (docs/memory.md explains each term): a rank holds n/fp latents, i.e. P = n/fp * (2d + 1) + d
parameters (W_enc and W_dec rows, b_enc, the replicated b_dec). Gradients are dense like the weights
(Adam updates every row). Adam keeps two fp32 moments; bf16 weights add an fp32 master copy, and so does
DeepSpeed at any dtype. ZeRO-1 divides optimizer state (and master) by dp, ZeRO-2 also gradients;
offload moves optimizer state and master to host memory.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from sae_dist.optim import ADAM_CHUNK

GB = 1e9
BYTES = {"fp32": 4, "bf16": 2}


@dataclass
class Plan:
    dp: int
    fp: int
    engine: str
    dtype: str
    offload: bool
    weights: float
    grads: float
    optimizer: float
    buffers: float
    host: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.buffers


def plan(d: int, n: int, dp: int, fp: int, dtype: str = "fp32", engine: str = "torch", zero_stage: int = 1,
         offload: bool = False, batch: int = 8192, k: int = 32, k_aux: int = 0, chunk: int = 8192,
         bucket: float = 5e7, dead: float = 1.0) -> Plan:
    """Bytes per rank. `batch` tokens per replica, `chunk` latents per encoder block, `bucket` elements
    per ZeRO reduce/all-gather bucket, `dead` the largest fraction of a block's latents that AuxK
    reads (their columns of the block are copied out; 1 plans for the worst case)."""
    if n % fp:
        raise ValueError(f"fp ({fp}) must divide n ({n})")
    k_aux = k_aux or d // 2
    w = BYTES[dtype]
    n_local = n // fp
    params = n_local * (2 * d + 1) + d
    zero = engine == "deepspeed"
    weights = params * w
    grads = params * w / (dp if zero and zero_stage == 2 else 1)
    master = params * 4 if (dtype != "fp32" or zero) else 0  # DeepSpeed always keeps an fp32 master
    state = params * 8 + master  # Adam exp_avg + exp_avg_sq in fp32
    if zero:
        state /= dp
    host = state if offload else 0.0
    optimizer = 0.0 if offload else state
    buffers = (
        batch * d * 4 * 6  # x, x - b_dec, x_hat, residual, AuxK decode, input gradient
        # one encoder block's pre-activations + its dead columns (a mostly-dead block copies none; its
        # bool mask of entries above the running floors, a quarter of the block, fits in that allowance)
        + batch * min(chunk, n_local) * 4 * (1 + dead)
        + batch * (k + k_aux) * 12 * (fp + 1)  # candidates (value + int32 id) and their all-gather
        + (2 * bucket * w if zero else 0)  # ZeRO reduce and all-gather buckets
    )
    return Plan(dp, fp, engine, dtype, offload, weights, grads, optimizer, buffers, host)


def cpu_peak(d: int, n: int, fp: int, batch: int = 4096, k: int = 32, k_aux: int = 0, chunk: int = 8192,
             dead: float = 1.0) -> dict[str, float]:
    """Peak bytes per rank of fp32 training with Adam on the torch engine on CPU, above the process's
    runtime (torch, gloo: measured, not modelled). Weights and Adam's moments are held throughout, on
    top of the largest of:

    - the forward's buffers (`plan`'s, with `dead` the largest fraction of latents AuxK reads); the
      gradients are freed once applied, so none are held here;
    - the backward: the gradients, and while AuxK acts (`dead` > 0) a second decoder-sized one: TopK
      decodes its reconstruction and AuxK's latents separately, and autograd holds the second decode's
      (n / fp, d) gradient until it has added it into the first. (The decoder's gradient itself is
      formed in place: `kernels.reference.scatter_rows`; torch.sparse.mm would hold a zeroed copy
      beside it.) A CLT decodes both in one call and has no such term (archs/clt.py);
    - the update: the gradients, and Adam's one temporary: the project's Adam (`optim.ChunkedAdam`,
      torch's update bit for bit) forms sqrt(v) / c for one slice of `ADAM_CHUNK` elements at a time
      into a reused buffer. (torch's own Adam on CPU forms it for a whole parameter, twice over, while
      still holding the previous parameter's: 3 x the largest parameter, which this model counted, and
      the measurements matched, before ChunkedAdam.)

    -> the terms (`transient`: the larger of the backward's and the update's temporaries) and `peak`."""
    p = plan(d, n, 1, fp, "fp32", "torch", batch=batch, k=k, k_aux=k_aux, chunk=chunk, dead=dead)
    backward = (n // fp) * d * 4 if dead > 0 else 0
    update = min((n // fp) * d, ADAM_CHUNK) * 4
    transient = max(backward, update)
    peak = p.weights + p.optimizer + max(p.buffers, p.grads + transient)
    return {"weights": p.weights, "grads": p.grads, "optimizer": p.optimizer, "buffers": p.buffers,
            "transient": transient, "peak": peak}


def layouts(gpus: int, n: int) -> list[tuple[int, int]]:
    return [(gpus // fp, fp) for fp in range(1, gpus + 1) if gpus % fp == 0 and n % fp == 0]


def _row(p: Plan, gpu_gb: float, markdown: bool) -> str:
    fits = "yes" if p.total <= 0.9 * gpu_gb * GB else "no"
    cells = [f"{p.dp}x{p.fp}", p.engine, p.dtype, "yes" if p.offload else "no",
             *(f"{v / GB:.1f}" for v in (p.weights, p.grads, p.optimizer, p.buffers, p.total, p.host)), fits]
    return "| " + " | ".join(cells) + " |" if markdown else "  ".join(f"{c:>9}" for c in cells)


HEADER = ["dp x fp", "engine", "dtype", "offload", "weights", "grads", "optim", "buffers", "total GB",
          "host GB", "fits"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=4096, help="d_model")
    ap.add_argument("--n", type=int, nargs="+", default=[2**24], help="n_latents (several only with --cpu)")
    ap.add_argument("--gpus", type=int, nargs="*", default=[], help="enumerate every dp x fp layout of these")
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--fp", type=int, nargs="+", default=[1], help="feature shards (several only with --cpu)")
    ap.add_argument("--cpu", action="store_true",
                    help="peak bytes per rank of fp32 Adam training on CPU (cpu_peak), runtime excluded")
    ap.add_argument("--dtype", choices=sorted(BYTES), default=None, help="default: both")
    ap.add_argument("--batch", type=int, default=8192, help="tokens per replica per step")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="accelerator memory; 90%% of it is usable")
    ap.add_argument("--all", action="store_true", help="with --gpus: also the layouts that do not fit")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.cpu:
        print(f"CPU, fp32 Adam, d={args.d}, batch={args.batch}, k={args.k}: GB per rank above the runtime")
        print("| n | fp | weights | grads | Adam | buffers | update transient | peak |\n|---|---|---|---|---|---|---|---|")
        for n in args.n:
            for fp in args.fp:
                t = cpu_peak(args.d, n, fp, args.batch, args.k)
                print(f"| {n} | {fp} | " + " | ".join(f"{t[c] / GB:.3f}" for c in
                      ("weights", "grads", "optimizer", "buffers", "transient", "peak")) + " |")
        return
    if len(args.n) > 1 or len(args.fp) > 1:
        ap.error("several --n or --fp values need --cpu; the GPU tables take one n (and --gpus for layouts)")
    args.n, args.fp = args.n[0], args.fp[0]
    dtypes = [args.dtype] if args.dtype else ["fp32", "bf16"]
    options = [("torch", 1, False), ("deepspeed", 2, False), ("deepspeed", 2, True)]
    sep = "|" + "---|" * len(HEADER)
    for gpus in args.gpus or [args.dp * args.fp]:
        grid = layouts(gpus, args.n) if args.gpus else [(args.dp, args.fp)]
        plans = [plan(args.d, args.n, dp, fp, dt, eng, st, off, args.batch, args.k)
                 for dp, fp in grid for dt in dtypes for eng, st, off in options
                 if not (dt == "bf16" and eng == "torch")]  # bf16 weights train under DeepSpeed (fp32 masters)
        shown = [p for p in plans if args.all or not args.gpus or p.total <= 0.9 * args.gpu_gb * GB]
        print(f"\n{gpus} GPU(s) of {args.gpu_gb:.0f} GB, d={args.d}, n={args.n}, batch={args.batch}: "
              f"{len(shown)} of {len(plans)} layouts shown" + ("" if args.all or not args.gpus else " (those that fit)"))
        print("| " + " | ".join(HEADER) + " |\n" + sep if args.markdown else "  ".join(f"{h:>9}" for h in HEADER))
        for p in shown:
            print(_row(p, args.gpu_gb, args.markdown))


if __name__ == "__main__":
    main()
