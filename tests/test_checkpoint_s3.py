"""Checkpoints on a real S3 endpoint (docs/design.md §5, §7): a moto server this module starts on 127.0.0.1.

    python -m pytest -q tests/test_checkpoint_s3.py

The tiny synthetic job runs through `tests/checkpoint_worker.py`: in this process for fp=1, under
torchrun for fp=2 and fp=4, in a child process where it gets killed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import threading

import pytest
import torch
from checkpoint_worker import run_job
from conftest import start_moto, synthetic_config
from safetensors.torch import load, load_file

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto")

from sae_dist.checkpoint import Checkpointer, CheckpointError  # noqa: E402

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "checkpoint_worker.py")
BUCKET = "ckpt"
SECRET = "s3cr3t-that-must-never-be-logged"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    def __init__(self, proc: subprocess.Popen, endpoint: str) -> None:
        self.proc, self.endpoint = proc, endpoint
        self.fs = s3fs.S3FileSystem()

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with one bucket, and the standard AWS variables pointing at it."""
    proc, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                               "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                               "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
                mp.setenv(key, value)
            s3fs.S3FileSystem.clear_instance_cache()
            moto = Moto(proc, endpoint)
            moto.fs.mkdir(BUCKET)
            yield moto
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=30)
        s3fs.S3FileSystem.clear_instance_cache()


def _url(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


def _steps(tmp_path, url: str) -> list[int]:
    return [s for s, _ in Checkpointer(synthetic_config(tmp_path, checkpoint={"url": url})).complete_steps()]


def _workers(jobs: list[dict], nproc: int = 1, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, WORKER, json.dumps(jobs), *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(_free_port()), *cmd[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _history(out) -> list[float]:
    return json.loads((out / "history.json").read_text())["history"]


@pytest.fixture(scope="module")
def fp1(s3, tmp_path_factory):
    """fp=1, in this process: 40 steps straight, and a run stopped after its step-20 checkpoint."""
    tmp = tmp_path_factory.mktemp("fp1")
    straight = run_job(str(tmp / "straight"), _url("fp1-straight"))
    assert straight is not None and straight["steps"] == 40
    assert run_job(str(tmp / "stopped"), _url("fp1-stopped"), stop_after=20) is None
    return {"history": straight["history"], "stopped": _url("fp1-stopped"), "tmp": tmp}


@pytest.fixture(scope="module")
def fp2(s3, tmp_path_factory):
    """fp=2 under torchrun: 40 steps straight, and a run stopped after its step-20 checkpoint (with the
    probe batch's reconstructions at that point)."""
    tmp = tmp_path_factory.mktemp("fp2")
    _workers([{"out": str(tmp / "straight"), "url": _url("fp2-straight"), "fp": 2},
              {"out": str(tmp / "stopped"), "url": _url("fp2-stopped"), "fp": 2, "stop_after": 20,
               "with_probe": True}], nproc=2)
    return {"history": _history(tmp / "straight"), "stopped": _url("fp2-stopped"), "tmp": tmp}


@pytest.fixture(scope="module")
def dp2(s3, tmp_path_factory):
    """dp=2 under torchrun: two replicas, each with its own data position in the checkpoint."""
    tmp = tmp_path_factory.mktemp("dp2")
    _workers([{"out": str(tmp / "straight"), "url": _url("dp2-straight"), "dp": 2},
              {"out": str(tmp / "stopped"), "url": _url("dp2-stopped"), "dp": 2, "stop_after": 20}], nproc=2)
    return {"history": _history(tmp / "straight"), "stopped": _url("dp2-stopped"), "tmp": tmp}


def test_fp1_stop_and_resume_from_s3_gives_identical_losses(fp1, tmp_path):
    assert _steps(tmp_path, fp1["stopped"]) == [10, 20]
    resumed = run_job(str(tmp_path), _url("fp1-resumed"), resume_from=fp1["stopped"] + "/sae")
    assert resumed["steps"] == 40
    assert resumed["history"] == fp1["history"][20:]  # fp32 on CPU: bit-identical, data order and RNG included


def test_fp2_stop_and_resume_from_s3_gives_identical_losses(fp2, tmp_path):
    assert _steps(tmp_path, fp2["stopped"]) == [10, 20]
    _workers([{"out": str(tmp_path), "url": _url("fp2-resumed"), "fp": 2, "resume_from": fp2["stopped"] + "/sae"}],
             nproc=2)
    assert _history(tmp_path) == fp2["history"][20:]


MULTISITE = {"transcoder": ({"arch": "transcoder", "k": 4}, 2), "clt": ({"arch": "clt", "n_latents": 252, "k": 3}, 6)}


@pytest.mark.parametrize("family", sorted(MULTISITE))
def test_multisite_families_stop_and_resume_from_s3_with_identical_losses(s3, tmp_path, family):
    """Multi-site chunks through the shuffle buffer and the checkpoint: a transcoder (TopK's path, which
    the crosscoder shares) and a 3-layer CLT, stopped after their step-20 checkpoint on the moto server
    and resumed, give the losses of the run that went straight through, bit for bit."""
    sae, sites = MULTISITE[family]
    straight = run_job(str(tmp_path / "straight"), _url(f"{family}-straight"), sae=sae, sites=sites)
    assert straight is not None and straight["steps"] == 40
    assert len(straight.get("fvu_per_site", [straight["fvu"]])) == {"transcoder": 1, "clt": 3}[family]
    assert run_job(str(tmp_path / "stopped"), _url(f"{family}-stopped"), stop_after=20, sae=sae, sites=sites) is None
    resumed = run_job(str(tmp_path / "resumed"), _url(f"{family}-resumed"), sae=sae, sites=sites,
                      resume_from=_url(f"{family}-stopped") + "/sae")
    assert resumed["history"] == straight["history"][20:]


def test_clt_fp2_stop_and_resume_from_s3_gives_identical_losses(s3, tmp_path):
    sae, sites = MULTISITE["clt"]
    _workers([{"out": str(tmp_path / "straight"), "url": _url("clt2-straight"), "fp": 2, "sae": sae, "sites": sites},
              {"out": str(tmp_path / "stopped"), "url": _url("clt2-stopped"), "fp": 2, "stop_after": 20, "sae": sae,
               "sites": sites}], nproc=2)
    _workers([{"out": str(tmp_path / "resumed"), "url": _url("clt2-resumed"), "fp": 2, "sae": sae, "sites": sites,
               "resume_from": _url("clt2-stopped") + "/sae"}], nproc=2)
    assert _history(tmp_path / "resumed") == _history(tmp_path / "straight")[20:]


def test_dp2_stop_and_resume_from_s3_gives_identical_losses(dp2, s3, tmp_path):
    assert _steps(tmp_path, dp2["stopped"]) == [10, 20]
    state = json.loads(s3.fs.cat_file(f"{BUCKET}/dp2-stopped/sae/step-00000020/trainer_state.json"))
    assert len(state["data_by_dp"]) == 2
    _workers([{"out": str(tmp_path), "url": _url("dp2-resumed"), "dp": 2, "resume_from": dp2["stopped"] + "/sae"}],
             nproc=2)
    assert _history(tmp_path) == dp2["history"][20:]


@pytest.fixture(scope="module")
def zero2(s3, tmp_path_factory):
    """dp=2 under torchrun with DeepSpeed ZeRO-2 (Adam's state split over the replicas)."""
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("zero2")
    ds = {"dp": 2, "engine": "deepspeed", "zero_stage": 2}
    _workers([{"out": str(tmp / "straight"), "url": _url("zero2-straight"), **ds},
              {"out": str(tmp / "stopped"), "url": _url("zero2-stopped"), "stop_after": 20, **ds}], nproc=2)
    return {"history": _history(tmp / "straight"), "stopped": _url("zero2-stopped"), "tmp": tmp}


def test_zero2_stop_and_resume_from_s3_gives_identical_losses(zero2, s3, tmp_path):
    """ZeRO's partitioned Adam state is assembled into the checkpoint and split again on resume."""
    optim = load(s3.fs.cat_file(f"{BUCKET}/zero2-stopped/sae/step-00000020/optim-fp0of1.safetensors"))
    assert set(optim) >= {"W_enc.exp_avg", "W_enc.exp_avg_sq", "W_dec.exp_avg", "b_dec.step"}
    assert float(optim["b_dec.step"]) == 20 and float(optim["W_enc.exp_avg_sq"].abs().sum()) > 0
    _workers([{"out": str(tmp_path), "url": _url("zero2-resumed"), "dp": 2, "engine": "deepspeed", "zero_stage": 2,
               "resume_from": zero2["stopped"] + "/sae"}], nproc=2)
    assert _history(tmp_path) == zero2["history"][20:]


def test_zero2_checkpoint_resumes_on_the_torch_engine(zero2, tmp_path):
    """The same file layout for both engines: a ZeRO checkpoint continues under plain (dense) torch Adam."""
    _workers([{"out": str(tmp_path), "url": _url("zero2-to-torch"), "dp": 2, "resume_from": zero2["stopped"] + "/sae",
               "lazy_rows": "off"}], nproc=2)
    history = _history(tmp_path)
    assert torch.allclose(torch.tensor(history), torch.tensor(zero2["history"][20:]), rtol=1e-5, atol=1e-7)


def test_fp32_checkpoint_continues_with_bf16_weights(zero2, tmp_path):
    """The same fp32 file layout whatever the precision: an fp32 ZeRO run continues with bf16 weights
    (masters and Adam exact from the checkpoint), close to the fp32 run."""
    _workers([{"out": str(tmp_path), "url": _url("zero2-to-bf16"), "dp": 2, "engine": "deepspeed", "zero_stage": 2,
               "param_dtype": "bf16", "resume_from": zero2["stopped"] + "/sae"}], nproc=2)
    history = torch.tensor(_history(tmp_path))
    want = torch.tensor(zero2["history"][20:])
    assert history.shape == want.shape and torch.allclose(history, want, rtol=2e-2), (history - want).abs().max()
    assert not torch.equal(history, want)  # the continuation did train with bf16 weights


def test_bf16_zero2_checkpoint_holds_fp32_masters_and_resumes_identically(zero2, s3, tmp_path):
    """trainer.param_dtype=bf16: the checkpoint holds DeepSpeed's fp32 master weights (unit-norm decoder
    rows, values bf16 cannot hold), and a resume continues bit-identically."""
    pytest.importorskip("deepspeed")
    ds = {"dp": 2, "engine": "deepspeed", "zero_stage": 2, "param_dtype": "bf16"}
    _workers([{"out": str(tmp_path / "straight"), "url": _url("bf16-straight"), **ds},
              {"out": str(tmp_path / "stopped"), "url": _url("bf16-stopped"), "stop_after": 20, **ds}], nproc=2)
    model = load(s3.fs.cat_file(f"{BUCKET}/bf16-stopped/sae/step-00000020/model-fp0of1.safetensors"))
    W = model["W_dec"]
    assert W.dtype == torch.float32 and (W.norm(dim=1) - 1).abs().max() < 1e-5
    assert not torch.equal(W, W.bfloat16().float())  # the masters, not the bf16 weights
    _workers([{"out": str(tmp_path / "resumed"), "url": _url("bf16-resumed"), **ds,
               "resume_from": _url("bf16-stopped") + "/sae"}], nproc=2)
    assert _history(tmp_path / "resumed") == _history(tmp_path / "straight")[20:]
    assert _history(tmp_path / "straight") != zero2["history"]  # the same job in fp32 weights: bf16 did run


@pytest.mark.parametrize("fp", [1, 4])
def test_fp2_checkpoint_resumes_on_fp1_and_fp4(fp2, tmp_path, fp):
    job = {"out": str(tmp_path), "url": _url(f"fp2-to-fp{fp}"), "fp": fp, "resume_from": fp2["stopped"] + "/sae",
           "with_probe": True}
    if fp == 1:
        history = run_job(**job)["history"]
    else:
        _workers([job], nproc=fp)
        history = _history(tmp_path)
    saved = load_file(str(fp2["tmp"] / "stopped" / "recon-saved.safetensors"))["x_hat"]
    loaded = load_file(str(tmp_path / "recon-loaded.safetensors"))["x_hat"]
    assert torch.allclose(loaded, saved, atol=1e-5, rtol=1e-5)
    assert len(history) == 20  # training continues from step 20 to 40 ...
    # ... along the same path, up to float summation order across shards
    assert torch.allclose(torch.tensor(history), torch.tensor(fp2["history"][20:]), rtol=1e-3, atol=1e-5)


def test_killed_upload_leaves_an_invisible_step_and_older_ones_intact(fp1, s3, tmp_path):
    url = _url("killed")
    cmd = [sys.executable, WORKER, json.dumps([{"out": str(tmp_path), "url": url}]), "--hang-upload-at", "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout=120), "the worker never reached the upload of step 30"
        assert proc.stdout.readline().strip() == "STALLED"
    finally:
        proc.kill()  # SIGKILL, with step 30's upload half done
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    step30 = f"{BUCKET}/killed/sae/step-00000030"
    s3.fs.invalidate_cache()
    written = [os.path.basename(p) for p in s3.fs.ls(step30)]
    assert written and "manifest.json" not in written
    assert _steps(tmp_path, url) == [10, 20]

    cfg = synthetic_config(tmp_path, checkpoint={"url": url})
    from sae_dist.lifecycle import build_sae
    from sae_dist.trainer import Trainer, TrainState

    ck = Checkpointer(cfg)
    for _step, path in ck.complete_steps():  # every older file still matches its checksum
        ck.load(Trainer(cfg, build_sae(cfg, 32), TrainState()), s3.fs.unstrip_protocol(path))
    resumed = run_job(str(tmp_path), url, resume_from="latest")
    assert resumed["history"] == fp1["history"][20:]
    assert _steps(tmp_path, url) == [10, 20, 30, 40]


def test_a_rank_whose_synchronous_upload_fails_leaves_the_step_invisible_and_the_group_training(fp2, s3, tmp_path):
    """Rank 1 of an fp=2 group cannot write step 20 (its writes ran out of retries). Rank 0 learns it from
    the ranks' agreement after the uploads instead of waiting for rank 1's part until
    checkpoint.upload_timeout_s (an hour by default: past the process group's timeout, while rank 1 waits
    in the next step's collective). Step 20 stays invisible, and the group trains on with its losses."""
    url = _url("fp2-rank-failed")
    proc = _workers([{"out": str(tmp_path), "url": url, "fp": 2, "async_upload": False}], 2, "--fail-upload-at", "20")
    assert "the upload of rank(s) [1] failed" in proc.stderr
    assert _steps(tmp_path, url) == [10, 30, 40]
    assert _history(tmp_path) == fp2["history"]


def test_checksum_mismatch_stops_resume_naming_the_file(fp1, s3, tmp_path):
    s3.fs.copy(f"{BUCKET}/fp1-stopped", f"{BUCKET}/corrupt", recursive=True)
    shard = f"{BUCKET}/corrupt/sae/step-00000020/optim-fp0of1.safetensors"
    data = bytearray(s3.fs.cat_file(shard))
    data[-1] ^= 0xFF
    s3.fs.pipe_file(shard, bytes(data))
    with pytest.raises(CheckpointError, match=rf"s3://{shard} does not match its manifest checksum"):
        run_job(str(tmp_path), _url("corrupt-resumed"), resume_from=_url("corrupt/sae"))


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_in_checkpoint_folder_is_never_executed(fp1, s3, tmp_path):
    marker = str(tmp_path / "pwned")
    payload = pickle.dumps(_Boom(marker))
    s3.fs.copy(f"{BUCKET}/fp1-stopped", f"{BUCKET}/pickled", recursive=True)
    step = f"{BUCKET}/pickled/sae/step-00000020"
    for name in ("model-fp0of1.pt", "optim.pkl", "trainer_state.pkl", "rng_state.pth"):
        s3.fs.pipe_file(f"{step}/{name}", payload)
    resumed = run_job(str(tmp_path / "a"), _url("pickled-resumed"), resume_from=_url("pickled/sae"))
    assert resumed["steps"] == 40 and not os.path.exists(marker)

    # a pickle in place of a shard, with a manifest rewritten to match it, fails to parse and runs nothing
    manifest = json.loads(s3.fs.cat_file(f"{step}/manifest.json"))
    manifest["files"]["model-fp0of1.safetensors"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    s3.fs.pipe_file(f"{step}/model-fp0of1.safetensors", payload)
    s3.fs.pipe_file(f"{step}/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(CheckpointError, match=r"model-fp0of1\.safetensors is not a readable safetensors file"):
        run_job(str(tmp_path / "b"), _url("pickled-resumed-2"), resume_from=_url("pickled/sae"))
    assert not os.path.exists(marker)


def test_training_continues_while_storage_is_down_and_checkpoints_after_it(fp1, s3, tmp_path, monkeypatch, caplog):
    import sae_dist.lifecycle
    import sae_dist.run
    from sae_dist.tracking import NullTracker

    made: list[Checkpointer] = []
    retried = threading.Event()
    blocked: dict[int, float] = {}

    class Recorded(Checkpointer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
            self.store.on_retry = lambda what, err, attempt: retried.set() if attempt >= 2 else None

        def save(self, trainer):
            out = super().save(trainer)
            blocked[trainer.state.step] = self.last_blocking_s
            return out

    class Outage(NullTracker):
        def log_metrics(self, metrics, step):
            if step == 12:
                made[0].wait(60)  # step 10 is stored; the outage hits step 20's upload
                s3.pause()
            if step == 25:
                try:  # steps 13..25 trained with the server stopped; it stays down until the upload retried twice
                    assert retried.wait(60), "the upload of step 20 never retried"
                finally:
                    s3.resume()

    url = _url("outage")
    monkeypatch.setattr(sae_dist.lifecycle, "Checkpointer", Recorded)
    cfg = synthetic_config(tmp_path, trainer={"log_every": 1}, checkpoint={
        "url": url, "every_steps": 10, "keep_last": 5, "op_timeout_s": 1.0, "retry_initial_s": 0.2, "retry_max_s": 0.5})
    caplog.set_level("INFO")
    try:
        out = sae_dist.run.train(cfg, Outage())
    finally:
        s3.resume()
    assert out["history"] == fp1["history"]  # storage trouble never touched training
    assert max(blocked[s] for s in (10, 20, 30)) < 0.5, blocked  # saves cost a host copy, not an upload
    steps = _steps(tmp_path, url)
    assert 20 in steps and steps[-1] == 40, steps  # step 20 landed once the server was back, and so did 40
    assert "retry" in caplog.text and SECRET not in caplog.text


def test_shard_split_into_row_files_resumes_identically_and_reshards(fp2, s3, tmp_path):
    """checkpoint.max_file_mb under a shard's size: each shard is written as several files of latent
    rows (packed one at a time with synchronous uploads), and the run resumes from them exactly, on the
    same mesh and on another."""
    limit = 0.01  # MiB: 10 KiB, a few times under the Adam state of one fp=2 shard
    split = {"max_file_mb": limit, "async_upload": False}
    _workers([{"out": str(tmp_path / "stopped"), "url": _url("split"), "fp": 2, "stop_after": 20, **split}], nproc=2)
    step = f"{BUCKET}/split/sae/step-00000020"
    manifest = json.loads(s3.fs.cat_file(f"{step}/manifest.json"))
    rows = [s for s in manifest["layout"]["shards"] if s["fp_rank"] == 1]
    count = len(rows)
    assert count >= 3 and rows[0]["optim"] == f"optim-fp1of2-rows0of{count}.safetensors"
    bounds = [s["latents"] for s in rows]  # contiguous row ranges covering the shard's latents [128, 256)
    assert bounds[0][0] == 128 and bounds[-1][1] == 256 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    for name, entry in manifest["files"].items():
        if name.startswith(("model-", "optim-")):
            assert entry["size"] <= limit * 2**20 + 4096, (name, entry)  # + the replicated tensors and header
    _workers([{"out": str(tmp_path / "same"), "url": _url("split-same"), "fp": 2,
               "resume_from": f"s3://{step}"}], nproc=2)
    assert _history(tmp_path / "same") == fp2["history"][20:]
    history = run_job(str(tmp_path / "one"), _url("split-one"), resume_from=f"s3://{step}")["history"]
    assert torch.allclose(torch.tensor(history), torch.tensor(fp2["history"][20:]), rtol=1e-3, atol=1e-5)
