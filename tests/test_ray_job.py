"""Against a real local Ray cluster (`ray start --head`, started and stopped here): `ray job submit --
sae-dist cluster=ray ...`, and a sweep whose members are Ray tasks (hydra/launcher=ray_sae) that is
SIGKILLed midway and finished by the same command without redoing finished members."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

pytest.importorskip("ray", reason="needs the ray extra")
pytest.importorskip("ray.dashboard", reason="ray job submission needs ray[default]")

RAY = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
SAE_DIST = [sys.executable, "-m", "sae_dist"]
TINY = ["data=synthetic", "model.d_model=16", "sae.k=4", "trainer.batch_tokens=256", "trainer.eval_tokens=512",
        "trainer.scale_tokens=256", "trainer.warmup_tokens=512", "data.shuffle_buffer_tokens=0"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_for(what: str, check, timeout_s: float, proc: subprocess.Popen | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not there after {timeout_s:.0f} s")
        time.sleep(0.1)  # polling interval of a bounded wait, not a wait for a condition


def _dashboard_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def ray_head():
    """A 2-CPU head node with the job server, in its own process group, killed at the end."""
    gcs, dash, client, agent = _free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs), "--dashboard-port", str(dash),
         "--include-dashboard", "true", "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent), "--temp-dir", temp_dir, "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for("the Ray dashboard (job server)", lambda: _dashboard_up(url), 120, head)
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": url, "env": env}
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # ray start --block drains for up to 30 s on SIGTERM: cut it short
        try:
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_with_the_trainer_group_on_the_cluster(ray_head, tmp_path):
    run_dir = tmp_path / "job"
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head["dashboard"], "--",
         "sae-dist", "cluster=ray", "cluster.address=auto", *TINY, "sae.n_latents=64", "trainer.total_tokens=2048",
         "tracking=none", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=300, env=ray_head["env"],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 8 and 0 < results["fvu"] < 2
    assert (run_dir / "sae" / "sae_weights.safetensors").exists()


def _member_dirs(sweep_dir) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {d: os.path.join(sweep_dir, d) for d in sorted(os.listdir(sweep_dir)) if d[0].isdigit()}


def test_ray_sweep_killed_midway_resumes_without_redoing_finished_members(ray_head, tmp_path):
    from mlflow.tracking import MlflowClient

    sweep_dir = tmp_path / "sweep"
    db = f"sqlite:///{tmp_path}/mlflow.db"
    # num_cpus=2 on a 2-CPU cluster: one member at a time, so the kill lands between members
    cmd = [*SAE_DIST, "-m", *TINY, "sae.n_latents=64,128,256", "trainer.total_tokens=76800",
           "checkpoint.every_steps=25", "checkpoint.async_upload=false", f"tracking.uri={db}",
           f"hydra.sweep.dir={sweep_dir}", "hydra/launcher=ray_sae", f"cluster.address={ray_head['address']}",
           "hydra.launcher.num_cpus=2"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ray_head["env"])

    def one_done_one_checkpointed() -> bool:
        if not sweep_dir.exists():
            return False
        dirs = _member_dirs(sweep_dir).values()
        done = [d for d in dirs if os.path.exists(os.path.join(d, "results.json"))]
        started = [d for d in dirs if d not in done and os.path.exists(os.path.join(d, "checkpoints", "sae", "latest"))]
        return bool(done) and bool(started)

    try:
        _wait_for("one finished member and one checkpointed member", one_done_one_checkpointed, 240, first)
    finally:
        first.kill()
        first.wait(timeout=30)
        log.close()
    assert not (sweep_dir / "report").exists()

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ray_head["env"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    members = _member_dirs(sweep_dir)
    assert len(members) == 3 and all(os.path.exists(os.path.join(d, "results.json")) for d in members.values())
    logs = {name: open(os.path.join(d, "cli.log")).read() for name, d in members.items()}
    skipped = [n for n, text in logs.items() if "finished before" in text]
    resumed = [n for n, text in logs.items() if "resumed from" in text]
    assert skipped and resumed and not set(skipped) & set(resumed)
    for name in skipped:  # trained once, by the killed sweep
        assert logs[name].count("training topk SAE") == 1

    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("sae-dist").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    per_member: dict[str, list[str]] = {}
    for run in runs:
        if run.data.tags.get("mlflow.parentRunId") != parent.info.run_id:
            continue
        per_member.setdefault(run.data.tags["sae_dist.sweep_member"], []).append(run.info.status)
    for name in skipped:
        assert per_member[name] == ["FINISHED"]
    for name in resumed:  # the killed attempt ended FAILED (Ray interrupted the task) or KILLED (marked on rerun)
        statuses = list(per_member[name])
        statuses.remove("FINISHED")
        assert statuses in (["FAILED"], ["KILLED"])
    report = (sweep_dir / "report" / "sweep_report.csv").read_text().splitlines()
    assert len(report) == 4
