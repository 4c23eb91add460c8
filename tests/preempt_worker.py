"""The tiny synthetic job for test_preemption.py, as the ranks of a real job: one process, or one of
several ranks of a gloo group (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set by the test). Rank 0 prints
"STEP <n>" after every step, so the test can send its signal while the job trains.

    python tests/preempt_worker.py OUT [--fp 2] [--steps 200] [--resume] [--stall-upload-at N]

--term-at N          the process sends itself SIGTERM right after step N
--stall-preempt-save the preemption checkpoint's upload hangs after its first file (prints "STALLED")
--slow-preempt-save  the preemption checkpoint's first file takes longer than the grace period
--stall-upload-at N  the upload of step N's checkpoint stalls after its first file (prints "STALLED"),
                     as on slow storage, so a signal lands in the middle of an upload
On a clean finish rank 0 writes OUT/history.json; on a preemption each rank writes
OUT/preempted-rank<r>.json ({"history": rank 0's losses, "step", "checkpoint"}) and exits with the
status the CLI uses.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from conftest import synthetic_config  # noqa: E402

from sae_dist.checkpoint import step_name  # noqa: E402
from sae_dist.preempt import PREEMPTED_EXIT, PreemptedError  # noqa: E402
from sae_dist.run import train  # noqa: E402
from sae_dist.storage import Storage, StorageError  # noqa: E402
from sae_dist.tracking import NullTracker  # noqa: E402


class PrintSteps(NullTracker):
    """Rank 0's tracker: prints each step and keeps its loss (log_every=1: the step's own loss)."""

    def __init__(self, term_at: int = 0) -> None:
        self.losses: list[float] = []
        self.term_at = term_at

    def log_metrics(self, metrics, step):  # type: ignore[no-untyped-def]
        if "train/loss" in metrics:
            self.losses.append(metrics["train/loss"])
            print(f"STEP {step}", flush=True)
            if step == self.term_at:  # a real signal to this process, at a known step
                os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--fp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stall-upload-at", type=int, default=0)
    ap.add_argument("--grace", type=float, default=25.0)
    ap.add_argument("--term-at", type=int, default=0)
    ap.add_argument("--stall-preempt-save", action="store_true")
    ap.add_argument("--slow-preempt-save", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.stall_upload_at:
        put, target, release = Storage.put, f"/{step_name(args.stall_upload_at)}/", threading.Event()

        def stalling_put(self, path, data, deadline):  # type: ignore[no-untyped-def]
            put(self, path, data, deadline)
            if target in path and not release.is_set():
                print("STALLED", flush=True)
                release.wait(3.0)  # slow storage: the upload resumes after 3 s

        Storage.put = stalling_put  # type: ignore[method-assign]
    if args.stall_preempt_save:  # periodic saves upload on a thread; the preemption save on the main one
        put_once = Storage.put

        def stuck_put(self, path, data, deadline):  # type: ignore[no-untyped-def]
            put_once(self, path, data, deadline)
            if "/step-" in path and threading.current_thread() is threading.main_thread():
                print("STALLED", flush=True)
                threading.Event().wait()

        Storage.put = stuck_put  # type: ignore[method-assign]
    if args.slow_preempt_save:  # as a million-latent shard on slow storage: the grace runs out mid-save
        put_slowly = Storage.put

        def slow_put(self, path, data, deadline):  # type: ignore[no-untyped-def]
            if "/step-" in path and threading.current_thread() is threading.main_thread():
                time.sleep(max(0.0, deadline - time.monotonic()) + 0.5)  # local files are never late: say so
                raise StorageError(f"write {path}: gave up at the deadline (checkpoint.preempt_grace_s)")
            put_slowly(self, path, data, deadline)

        Storage.put = slow_put  # type: ignore[method-assign]
    cfg = synthetic_config(
        args.out,
        checkpoint={"every_steps": 10, "keep_last": 50, "resume_from": "latest" if args.resume else "",
                    "preempt_grace_s": args.grace},
        trainer={"log_every": 1, "total_tokens": 256 * args.steps},
        parallel={"fp": args.fp},
    )
    rank = int(os.environ.get("RANK", "0"))
    tracker = PrintSteps(args.term_at)
    try:
        results = train(cfg, tracker)
    except PreemptedError as err:
        history = tracker.losses
        with open(os.path.join(args.out, f"preempted-rank{rank}.json"), "w") as fh:
            json.dump({"history": history, "step": err.step, "checkpoint": err.checkpoint}, fh)
        sys.exit(PREEMPTED_EXIT)
    if rank == 0:
        with open(os.path.join(args.out, "history.json"), "w") as fh:
            json.dump({"history": results["history"], "steps": results["steps"]}, fh)


if __name__ == "__main__":
    main()
