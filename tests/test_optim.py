"""The optimizers of `trainer.optimizer`: signum_sf's update rule against a hand computation, fp=2 against
fp=1 with real gloo processes, exact resume (and resharding its state from fp=2 to fp=1), and the
DeepSpeed engine refusing it.

    python -m pytest -q tests/test_optim.py
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import synthetic_config
from safetensors.torch import load_file

from sae_dist.checkpoint import Checkpointer, step_name
from sae_dist.config import ConfigError
from sae_dist.optim import SignumScheduleFree
from sae_dist.parallel.engine import check_supported
from sae_dist.run import train
from sae_dist.tracking import NullTracker

STEPS = 20


def _cfg(tmp, fp=1, optimizer="signum_sf", **checkpoint):
    return synthetic_config(
        tmp,
        trainer={"optimizer": optimizer, "total_tokens": 256 * STEPS, "log_every": 1},
        parallel={"fp": fp, "engine": "torch"},
        checkpoint={"every_steps": 10, "keep_last": 5, "async_upload": False, **checkpoint},
    )


def test_signum_sf_matches_a_hand_computed_three_steps():
    """momentum 0.5 and lrs 0.5, 1, 1 keep the arithmetic exact or nearly; loss (p - t)^2 / 2 makes the
    gradient sign(y - t), so a gradient taken at x or z instead of y gives other signs at step 3."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    target = torch.tensor([0.25, -3.0])
    opt = SignumScheduleFree([p], lr=1.0, momentum=0.5)
    seen_y = []
    for lr in (0.5, 1.0, 1.0):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        opt.gradient_point()
        seen_y.append(p.detach().clone())
        ((p - target) ** 2).sum().div(2).backward()
        opt.step()
    # step 1: y = x = z = [1, -2], sign(y - t) = [+, +]  -> z = [0.5, -2.5], c = 1: x = z
    # step 2: y = [0.5, -2.5],  sign = [+, +]             -> z = [-0.5, -3.5], c = 1 / 1.25: x = [-0.3, -3.3]
    # step 3: y = [-0.4, -3.4], sign = [-, -]             -> z = [0.5, -2.5], c = 1 / 2.25: x = x + (z - x) 4/9
    want_y = [[1.0, -2.0], [0.5, -2.5], [-0.4, -3.4]]
    for got, want in zip(seen_y, want_y):
        assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    assert torch.allclose(p.detach(), torch.tensor([-0.3 + 0.8 * 4 / 9, -3.3 + 0.8 * 4 / 9]), atol=1e-6)
    st = opt.state[p]
    assert torch.equal(st["z"], torch.tensor([0.5, -2.5]))
    assert (float(st["step"]), float(st["lr_max"]), float(st["weight_sum"])) == (3.0, 1.0, 2.25)


def test_signum_sf_keeps_unit_rows_of_z_and_refuses_a_step_without_gradient_point():
    W = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(4, 3), dim=1))
    opt = SignumScheduleFree([W], lr=0.3, unit_rows=(W,))
    opt.gradient_point()
    W.sum().backward()
    opt.step()
    assert torch.allclose(opt.state[W]["z"].norm(dim=1), torch.ones(4))
    with pytest.raises(RuntimeError, match=r"call gradient_point\(\) before the forward"):
        opt.step()


class _StopAt(NullTracker):
    """Ends the job (an exception out of train) when step `step` is logged: a kill after a checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def log_metrics(self, metrics, step):  # type: ignore[no-untyped-def]
        if step == self.step:
            raise KeyboardInterrupt(f"stopped at step {step}")


def _export(out: dict) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out["export_dir"], "sae_weights.safetensors"))


def test_signum_sf_resumes_bit_exactly(tmp_path):
    straight = train(_cfg(tmp_path / "straight"))
    assert len(straight["history"]) == STEPS
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "broken"), _StopAt(13))
    steps = [s for s, _ in Checkpointer(_cfg(tmp_path / "broken")).complete_steps()]
    assert steps == [10]
    resumed = train(_cfg(tmp_path / "broken", resume_from="latest"))
    assert resumed["history"] == straight["history"][10:]
    for name, t in _export(straight).items():
        assert torch.equal(_export(resumed)[name], t), name


def test_adam_checkpoint_does_not_seed_signum_sf(tmp_path):
    train(_cfg(tmp_path, optimizer="adam"))
    with pytest.raises(ConfigError, match=r"holds adam state .* trainer\.optimizer is signum_sf; resume with "
                                          r"trainer\.optimizer=adam"):
        train(_cfg(tmp_path, resume_from="latest"))


def test_signum_sf_checkpoint_does_not_seed_deepspeed_adam(tmp_path):
    pytest.importorskip("deepspeed")
    train(_cfg(tmp_path))
    cfg = _cfg(tmp_path, optimizer="adam", resume_from="latest")
    cfg.parallel.engine = "deepspeed"
    with pytest.raises(ConfigError, match=r"holds signum_sf state .* trainer\.optimizer is adam; resume with "
                                          r"trainer\.optimizer=signum_sf"):
        train(cfg)


@pytest.mark.parametrize(("parallel", "fix"), [
    ({"engine": "deepspeed"}, r"parallel\.engine is deepspeed, .*set parallel\.engine=torch"),
    ({"engine": "auto", "dp": 2}, r"parallel\.engine \(auto\) picks deepspeed for parallel\.dp \(2\)"),
])
def test_deepspeed_engine_refuses_signum_sf_before_any_work(tmp_path, parallel, fix):
    cfg = synthetic_config(tmp_path, trainer={"optimizer": "signum_sf"}, parallel=parallel)
    with pytest.raises(ConfigError, match=r"trainer\.optimizer \(signum_sf\) runs on the torch engine only, but "
                                          + fix + r".*or set trainer\.optimizer=adam"):
        check_supported(cfg, torch.device("cpu"))
    if parallel["engine"] == "deepspeed":
        with pytest.raises(ConfigError, match=r"trainer\.optimizer \(signum_sf\)"):
            train(cfg)
        assert not (tmp_path / "checkpoints").exists()


def test_bf16_weights_refuse_signum_sf_naming_param_dtype(tmp_path):
    cfg = synthetic_config(tmp_path, trainer={"optimizer": "signum_sf", "param_dtype": "bf16"})
    with pytest.raises(ConfigError, match=r"set trainer\.param_dtype=fp32 and parallel\.engine=torch"):
        check_supported(cfg, torch.device("cpu"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, tmp: str) -> None:
    """One rank of an fp=2 job through the driver's own path (run.train), as under torchrun."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    out = train(_cfg(tmp, fp=2))
    if rank == 0:
        with open(os.path.join(tmp, "history.json"), "w") as fh:
            json.dump({"history": out["history"], "export_dir": out["export_dir"]}, fh)


@pytest.fixture(scope="module")
def fp2(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("fp2"))
    mp.spawn(_rank, args=(_free_port(), tmp), nprocs=2)
    with open(os.path.join(tmp, "history.json")) as fh:
        return json.load(fh) | {"tmp": tmp}


def test_fp2_matches_fp1_losses_and_weights(fp2, tmp_path):
    one = train(_cfg(tmp_path))
    assert torch.allclose(torch.tensor(fp2["history"]), torch.tensor(one["history"]), rtol=1e-5, atol=0)
    sharded, whole = _export(fp2), _export(one)
    assert sharded.keys() == whole.keys()
    for name, t in whole.items():
        assert torch.allclose(sharded[name], t, rtol=1e-5, atol=1e-6), name


def test_fp2_checkpoint_reshards_onto_fp1(fp2, tmp_path):
    """The fp=2 run's step-10 state (z rows cut per latent, b_dec's and the counters whole) continues on
    one process along the fp=2 run's own path."""
    resumed = train(_cfg(tmp_path, resume_from=os.path.join(fp2["tmp"], "checkpoints", "sae", step_name(10))))
    assert len(resumed["history"]) == STEPS - 10
    assert torch.allclose(torch.tensor(resumed["history"]), torch.tensor(fp2["history"][10:]), rtol=1e-5, atol=0)
    for name, t in _export(fp2).items():
        assert torch.allclose(_export(resumed)[name], t, rtol=1e-5, atol=1e-6), name
