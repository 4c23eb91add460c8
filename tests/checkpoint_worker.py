"""The tiny synthetic job against a checkpoint URL, for test_checkpoint_s3.py: `run_job` in the test's
own process, or jobs in a fresh process (or several under torchrun):

    python tests/checkpoint_worker.py '[{"out": OUT, "url": URL, "stop_after": 20}]' [--hang-upload-at N]
    python -m torch.distributed.run --nproc-per-node 2 tests/checkpoint_worker.py '[{..., "fp": 2}]'

stop_after N        every rank waits until the step-N checkpoint is complete, then the job ends: a stop
                    between two steps, as after a preemption notice
with_probe          writes reconstructions of a fixed probe batch at stop_after and right after a resume's
                    load (OUT/recon-saved.safetensors, OUT/recon-loaded.safetensors)
--hang-upload-at N  the upload of step N stalls after its first file and prints "STALLED"; the test then
                    SIGKILLs the process in the middle of that upload
--fail-upload-at N  on rank --fail-rank (default 1), every write of step N fails, as a PUT that ran out
                    of retries (StorageError)
Rank 0 writes OUT/history.json ({"history", "steps"}) when a job trains to the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from unittest import mock

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from conftest import synthetic_config  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import sae_dist.lifecycle  # noqa: E402
import sae_dist.run  # noqa: E402
from sae_dist.checkpoint import Checkpointer, step_name  # noqa: E402
from sae_dist.data.synthetic import SyntheticSource  # noqa: E402
from sae_dist.storage import Storage, StorageError  # noqa: E402


class Stopped(Exception):
    pass


def probe(trainer, path: str, rank: int) -> None:
    x = SyntheticSource(32, 128, 3, seed=99).chunk(0)[:64] * trainer.state.scale
    with torch.no_grad():
        x_hat = trainer.sae.decode_sparse(*trainer.sae.encode_sparse(x))  # collectives: every rank calls this
    if rank == 0:
        save_file({"x_hat": x_hat.contiguous()}, path)


def run_job(out: str, url: str, fp: int = 1, dp: int = 1, stop_after: int = 0, resume_from: str = "",
            with_probe: bool = False, engine: str = "torch", zero_stage: int = 1, param_dtype: str = "fp32",
            sae: dict | None = None, sites: int = 0, lazy_rows: str = "auto", **checkpoint: object) -> dict | None:
    """The tiny synthetic job (40 steps, a checkpoint every 10) with checkpoints under `url`; returns
    train()'s results, or None when it stopped after `stop_after`. `sae` and `sites`: another family
    (sae fields) on synthetic data of that many sites per token; `lazy_rows` the torch engine's."""

    class TestCheckpointer(Checkpointer):
        def save(self, trainer):  # type: ignore[no-untyped-def]
            out_dir = super().save(trainer)
            if trainer.state.step == stop_after:
                self.close()
                if with_probe:
                    probe(trainer, os.path.join(out, "recon-saved.safetensors"), self.rank)
                raise Stopped
            return out_dir

        def load(self, trainer, step_dir):  # type: ignore[no-untyped-def]
            super().load(trainer, step_dir)
            if with_probe:
                probe(trainer, os.path.join(out, "recon-loaded.safetensors"), self.rank)

    cfg = synthetic_config(
        out,
        checkpoint={"url": url, "every_steps": 10, "keep_last": 5, "resume_from": resume_from,
                    "retry_initial_s": 0.2, "op_timeout_s": 20.0, "when_busy": "wait", **checkpoint},
        trainer={"log_every": 1, "total_tokens": 256 * 40 * dp, "param_dtype": param_dtype, "lazy_rows": lazy_rows},
        parallel={"fp": fp, "dp": dp, "engine": engine, "zero_stage": zero_stage},
        tracking={"enabled": False},
        **({"sae": sae} if sae else {}),
        **({"data": {"synthetic_sites": sites}} if sites else {}),
    )
    with mock.patch.object(sae_dist.lifecycle, "Checkpointer", TestCheckpointer):
        try:
            return sae_dist.run.train(cfg)
        except Stopped:
            return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("jobs", help="JSON list of run_job keyword arguments, run one after the other")
    ap.add_argument("--hang-upload-at", type=int, default=0)
    ap.add_argument("--fail-upload-at", type=int, default=0)
    ap.add_argument("--fail-rank", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.hang_upload_at:
        put, target = Storage.put, f"/{step_name(args.hang_upload_at)}/"

        def stalling_put(self, path, data, deadline):  # type: ignore[no-untyped-def]
            put(self, path, data, deadline)
            if target in path:
                print("STALLED", flush=True)
                threading.Event().wait()

        Storage.put = stalling_put  # type: ignore[method-assign]
    if args.fail_upload_at and int(os.environ.get("RANK", "0")) == args.fail_rank:
        put, target = Storage.put, f"/{step_name(args.fail_upload_at)}/"

        def failing_put(self, path, data, deadline):  # type: ignore[no-untyped-def]
            if target in path:
                raise StorageError(f"write {path} failed (injected by --fail-upload-at)")
            put(self, path, data, deadline)

        Storage.put = failing_put  # type: ignore[method-assign]
    for job in json.loads(args.jobs):
        results = run_job(**job)
        if results is not None and int(os.environ.get("RANK", "0")) == 0:
            with open(os.path.join(job["out"], "history.json"), "w") as fh:
                json.dump({"history": results["history"], "steps": results["steps"]}, fh)
    if torch.distributed.is_initialized():
        # torchrun's group outlives the jobs; left to the interpreter's exit, gloo's teardown can race its
        # own threads and abort a rank ("terminate called without an active exception") under load
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
