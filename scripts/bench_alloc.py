"""Whole training jobs with torch's CPU tensors on transparent huge pages (THP_MEM_ALLOC_ENABLE=1, what
`import sae_dist` sets) against 4 KB pages (THP_MEM_ALLOC_ENABLE=0), in the same run.

    python scripts/bench_alloc.py                                     # a short CLT default job, 3 repeats
    python scripts/bench_alloc.py --repeats 5 -- sae=topk trainer.total_tokens=262144

Each repeat runs the job once per setting, the settings alternating so that drift on the machine falls
on both; prints per setting the median wall seconds, peak RSS and minor page faults (the job's own
rusage, from wait4), and the ratio of the medians. Tensors over glibc's mmap threshold (32 MiB) get
fresh pages each time they are allocated: the decoder's gradient every step, the LM's buffers, the
shuffle buffer's blocks. With 4 KB pages each such tensor costs one fault per page.
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

DEFAULT_JOB = ["sae=clt", "trainer.total_tokens=131072", "trainer.eval_tokens=8192", "tracking=none"]


def run_job(job: list[str], thp: str, run_dir: str) -> dict[str, float]:
    """One job with THP_MEM_ALLOC_ENABLE=thp: wall seconds, minor faults, peak RSS (its own rusage)."""
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE=thp)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "stdout"), "w+") as out, open(os.path.join(run_dir, "stderr"), "w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "sae_dist", *job, f"hydra.run.dir={run_dir}"], env=env,
                                stdout=out, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"bench_alloc: the job failed (THP_MEM_ALLOC_ENABLE={thp}):\n{err.read()[-3000:]}")
        out.seek(0)
        summary = json.loads(out.read().strip().splitlines()[-1])
    return {"wall_s": wall, "minor_faults": ru.ru_minflt, "peak_rss_gb": ru.ru_maxrss / 1e6, "fvu": summary["fvu"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("job", nargs="*", help="the job's overrides (after --); default: a 128-step CLT job")
    a = p.parse_args()
    if a.repeats < 1:
        raise SystemExit(f"bench_alloc: --repeats ({a.repeats}) must be >= 1")
    job = a.job or DEFAULT_JOB
    settings = {"huge pages (THP_MEM_ALLOC_ENABLE=1)": "1", "4 KB pages (THP_MEM_ALLOC_ENABLE=0)": "0"}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for name, value in settings.items():
                res = run_job(job, value, os.path.join(tmp, f"{value}-{r}"))
                rows[name].append(res)
                print(f"repeat {r}: {name}: {res['wall_s']:.1f} s, {res['minor_faults'] / 1e6:.2f} M faults, "
                      f"peak RSS {res['peak_rss_gb']:.2f} GB, FVU {res['fvu']:.4f}", flush=True)
    print(f"job: sae-dist {' '.join(job)}")
    medians = {name: statistics.median(x["wall_s"] for x in v) for name, v in rows.items()}
    for name, v in rows.items():
        print(f"{name}: median {medians[name]:.1f} s over {len(v)}, minor faults "
              f"{statistics.median(x['minor_faults'] for x in v) / 1e6:.2f} M, peak RSS "
              f"{statistics.median(x['peak_rss_gb'] for x in v):.2f} GB")
    on, off = medians.values()
    print(f"4 KB pages / huge pages: {off / on:.3f}x the wall time")


if __name__ == "__main__":
    main()
