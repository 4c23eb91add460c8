"""Quality per token: held-out FVU, L0, dead fraction and training tokens/s of the default settings at
several batch sizes and dictionary sizes, all on one activation cache and one token budget; with
`--peer sparsify`, EleutherAI's sparsify (its own defaults, its own trainer) on the same activations,
side by side.

    sae-dist cache data.cache_dir=/tmp/acts trainer.total_tokens=1048576     # once: the default job's data
    python scripts/bench_quality.py --cache /tmp/acts                        # batch 1024/4096/16384 x n 6144/49152
    bash scripts/peer_sparsify_venv.sh                                       # once: sparsify in .venv-sparsify
    python scripts/bench_quality.py --cache /tmp/acts --peer sparsify --batches 4096 16384
    python scripts/bench_quality.py --cache /tmp/acts --extra trainer.optimizer=signum_sf   # another setting

Every setting is a whole `sae-dist data=cache` job (held-out figures from its results.json, the end of
training's evaluation of the export); the peer runs `scripts/peer_sparsify.py` in its own venv
(`--peer-python`, default .venv-sparsify/bin/python) on the cache's train and held-out folders, with the
same token budget, batch and width, and scores the same held-out tokens with the same formulas. Rows
print the command that reproduces them. Seconds are wall time of the training loop on this machine,
which the peer and this project measure alike (activations read from the same files).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time

import torch
from bench_families import _cpu  # this folder is on sys.path when a script runs

log = logging.getLogger("bench_quality")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ours(cache: str, n: int, batch: int, tokens: int, extra: list[str], out: str) -> dict:
    """One `sae-dist` job on the cache; its results.json plus the command."""
    cmd = ["sae-dist", "data=cache", f"data.cache_dir={cache}", f"sae.n_latents={n}",
           f"trainer.batch_tokens={batch}", f"trainer.total_tokens={tokens}", *extra, "tracking=none",
           f"hydra.run.dir={out}"]
    log.info("%s", " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "results.json")) as fh:
        r = json.load(fh)
    return r | {"wall_s": time.perf_counter() - t0, "tokens_per_s": r["train_tokens_per_s"],
                "command": " ".join(cmd[:-2])}


def row_order(cache: str, batch: int, tokens: int, seed: int = 0, shuffle_buffer_tokens: int | None = None
              ) -> torch.Tensor:
    """The cache rows a `sae-dist data=cache trainer.seed=SEED` job trains on, in its order: this
    project's own BatchStream (shuffle buffer, seed, cycling) over a source whose "activations" are row
    numbers. `shuffle_buffer_tokens`: data.shuffle_buffer_tokens when the job overrides it."""
    from sae_dist.config import DataConfig
    from sae_dist.data import BatchStream
    from sae_dist.data.cache import CachedSource

    class Rows:
        """The cache's chunk sizes, each chunk its row numbers as a (t, 1) float64 column (exact)."""

        def __init__(self) -> None:
            self.sizes = [int(s["tokens"]) for s in CachedSource(os.path.join(cache, "train")).index["shards"]]
            self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]

        def chunks(self, start: int = 0):
            pos = start
            while True:
                i = pos % len(self.sizes)
                pos += 1
                yield torch.arange(self.starts[i], self.starts[i] + self.sizes[i], dtype=torch.float64)[:, None], pos

    buffer = DataConfig().shuffle_buffer_tokens if shuffle_buffer_tokens is None else shuffle_buffer_tokens
    stream = BatchStream(Rows(), batch, buffer, seed)
    steps = tokens // batch
    return torch.cat([b[:, 0] for _, b in zip(range(steps), stream)]).long()


def peer(python: str, cache: str, n: int, k: int, batch: int, tokens: int, eval_tokens: int, out: str,
         seed: int = 0) -> dict:
    """sparsify on the same cache rows in the same order, through scripts/peer_sparsify.py in its venv;
    `seed` is sparsify's init seed and the row order of `sae-dist ... trainer.seed=SEED`."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    result, order = os.path.join(out, "peer.json"), os.path.join(out, "order.safetensors")
    save_file({"rows": row_order(cache, batch, tokens, seed)}, order)
    cmd = [python, os.path.join(ROOT, "scripts", "peer_sparsify.py"), "--train", os.path.join(cache, "train"),
           "--heldout", os.path.join(cache, "heldout"), "--n-latents", str(n), "--k", str(k),
           "--batch-tokens", str(batch), "--tokens", str(tokens), "--eval-tokens", str(eval_tokens),
           "--seed", str(seed), "--order", order, "--out", result]
    log.info("%s", " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(result) as fh:
        r = json.load(fh)
    return r["heldout"] | {"tokens_per_s": r["train_tokens_per_s"], "lr": r["sparsify_defaults"].get("lr"),
                           "command": " ".join(["scripts/peer_sparsify.py", *cmd[2:-2]])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="activation cache folder with train/ and heldout/")
    ap.add_argument("--batches", type=int, nargs="*", default=[1024, 4096, 16384], help="tokens per step")
    ap.add_argument("--n-latents", type=int, nargs="*", default=[6144, 49152])
    ap.add_argument("--tokens", type=int, default=1_048_576, help="training tokens of every setting")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--skip", nargs="*", default=["1024x49152"], help="BATCHxN settings left out")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every sae-dist run")
    ap.add_argument("--peer", choices=["sparsify"], help="also train the peer on the same data")
    ap.add_argument("--peer-python", default=os.path.join(ROOT, ".venv-sparsify", "bin", "python"))
    ap.add_argument("--seeds", type=int, nargs="*", default=[0],
                    help="trainer.seed of each run (init and row order; the peer gets the same rows and seed)")
    ap.add_argument("--out", default="/tmp/bench_quality")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if not os.path.isdir(os.path.join(args.cache, "train")) or not os.path.isdir(os.path.join(args.cache, "heldout")):
        sys.exit(f"--cache {args.cache} has no train/ and heldout/ folders; fill one with "
                 f"`sae-dist cache data.cache_dir={args.cache} trainer.total_tokens={args.tokens}`")
    if args.peer and not os.path.exists(args.peer_python):
        sys.exit(f"--peer-python {args.peer_python} does not exist; build it with `bash scripts/peer_sparsify_venv.sh`")
    rows = []
    for n in args.n_latents:
        for batch in args.batches:
            if f"{batch}x{n}" in args.skip:
                continue
            for seed in args.seeds:
                tag = f"b{batch}_n{n}" + (f"_s{seed}" if seed else "")
                extra = [f"sae.k={args.k}", *([f"trainer.seed={seed}"] if seed else []), *args.extra]
                row = {"n": n, "batch": batch, "seed": seed,
                       "ours": ours(args.cache, n, batch, args.tokens, extra, os.path.join(args.out, tag, "ours"))}
                if args.peer:
                    row["peer"] = peer(args.peer_python, args.cache, n, args.k, batch, args.tokens,
                                       int(row["ours"]["tokens"]), os.path.join(args.out, tag, "peer"), seed)
                log.info("%s: %s", tag, json.dumps(row))
                rows.append(row)
                with open(os.path.join(args.out, "rows.json"), "w") as fh:
                    json.dump(rows, fh, indent=1)
    print(f"\nheld-out metrics, {args.tokens} training tokens; CPU: {_cpu()}; "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    head = "| n | batch | seed | FVU | L0 | dead | tokens/s |"
    if args.peer:
        head += f" {args.peer} FVU | L0 | dead | tokens/s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in rows:
        peer_cells = f" {cells(row['peer'])}" if "peer" in row else ""
        print(f"| {row['n']} | {row['batch']} | {row['seed']} | {cells(row['ours'])}{peer_cells}")
    if len(args.seeds) > 1:
        for n, batch in sorted({(r["n"], r["batch"]) for r in rows}):
            group = [r for r in rows if (r["n"], r["batch"]) == (n, batch)]
            line = f"| {n} | {batch} | mean of {len(group)} | {cells(mean_of([r['ours'] for r in group]))}"
            if args.peer:
                line += f" {cells(mean_of([r['peer'] for r in group]))}"
            print(line)
    print("\ncommands:")
    for row in rows:
        print(f"- `{row['ours']['command']}`" + (f"; peer: `{row['peer']['command']}`" if "peer" in row else ""))


def mean_of(results: list[dict]) -> dict:
    """The seeds' mean of each metric the table prints."""
    return {key: statistics.mean(r[key] for r in results) for key in ("fvu", "l0", "dead_fraction", "tokens_per_s")}


def cells(r: dict) -> str:
    """One side's table cells: FVU, L0, dead, tokens/s."""
    return f"{r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_fraction']:.2%} | {r['tokens_per_s']:.0f} |"


if __name__ == "__main__":
    main()
