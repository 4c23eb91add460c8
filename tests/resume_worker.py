"""Runs the tiny synthetic job in its own process for test_resume.py; with --kill-at N the process
SIGKILLs itself right after logging step N (a real, abrupt death: no exception handlers, no flush)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))

from conftest import synthetic_config  # noqa: E402

from sae_dist.run import train  # noqa: E402
from sae_dist.tracking import NullTracker  # noqa: E402


class KillAt(NullTracker):
    def __init__(self, step: int) -> None:
        self.step = step

    def log_metrics(self, metrics, step):  # type: ignore[no-untyped-def]
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    cfg = synthetic_config(
        args.out,
        # synchronous saves: the kill at step 25 must find step 20 complete whatever the machine load
        checkpoint={"every_steps": 10, "resume_from": "latest" if args.resume else "", "async_upload": False},
        trainer={"log_every": 1},
    )
    results = train(cfg, KillAt(args.kill_at) if args.kill_at else None)
    with open(os.path.join(args.out, "history.json"), "w") as fh:
        json.dump({"history": results["history"], "steps": results["steps"], "fvu": results["fvu"]}, fh)
