"""The cost of `sae-dist eval` with SAEBench's core set against the eval that came before it.

    python scripts/bench_eval.py                                   # n = 262144, 3 repeats
    python scripts/bench_eval.py --n 6144 --repeats 5
    python scripts/bench_eval.py --baseline-rev f404e0c            # the eval before the core set

Writes one MiniLM layer-3 TopK SAE export of n latents (random weights: the cost does not depend on
training) into a temporary run folder, then times, each `--repeats` times, as whole commands:
  baseline   `sae-dist eval` of git revision --baseline-rev (checked out in a temporary worktree), with
             its defaults then (32768 tokens, 16 contexts per LM batch; reconstruction metrics from a
             second encode of the captured activations)
  core       today's `sae-dist eval` with its defaults: the run's held-out set (every held-out token of
             the default corpus, 50,300, at 64 contexts per batch), SAEBench's core metrics in the same
             pass, and the max-cosine weight metrics (a 16384-latent sample above 16384 latents)
  core@32k   the same on 32768 tokens and 16 contexts per batch, the baseline's own reading
Prints the medians, the ratios to the baseline and each command's peak RSS, and the same as JSON. Name
the CPU with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from sae_dist.config import sae_config
from sae_dist.export import export_saelens
from sae_dist.sae import SparseAutoencoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(folder: str, n: int, k: int) -> str:
    sae = SparseAutoencoder(sae_config(n_latents=n, k=k), 384, generator=torch.Generator().manual_seed(0))
    export_saelens(sae, 1.0, os.path.join(folder, "sae"), {"hook_name": "encoder.layer.3", "model_name": "minilm",
                                                          "context_size": 128})
    return folder


def baseline_tree(rev: str, where: str) -> str:
    """A worktree of `rev` importable as sae_dist (its kernels/ folder linked in as sae_dist.kernels)."""
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", where, rev], check=True, capture_output=True)
    os.symlink(os.path.join(where, "kernels"), os.path.join(where, "sae_dist", "kernels"))
    return where


PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")
"""Runs the command as this wrapper's only child, so the children's peak RSS is the command's."""


def timed(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one run of the command, started in `cwd` (`python -m` imports from
    there first, so the baseline runs from its worktree and the others from outside this checkout)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    kb = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return seconds, kb / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=262144)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-rev", default="f404e0c")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = write_run(os.path.join(tmp, "run"), a.n, a.k)
        tree = baseline_tree(a.baseline_rev, os.path.join(tmp, "baseline"))
        try:
            env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
            old_env = env | {"PYTHONPATH": tree}
            variants = {
                "baseline": ([sys.executable, "-m", "sae_dist", "eval", run, "--out", os.path.join(tmp, "e0")], old_env,
                             tree),
                "core": ([sys.executable, "-m", "sae_dist", "eval", run, "--out", os.path.join(tmp, "e1")], env, tmp),
                "core@32k": ([sys.executable, "-m", "sae_dist", "eval", run, "--tokens", "32768", "--batch-contexts",
                              "16", "--out", os.path.join(tmp, "e2")], env, tmp),
            }
            seconds: dict[str, list[float]] = {name: [] for name in variants}
            peak: dict[str, float] = dict.fromkeys(variants, 0.0)
            for _ in range(a.repeats):  # interleaved, so drift in the machine's load hits every variant
                for name, (cmd, e, cwd) in variants.items():
                    s, gb = timed(cmd, e, cwd)
                    seconds[name].append(s)
                    peak[name] = max(peak[name], gb)
            tokens = {name: json.load(open(os.path.join(tmp, d, "metrics.json")))["tokens"]
                      for name, d in (("baseline", "e0"), ("core", "e1"), ("core@32k", "e2"))}
            if os.path.exists(os.path.join(tmp, "e0", "core.json")):
                raise RuntimeError(f"the baseline wrote core.json: it ran this checkout's code, not {a.baseline_rev}'s")
        finally:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree], capture_output=True)
    base = statistics.median(seconds["baseline"])
    print(f"sae-dist eval, MiniLM layer 3, TopK n={a.n} k={a.k}, median of {a.repeats} (seconds, whole command)")
    print(f"{'variant':<10} {'tokens':>7} {'median s':>9} {'x baseline':>11} {'peak RSS GB':>12}")
    out = {"n": a.n, "k": a.k, "repeats": a.repeats, "baseline_rev": a.baseline_rev, "variants": {}}
    for name, times in seconds.items():
        med = statistics.median(times)
        print(f"{name:<10} {int(tokens[name]):>7} {med:>9.1f} {med / base:>11.2f} {peak[name]:>12.2f}")
        out["variants"][name] = {"tokens": tokens[name], "seconds": times, "median_s": med, "ratio": med / base,
                                 "peak_rss_gb": peak[name]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
