"""Storage that cannot work stops a job at its start, and errors no retry heals are never retried:
against a real S3 endpoint (a moto server this module starts on 127.0.0.1), a real full disk (a 64 KiB
tmpfs where this process may mount one, else files pointed at /dev/full) and a real cache on disk.

    python -m pytest -q tests/test_storage_faults.py
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import start_moto, synthetic_config

from sae_dist.checkpoint import CheckpointError, check_storage
from sae_dist.config import CheckpointConfig
from sae_dist.data.cache import CachedSource, CacheError, shard_name, write_cache
from sae_dist.data.synthetic import SyntheticSource
from sae_dist.errors import ConfigError
from sae_dist.run import train
from sae_dist.storage import probe_name

BUCKET = "ckpt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """The endpoint of a moto S3 server holding one bucket."""
    pytest.importorskip("moto")
    s3fs = pytest.importorskip("s3fs")
    proc, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True).mkdir(BUCKET)
        yield endpoint
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _no_aws_env(tmp_path) -> dict[str, str]:
    """This environment without any AWS credential source: no AWS_* variables, empty config files, no
    instance metadata service."""
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return env | {"AWS_SHARED_CREDENTIALS_FILE": str(empty), "AWS_CONFIG_FILE": str(empty),
                  "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    import s3fs

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in _no_aws_env(tmp_path).items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def credentials(no_credentials, monkeypatch):
    """Credentials moto accepts (any)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def _check_s3(tmp_path, url: str, endpoint: str) -> tuple[str, float]:
    """check_storage on an s3 checkpoint URL: its ConfigError's message and the seconds it took."""
    cfg = synthetic_config(tmp_path, checkpoint={"url": url, "endpoint_url": endpoint})
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        check_storage(cfg)
    return str(info.value), time.monotonic() - t0


def test_probe_timeout_must_be_positive():
    with pytest.raises(ConfigError, match=r"checkpoint\.probe_timeout_s \(0\) must be > 0"):
        CheckpointConfig(probe_timeout_s=0)


def test_check_passes_on_a_working_bucket_and_leaves_nothing(moto, credentials, tmp_path):
    import s3fs

    check_storage(synthetic_config(tmp_path, checkpoint={"url": f"s3://{BUCKET}/ok", "endpoint_url": moto}))
    assert not s3fs.S3FileSystem(endpoint_url=moto, skip_instance_cache=True).exists(f"{BUCKET}/ok/{probe_name()}")


def test_no_credentials_fail_the_check_at_once_naming_the_url_and_the_fix(moto, no_credentials, tmp_path):
    message, took = _check_s3(tmp_path, f"s3://{BUCKET}/nocreds", moto)
    assert took < 15, took
    assert f"checkpoint.url ('s3://{BUCKET}/nocreds')" in message and "NoCredentialsError" in message
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message and "instance role" in message


def test_refused_connection_fails_the_check_within_its_timeout_naming_the_endpoint(credentials, tmp_path):
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    message, took = _check_s3(tmp_path, f"s3://{BUCKET}/refused", endpoint)
    assert took < 15, took
    assert f"checkpoint.endpoint_url ('{endpoint}')" in message
    # the refusal itself, or (on a loaded machine) the last attempt cut short by the probe's deadline
    assert "Could not connect" in message or "no answer within" in message, message
    assert "checkpoint.probe_timeout_s" in message


def test_missing_bucket_fails_the_check_naming_the_bucket_fix(moto, credentials, tmp_path):
    message, took = _check_s3(tmp_path, "s3://no-such-bucket/run", moto)
    assert took < 15, took
    assert "checkpoint.url ('s3://no-such-bucket/run')" in message
    assert "bucket 'no-such-bucket' does not exist: create it" in message and "not retried" in message


def test_cli_without_credentials_exits_2_before_any_training_step(moto, tmp_path):
    url = f"s3://{BUCKET}/cli"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sae_dist", "data=synthetic", "model.d_model=16", "sae.n_latents=64", "sae.k=4",
         "trainer.total_tokens=2048", "trainer.batch_tokens=256", "trainer.eval_tokens=512",
         "trainer.scale_tokens=256", "checkpoint.every_steps=1", "tracking=none", f"checkpoint.url={url}",
         f"checkpoint.endpoint_url={moto}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, env=_no_aws_env(tmp_path),
    )
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert took < 15, took
    assert f"sae-dist: config error: checkpoint.url ('{url}') failed the storage check" in proc.stderr
    assert "AWS_ACCESS_KEY_ID" in proc.stderr
    assert "training topk SAE" not in proc.stderr and not (tmp_path / "run" / "sae").exists()
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=moto, skip_instance_cache=True)
    assert not fs.exists(f"{BUCKET}/cli")  # not one step, nor the probe


@pytest.fixture
def small_disk(tmp_path):
    """(folder, mounted): a 64 KiB tmpfs mounted for this test where this process may mount one (root on
    Linux); elsewhere a plain folder, and tests point the files they write at /dev/full instead."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True).returncode == 0
    yield where, mounted
    if mounted:
        subprocess.run(["umount", str(where)], check=True)


def _fill(folder, mounted: bool, *names: str) -> None:
    """Every byte of the tmpfs taken, or `names` under `folder` pointed at /dev/full."""
    if not mounted:
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/dev/full", folder / name)
        return
    with open(folder / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_full_disk_fails_the_check_at_once_saying_so(small_disk, tmp_path):
    folder, mounted = small_disk
    _fill(folder, mounted, f"{probe_name()}.partial")
    cfg = synthetic_config(tmp_path, checkpoint={"url": str(folder)})
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=rf"checkpoint\.url \('{folder}'\) failed the storage check") as info:
        check_storage(cfg)
    assert time.monotonic() - t0 < 1  # not retried (the first retry waits checkpoint.retry_initial_s, 1s)
    assert "No space left on device; not retried: the disk is full" in str(info.value)


def test_full_disk_at_a_periodic_save_is_logged_once_and_the_final_save_raises(small_disk, tmp_path, caplog):
    folder, mounted = small_disk  # the check at start passes: the disk fills up with the first shard
    cfg = synthetic_config(tmp_path, trainer={"total_tokens": 256 * 20}, checkpoint={"url": str(folder)})
    if not mounted:
        _fill(folder, False, *(f"sae/step-{s:08d}/model-fp0of1.safetensors.partial" for s in (10, 20)))
    caplog.set_level("INFO")
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match=r"step 20 was not written: .*the disk is full"):
        train(cfg)
    assert time.monotonic() - t0 < 60
    failed = [r.getMessage() for r in caplog.records if "failed and stays invisible" in r.getMessage()]
    assert len(failed) == 2 and "step-00000010" in failed[0] and "the disk is full" in failed[0], failed
    assert "retry" not in caplog.text


def test_missing_cache_index_fails_the_check_naming_data_cache_dir(tmp_path):
    cfg = synthetic_config(tmp_path, data={"source": "cache", "cache_dir": str(tmp_path / "nocache")})
    with pytest.raises(ConfigError, match=r"data\.cache_dir \(.*nocache'\) holds no train/index\.json"):
        check_storage(cfg)


def _cache(tmp_path) -> str:
    url = str(tmp_path / "cache" / "train")
    write_cache(SyntheticSource(16, 64, 3, seed=2, chunk_tokens=100).chunks(), url, 300, {})
    return url


def test_corrupt_cache_shard_is_named_with_the_fix(tmp_path):
    url = _cache(tmp_path)
    shard = os.path.join(url, shard_name(1))
    data = bytearray(open(shard, "rb").read())
    data[-5] ^= 0xFF  # one activation's bits: still a readable safetensors file, caught by the checksum
    open(shard, "wb").write(bytes(data))
    chunks = CachedSource(url).chunks()
    next(chunks)
    with pytest.raises(CacheError, match=rf"{shard} does not match its index .*`sae-dist cache data\.cache_dir="):
        next(chunks)


@pytest.mark.parametrize("corruption", ["truncated", "wrong shape"])
def test_corrupt_shard_of_a_cache_without_checksums_is_named(tmp_path, corruption):
    import torch
    from safetensors.torch import save

    url = _cache(tmp_path)
    index_path = os.path.join(url, "index.json")
    index = json.load(open(index_path))
    for entry in index["shards"]:  # a cache written before the index held checksums
        del entry["size"], entry["sha256"]
    json.dump(index, open(index_path, "w"))
    shard = os.path.join(url, shard_name(0))
    data = open(shard, "rb").read()
    bad = data[: len(data) // 2] if corruption == "truncated" else save({"activations": torch.zeros(100, 8)})
    open(shard, "wb").write(bad)
    want = "is not a readable safetensors file" if corruption == "truncated" else r"shape \(100, 8\)"
    with pytest.raises(CacheError, match=rf"cache shard {shard} .*{want}.*re-create the cache"):
        next(CachedSource(url).chunks())


@pytest.mark.parametrize("completed", [True, False])
def test_a_write_answered_no_such_upload_is_whole_if_it_completed_else_made_again(moto, credentials, monkeypatch,
                                                                                  completed):
    """A PUT answered NoSuchUpload (s3fs: FileNotFoundError): what S3 says to a retried
    CompleteMultipartUpload whose first attempt completed but whose answer was lost. The lost answer is
    injected; the store is real. A completed object of the right size is accepted; else the write is
    made again, once."""
    import s3fs

    from sae_dist.storage import Storage

    real, calls = s3fs.S3FileSystem._call_s3, []

    async def answer_lost(self, method, *args, **kwargs):  # type: ignore[no-untyped-def]
        if method == "put_object":
            calls.append(kwargs["Key"])
            if len(calls) == 1:
                if completed:
                    await real(self, method, *args, **kwargs)
                raise FileNotFoundError("The specified upload does not exist.")
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", answer_lost)
    store = Storage(f"s3://{BUCKET}/lost-{completed}", endpoint_url=moto, retry_initial_s=0.1)
    path = f"{BUCKET}/lost-{completed}/shard.safetensors"
    store.put(path, b"w" * 4096, time.monotonic() + 60)
    assert store.get(path) == b"w" * 4096
    assert len(calls) == (1 if completed else 2)
