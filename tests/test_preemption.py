"""SIGTERM/SIGINT stop a run after a checkpoint of the step it was in; the resumed run's losses equal the
uninterrupted run's bit for bit. Real processes, real signals, a real gloo group."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

from conftest import synthetic_config

from sae_dist.checkpoint import Checkpointer, step_name
from sae_dist.preempt import PREEMPTED_EXIT

WORKER = os.path.join(os.path.dirname(__file__), "preempt_worker.py")


def _start(out, *args: str, rank: int = 0, world: int = 1, port: int = 0) -> subprocess.Popen:
    env = dict(os.environ)
    if world > 1:
        env |= {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port)}
    log = open(os.path.join(out, f"stderr-rank{rank}.log"), "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, WORKER, str(out), *args], stdout=subprocess.PIPE, stderr=log, text=True,
                            env=env)


def _until(proc: subprocess.Popen, marker: str) -> None:
    """Reads the worker's output until a line starts with `marker` (EOF: the worker ended first)."""
    for line in proc.stdout:
        if line.startswith(marker):
            return
    raise AssertionError(f"the worker ended (status {proc.wait()}) before printing {marker!r}")


def _until_step(proc: subprocess.Popen, step: int) -> None:
    for line in proc.stdout:
        if line.startswith("STEP ") and int(line.split()[1]) >= step:
            return
    raise AssertionError(f"the worker ended (status {proc.wait()}) before step {step}")


def _finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    proc.stdout.read()
    return proc.wait(timeout=timeout)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group(out, *args: str, world: int = 2) -> list[subprocess.Popen]:
    port = _port()
    return [_start(out, *args, "--fp", str(world), rank=r, world=world, port=port) for r in range(world)]


def _json(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _complete(out, **parallel) -> list[int]:
    cfg = synthetic_config(out, checkpoint={"keep_last": 50}, **({"parallel": parallel} if parallel else {}))
    return [s for s, _ in Checkpointer(cfg).complete_steps()]


def test_sigterm_at_a_random_step_checkpoints_it_and_the_resumed_losses_are_bit_identical(tmp_path):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    straight.mkdir(), cut.mkdir()
    assert _finish(_start(straight, "--steps", "400")) == 0
    reference = _json(straight / "history.json")["history"]

    target = random.Random(1234).randint(11, 120)
    proc = _start(cut, "--steps", "400")
    _until_step(proc, target)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc) == PREEMPTED_EXIT
    assert time.monotonic() - t0 < 25  # checkpoint.preempt_grace_s
    info = _json(cut / "preempted-rank0.json")
    step = info["step"]
    assert target <= step < 400 and len(info["history"]) == step
    assert info["checkpoint"].endswith(step_name(step)) and _complete(cut)[-1] == step

    resumed = _start(cut, "--steps", "400", "--resume")
    assert _finish(resumed) == 0, (cut / "stderr-rank0.log").read_text()[-3000:]
    assert info["history"] + _json(cut / "history.json")["history"] == reference


def test_sigterm_to_one_rank_of_an_fp2_group_stops_both_at_one_step_and_resumes_bit_identically(tmp_path):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    straight.mkdir(), cut.mkdir()
    assert [_finish(p) for p in _group(straight, "--steps", "120")] == [0, 0]
    reference = _json(straight / "history.json")["history"]

    ranks = _group(cut, "--steps", "120")
    _until_step(ranks[0], 17)
    ranks[1].send_signal(signal.SIGTERM)  # one node drained: the other rank learns it at the step's end
    assert [_finish(p) for p in ranks] == [PREEMPTED_EXIT, PREEMPTED_EXIT]
    infos = [_json(cut / f"preempted-rank{r}.json") for r in range(2)]
    step = infos[0]["step"]
    assert infos[1]["step"] == step and 17 <= step < 120
    assert _complete(cut, fp=2)[-1] == step

    assert [_finish(p) for p in _group(cut, "--steps", "120", "--resume")] == [0, 0]
    assert infos[0]["history"] + _json(cut / "history.json")["history"] == reference


def test_sigterm_during_an_upload_waits_for_it_then_checkpoints_the_current_step(tmp_path):
    proc = _start(tmp_path, "--steps", "400", "--stall-upload-at", "20")
    _until(proc, "STALLED")  # step 20's upload hangs on slow storage; training goes on
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc) == PREEMPTED_EXIT
    step = _json(tmp_path / "preempted-rank0.json")["step"]
    assert 20 <= step < 400  # 20: the signal came before the step ended; its upload is awaited
    assert 20 in _complete(tmp_path) and _complete(tmp_path)[-1] == step


def test_sigterm_to_an_fp2_group_during_an_upload_waits_for_it_then_checkpoints_the_current_step(tmp_path):
    ranks = _group(tmp_path, "--steps", "400", "--stall-upload-at", "20")
    _until(ranks[0], "STALLED")
    for proc in ranks:  # a pod's containers all get the signal
        proc.send_signal(signal.SIGTERM)
    assert [_finish(p) for p in ranks] == [PREEMPTED_EXIT, PREEMPTED_EXIT]
    step = _json(tmp_path / "preempted-rank0.json")["step"]
    assert _json(tmp_path / "preempted-rank1.json")["step"] == step and 20 <= step < 400
    assert 20 in _complete(tmp_path, fp=2) and _complete(tmp_path, fp=2)[-1] == step


def test_sigkill_during_the_preemption_checkpoint_leaves_the_one_before_loadable(tmp_path):
    proc = _start(tmp_path, "--steps", "400", "--term-at", "25", "--stall-preempt-save")
    _until(proc, "STALLED")  # step 25's checkpoint is half written
    proc.kill()
    assert _finish(proc) == -signal.SIGKILL
    assert _complete(tmp_path) == [10, 20]
    resumed = _start(tmp_path, "--steps", "30", "--resume")
    assert _finish(resumed) == 0
    assert _json(tmp_path / "history.json")["steps"] == 30


def test_a_preemption_save_that_misses_the_grace_still_exits_preempted_and_resumes_from_the_one_before(tmp_path):
    """At a million latents the preemption save may not fit in the grace period: the step stays
    invisible, the process still exits with the preempted status naming the last complete checkpoint,
    and the resumed run goes on from there."""
    proc = _start(tmp_path, "--steps", "400", "--term-at", "25", "--slow-preempt-save", "--grace", "2")
    assert _finish(proc) == PREEMPTED_EXIT
    assert _complete(tmp_path) == [10, 20]
    assert _json(tmp_path / "preempted-rank0.json")["checkpoint"].endswith(step_name(20))
    resumed = _start(tmp_path, "--steps", "30", "--resume")
    assert _finish(resumed) == 0
    assert _json(tmp_path / "history.json")["steps"] == 30


def test_a_second_signal_exits_at_once(tmp_path):
    proc = _start(tmp_path, "--steps", "400", "--term-at", "25", "--stall-preempt-save")
    _until(proc, "STALLED")  # the first signal's checkpoint hangs; a second signal must not wait for it
    proc.send_signal(signal.SIGINT)
    assert _finish(proc, timeout=20) == 128 + signal.SIGINT
    assert _complete(tmp_path) == [10, 20]
