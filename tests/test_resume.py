"""A killed run resumes from its last complete checkpoint and continues exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import torch
from conftest import synthetic_config

from sae_dist.checkpoint import Checkpointer
from sae_dist.run import train

WORKER = os.path.join(os.path.dirname(__file__), "resume_worker.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_with_identical_losses(tmp_path):
    straight = tmp_path / "straight"
    assert _run(str(straight)).returncode == 0
    reference = json.loads((straight / "history.json").read_text())["history"]
    assert len(reference) == 40

    broken = tmp_path / "broken"
    killed = _run(str(broken), "--kill-at", "25")
    assert killed.returncode == -signal.SIGKILL
    assert not (broken / "history.json").exists()
    # steps 10 and 20 were saved; 25 died before step 30's checkpoint
    steps = [s for s, _ in Checkpointer(synthetic_config(broken)).complete_steps()]
    assert steps == [10, 20]

    resumed = _run(str(broken), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = json.loads((broken / "history.json").read_text())
    assert after["steps"] == 40
    # fp32 on CPU, same data order, same optimizer state: the losses are bit-identical
    assert after["history"] == reference[20:]


def test_resume_skips_a_step_without_manifest(tmp_path):
    cfg = synthetic_config(tmp_path, trainer={"total_tokens": 256 * 20})
    train(cfg)
    ck = Checkpointer(cfg)
    assert [s for s, _ in ck.complete_steps()] == [10, 20]
    partial = os.path.join(ck.run_root, "step-00000030")
    os.makedirs(partial)
    with open(os.path.join(partial, "model-rank00000.safetensors"), "wb") as fh:
        fh.write(b"half a file")
    assert ck.resolve("latest").endswith("step-00000020")


def test_corrupt_shard_stops_resume_naming_the_file(tmp_path):
    import pytest

    from sae_dist.checkpoint import CheckpointError

    cfg = synthetic_config(tmp_path, trainer={"total_tokens": 256 * 10})
    train(cfg)
    ck = Checkpointer(cfg)
    step_dir = ck.resolve("latest")
    path = os.path.join(step_dir, "optim-fp0of1.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    cfg2 = synthetic_config(tmp_path, checkpoint={"resume_from": "latest"}, trainer={"total_tokens": 256 * 20})
    with pytest.raises(CheckpointError, match=r"optim-fp0of1\.safetensors does not match its manifest checksum"):
        train(cfg2)


def test_pickle_in_checkpoint_folder_is_never_executed(tmp_path):
    import pickle

    cfg = synthetic_config(tmp_path, trainer={"total_tokens": 256 * 10})
    train(cfg)
    step_dir = Checkpointer(cfg).resolve("latest")
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("model-rank00000.pt", "optim.pkl"):
        with open(os.path.join(step_dir, name), "wb") as fh:
            pickle.dump(Boom(), fh)
    cfg2 = synthetic_config(tmp_path, checkpoint={"resume_from": "latest"}, trainer={"total_tokens": 256 * 15})
    out = train(cfg2)
    assert out["steps"] == 15
    assert not marker.exists()


def test_export_reproduces_reconstructions_on_raw_activations(tmp_path):
    from sae_dist.data.synthetic import SyntheticSource
    from sae_dist.export import load_saelens

    cfg = synthetic_config(tmp_path, trainer={"total_tokens": 256 * 10})
    out = train(cfg)
    sae, meta = load_saelens(out["export_dir"])
    assert set(meta) >= {"d_in", "d_sae", "architecture", "hook_name"}
    # the checkpointed (scaled) SAE, restored independently, is the reference
    from sae_dist.lifecycle import build_sae
    from sae_dist.trainer import Trainer, TrainState

    ref = build_sae(cfg, 32)
    trainer = Trainer(cfg, ref, TrainState())
    ck = Checkpointer(cfg)
    ck.load(trainer, ck.resolve("latest"))
    x = SyntheticSource(32, 128, 3, seed=99).chunk(0)[:300]
    s = trainer.state.scale
    assert s == meta["sae_dist_scale"] and s != 1.0
    ref.eval()
    want = ref.decode_sparse(*ref.encode_sparse(x * s)) / s
    got = sae.decode_sparse(*sae.encode_sparse(x))
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(sae.encode_sparse(x)[1], ref.encode_sparse(x * s)[1])


def test_nan_activations_stop_naming_the_step_and_the_last_checkpoint(tmp_path):
    import pytest

    from sae_dist.lifecycle import build_sae
    from sae_dist.trainer import NonFiniteError, Trainer, TrainState

    cfg = synthetic_config(tmp_path)
    trainer = Trainer(cfg, build_sae(cfg, 32), TrainState())
    x = torch.randn(64, 32)
    trainer.train_step(x)
    x[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"at step 1 \(activations finite: False\); last good checkpoint: none"):
        trainer.train_step(x)
