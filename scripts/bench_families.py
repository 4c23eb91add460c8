"""Every dictionary family on the same activations, each at L0 near a target: held-out FVU, L0, dead
fraction, and the reconstruction of the first m latents alone (Matryoshka's smallest prefix against
the same number of BatchTopK latents).

    sae-dist cache data.cache_dir=/tmp/acts trainer.total_tokens=1048576     # once: the default job's data
    python scripts/bench_families.py --cache /tmp/acts                       # all families, tuned
    python scripts/bench_families.py --cache /tmp/acts --families gated --coef 0.8 1.6

Top-k families hit L0 = k by construction. JumpReLU and gated reach it through a penalty, so their
coefficient is searched: geometric bisection from --coef until the held-out L0 is within --tolerance
of --target (each try is a whole run; the tries are printed). Each row prints the `sae-dist`
command that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time

import torch

log = logging.getLogger("bench_families")
PENALTY = {"jumprelu": "l0_coef", "gated": "l1_coef"}
START = {"jumprelu": (1e-3, 1e-2), "gated": (0.5, 4.0)}


def run(cache: str, family: str, overrides: list[str], out: str) -> dict:
    """One `sae-dist` job on the cache; its results.json plus the wall time."""
    cmd = ["sae-dist", f"sae={family}", "data=cache", f"data.cache_dir={cache}", "tracking=none",
           f"hydra.run.dir={out}", *overrides]
    log.info("%s", " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh) | {"wall_s": time.perf_counter() - t0, "command": " ".join(cmd[:1] + cmd[1:5] + cmd[6:])}


def tune(cache: str, family: str, lo: float, hi: float, args: argparse.Namespace) -> dict:
    """Searches the penalty coefficient until the held-out L0 is within tolerance of the target. L0
    falls as the coefficient grows, about as a power of it, so after the first two tries the next
    coefficient is the secant in log-log space through the two nearest; before that, the geometric
    midpoint of the bracket, then a step of the bracket's width."""
    tried: list[tuple[float, dict]] = []
    coef = math.sqrt(lo * hi)
    for i in range(args.tries):
        r = run(cache, family, [f"sae.{PENALTY[family]}={coef:.4g}", *args.extra], os.path.join(args.out, f"{family}-{i}"))
        log.info("%s %s=%.4g: L0 %.1f FVU %.4f", family, PENALTY[family], coef, r["l0"], r["fvu"])
        tried.append((coef, r))
        if abs(r["l0"] / args.target - 1) <= args.tolerance:
            break
        coef = _next_coef(tried, args.target, lo, hi)
    return min((r for _, r in tried), key=lambda r: abs(r["l0"] - args.target))


def _next_coef(tried: list[tuple[float, dict]], target: float, lo: float, hi: float) -> float:
    if len(tried) == 1:
        c, r = tried[0]
        return c * (hi / lo) ** (0.5 if r["l0"] > target else -0.5)
    (c1, r1), (c2, r2) = sorted(tried, key=lambda t: abs(math.log(t[1]["l0"] / target)))[:2]
    slope = (math.log(r2["l0"]) - math.log(r1["l0"])) / (math.log(c2) - math.log(c1))
    if not slope < 0:  # noise: fall back to halving the distance from the nearest
        return c1 * (2.0 if r1["l0"] > target else 0.5)
    return math.exp(math.log(c1) + (math.log(target) - math.log(r1["l0"])) / slope)


@torch.no_grad()
def prefix_fvu(run_dir: str, m: int, tokens: int) -> float:
    """Held-out FVU of the exported SAE's latents [0, m) alone (the others zeroed), b_dec kept."""
    from omegaconf import OmegaConf

    from sae_dist.config import to_config
    from sae_dist.data import heldout_batches
    from sae_dist.export import load_saelens

    sae, _ = load_saelens(os.path.join(run_dir, "sae"))
    raw = OmegaConf.load(os.path.join(run_dir, ".hydra", "config.yaml"))
    raw.output_dir = run_dir  # Hydra saved it as an interpolation
    cfg = to_config(raw)
    err = 0.0
    xs = []
    count = 0
    for x in heldout_batches(cfg):
        vals, idx = sae.encode_sparse(x)
        x_hat = sae.decode_sparse(vals * (idx < m), idx)
        err += float((x - x_hat).double().pow(2).sum())
        xs.append(x.double())
        count += x.shape[0]
        if count >= tokens:
            break
    x = torch.cat(xs)
    total = float((x - x.mean(0)).pow(2).sum())
    return err / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="activation cache folder (sae-dist cache ...)")
    ap.add_argument("--families", nargs="*", default=["topk", "batchtopk", "matryoshka", "jumprelu", "gated"])
    ap.add_argument("--target", type=float, default=32.0, help="L0 the penalty families are tuned to")
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--tries", type=int, default=6)
    ap.add_argument("--coef", type=float, nargs=2, help="penalty coefficient bracket (low high)")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    ap.add_argument("--out", default="/tmp/bench_families")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    rows = {}
    for family in args.families:
        if family in PENALTY:
            rows[family] = tune(args.cache, family, *(args.coef or START[family]), args)
        else:
            rows[family] = run(args.cache, family, args.extra, os.path.join(args.out, family))
        log.info("%s: %s", family, rows[family])
    print(f"\nheld-out metrics; CPU: {_cpu()}; load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| family | held-out FVU | L0 | dead | train s | command |")
    print("|---|---|---|---|---|---|")
    for family, r in rows.items():
        print(f"| {family} | {r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_fraction']:.2%} | {r['train_s']:.0f} | `{r['command']}` |")
    if "matryoshka" in rows and "batchtopk" in rows:
        mat_dir = os.path.join(args.out, "matryoshka")
        with open(os.path.join(mat_dir, "sae", "cfg.json")) as fh:
            m = json.load(fh)["matryoshka_prefixes"][0]
        tokens = int(rows["matryoshka"]["tokens"])
        a, b = prefix_fvu(mat_dir, m, tokens), prefix_fvu(os.path.join(args.out, "batchtopk"), m, tokens)
        print(f"\nfirst {m} latents alone, held-out FVU: matryoshka {a:.4f}, batchtopk {b:.4f}")


def _cpu() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    flags = next((set(ln.split(":", 1)[1].split()) for ln in open("/proc/cpuinfo") if ln.startswith("flags")), set())
    return f"{model} ({', '.join(sorted(flags & {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'})) or 'no AVX2'})"


if __name__ == "__main__":
    main()
