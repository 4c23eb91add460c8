from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sae_dist import archs  # noqa: E402
from sae_dist.config import (  # noqa: E402
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    TrackingConfig,
    TrainerConfig,
    sae_config,
)


def start_moto(log_path) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free local port, logging to `log_path`, once it answers HTTP (polled with a
    growing interval; an error if it dies or stays silent for 60 s) -> (process, endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    endpoint, deadline, delay = f"http://127.0.0.1:{port}", time.monotonic() + 60, 0.05
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return proc, endpoint
        except urllib.error.HTTPError:
            return proc, endpoint  # any HTTP answer means the server is up
        except OSError as err:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited ({proc.returncode}): {open(log_path).read()[-2000:]}") from err
            if time.monotonic() + delay > deadline:
                proc.kill()
                raise TimeoutError(f"moto_server at {endpoint} did not answer within 60 s") from err
            time.sleep(delay)
            delay = min(2 * delay, 1.0)


def synthetic_config(tmp_path, **overrides) -> Config:
    """A tiny synthetic-data job; `overrides` maps group names to dicts of fields."""
    groups = {
        "model": ModelConfig(d_model=32),
        "data": DataConfig(source="synthetic", synthetic_n_features=128, synthetic_k=3, shuffle_buffer_tokens=2048),
        "sae": sae_config(n_latents=256, k=4, dead_tokens=4096),
        "trainer": TrainerConfig(total_tokens=256 * 40, batch_tokens=256, warmup_tokens=256 * 5, log_every=5,
                                 eval_tokens=2048, scale_tokens=1024, encoder_chunk=100),
        "checkpoint": CheckpointConfig(every_steps=10),
        "tracking": TrackingConfig(enabled=False),
    }
    for name, fields in overrides.items():
        if name == "sae":  # another family keeps the shared fields and takes its own
            family = archs.get(fields.get("arch", groups["sae"].arch)).config
            shared = {k: v for k, v in groups["sae"].__dict__.items() if k in family.__dataclass_fields__}
            groups["sae"] = sae_config(**{**shared, "arch": family.arch, **fields})
            continue
        cls = type(groups[name]) if name in groups else None
        base = groups[name].__dict__ if name in groups else {}
        groups[name] = (cls or _group_class(name))(**{**base, **fields})
    return Config(**groups, output_dir=str(tmp_path))


def _group_class(name):
    from sae_dist import config

    return {"parallel": config.ParallelConfig, "cluster": config.ClusterConfig}[name]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _restore_kernel_settings():
    """A training run sets the process-wide top-k selection (trainer.encoder_select); undo it after."""
    from sae_dist.kernels import reference

    before = reference.SELECT_DTYPE
    yield
    reference.SELECT_DTYPE = before


_kernel_settings = pytest.fixture(autouse=True)(_restore_kernel_settings)
_kernel_settings_module = pytest.fixture(autouse=True, scope="module")(_restore_kernel_settings)


def pydoc_jsonl(path, n_docs: int) -> str:
    """A small real-prose corpus: the first n_docs pydoc topics as JSONL."""
    import json
    from pydoc_data.topics import topics

    with open(path, "w") as fh:
        for key in sorted(topics)[:n_docs]:
            fh.write(json.dumps({"text": topics[key]}) + "\n")
    return str(path)
