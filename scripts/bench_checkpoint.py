"""How long a checkpoint keeps training waiting (the host copy) against how long its upload takes.

    python scripts/bench_checkpoint.py                       # starts a local moto S3 server
    python scripts/bench_checkpoint.py --url file:///tmp/ck  # any fsspec URL (real S3: s3://bucket/prefix)
    python scripts/bench_checkpoint.py --sizes 256x4096 --repeats 3

For each SAE size (d_model x n_latents, TopK, Adam state filled by one step) and `--repeats` times:
  host copy  packing the state into host memory on its own (pack_safetensors), the floor for blocking
  blocking   save() with async upload: what the training loop waits for
  upload     from save() until the checkpoint is complete (manifest and `latest` written)
  sync save  save() with checkpoint.async_upload=false, the cost without a background upload
  step       a train step on its own, and while an upload runs in the background (GIL contention)
Prints medians, one row per size, and the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import torch

from sae_dist.checkpoint import Checkpointer
from sae_dist.config import CheckpointConfig, Config, ModelConfig, TrackingConfig, TrainerConfig, sae_config
from sae_dist.sae import SparseAutoencoder
from sae_dist.snapshot import optimizer_tensors, pack_safetensors
from sae_dist.trainer import Trainer, TrainState


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint, deadline, delay = f"http://127.0.0.1:{port}", time.monotonic() + 60, 0.05
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server on {endpoint} did not start within 60s") from None
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    import s3fs

    s3fs.S3FileSystem().mkdir("bench")
    return proc, "s3://bench/ckpt"


def build(d: int, n: int, url: str, async_upload: bool, out: str) -> tuple[Trainer, Checkpointer, torch.Tensor]:
    cfg = Config(model=ModelConfig(d_model=d), sae=sae_config(n_latents=n, k=32),
                 trainer=TrainerConfig(total_tokens=10**9, batch_tokens=256, encoder_chunk=4096),
                 checkpoint=CheckpointConfig(url=url, keep_last=1, run_name=f"d{d}-n{n}", async_upload=async_upload),
                 tracking=TrackingConfig(enabled=False), output_dir=out)
    sae = SparseAutoencoder(cfg.sae, d, encoder_chunk=4096, seed=0)
    ck = Checkpointer(cfg)
    trainer = Trainer(cfg, sae, TrainState(), checkpointer=ck)
    x = torch.randn(256, d)
    trainer.train_step(x)  # fills Adam's state
    return trainer, ck, x


def bench_size(d: int, n: int, url: str, repeats: int, out: str) -> dict[str, float]:
    trainer, ck, x = build(d, n, url, True, out)
    state_mb = sum(t.numel() * t.element_size() for t in trainer.sae.state_dict().values())
    state_mb += sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t))
    blocking, upload, step_idle, step_busy, copy = [], [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for tensors in (trainer.sae.state_dict(), optimizer_tensors(trainer.sae, trainer.optimizer)):
            pack_safetensors(tensors)
        copy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trainer.train_step(x)
        step_idle.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ck.save(trainer)
        blocking.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        trainer.train_step(x)  # the upload runs meanwhile
        step_busy.append(time.perf_counter() - t1)
        ck.wait()
        upload.append(time.perf_counter() - t0)
    trainer, ck, x = build(d, n, url, False, out)
    sync = []
    for _ in range(repeats):
        trainer.train_step(x)
        t0 = time.perf_counter()
        ck.save(trainer)
        sync.append(time.perf_counter() - t0)
    med = statistics.median
    return {"d_model": d, "n_latents": n, "state_MB": round(state_mb / 2**20, 1), "host_copy_s": med(copy), "blocking_s": med(blocking),
            "upload_s": med(upload), "sync_save_s": med(sync), "step_s": med(step_idle), "step_during_upload_s": med(step_busy)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="", help="checkpoint URL; empty starts a moto S3 server")
    ap.add_argument("--sizes", default="256x4096,512x8192,768x16384", help="d_model x n_latents, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    proc, url = start_moto() if not args.url else (None, args.url)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as out:
            for size in args.sizes.split(","):
                d, n = (int(v) for v in size.split("x"))
                rows.append(bench_size(d, n, url, args.repeats, out))
                r = rows[-1]
                print(f"d={d:5d} n={n:6d} state {r['state_MB']:7.1f} MB | host copy {r['host_copy_s'] * 1e3:7.1f} ms | "
                      f"blocking {r['blocking_s'] * 1e3:7.1f} ms | "
                      f"upload {r['upload_s'] * 1e3:8.1f} ms | sync save {r['sync_save_s'] * 1e3:8.1f} ms | "
                      f"step {r['step_s'] * 1e3:7.1f} ms, during upload {r['step_during_upload_s'] * 1e3:7.1f} ms",
                      flush=True)
    finally:
        if proc is not None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    print(json.dumps({"url": url if args.url else "moto (local)", "repeats": args.repeats, "rows": rows}))


if __name__ == "__main__":
    main()
