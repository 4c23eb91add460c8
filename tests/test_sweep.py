"""Sweeps with Hydra's basic launcher: one MLflow parent run, a child run per member, the report on the
parent; the same command again skips finished members."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from sae_dist.sweep_report import pareto_frontier, write_report

TINY = ["data=synthetic", "model.d_model=16", "sae.k=4", "trainer.total_tokens=2048", "trainer.batch_tokens=256",
        "trainer.eval_tokens=512", "trainer.scale_tokens=256", "trainer.warmup_tokens=512", "data.shuffle_buffer_tokens=0"]


def test_three_member_sweep_leaves_parent_and_child_runs_with_plots_and_reruns_as_skips(tmp_path):
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "sae_dist", "-m", *TINY, "sae.n_latents=64,128,256", f"tracking.uri={db}",
           "tracking.frontier=explained_variance", f"hydra.sweep.dir={tmp_path}/sweep"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]

    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("sae-dist").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(runs) == 4
    assert sorted(int(r.data.params["sae.n_latents"]) for r in children) == [64, 128, 256]
    assert {r.info.run_name for r in children} == {"sae.n_latents=64", "sae.n_latents=128", "sae.n_latents=256"}
    assert all(r.info.status == "FINISHED" and "eval.fvu" in r.data.metrics for r in children)
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert report == {f"report/{f}" for f in ("sweep_report.csv", "sweep_report.md", "fvu_vs_n_latents.png",
                                              "explained_variance_l0_frontier.png", "dead_fraction.png")}
    table = list(csv.DictReader((tmp_path / "sweep" / "report" / "sweep_report.csv").open()))
    for row in table:  # SAEBench's core metrics, as each member's run logged them
        assert float(row["explained_variance"]) == pytest.approx(1 - float(row["fvu"]), abs=1e-9)
        assert 0 < float(row["cossim"]) <= 1 and 0 < float(row["frac_alive"]) <= 1
        assert -1 <= float(row["average_max_decoder_cosine_sim"]) <= 1
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.name[0].isdigit()) == [
        "0_sae.n_latents=64", "1_sae.n_latents=128", "2_sae.n_latents=256"]

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished before") + again.stderr.count("finished before") == 3
    runs = client.search_runs([parent.info.experiment_id])
    assert len(runs) == 4 and client.get_run(parent.info.run_id).info.status == "FINISHED"


def _row(name, n, l0, fvu, dead=0.0, **swept):
    return {"member": name, "run_name": name, "n_latents": n, "k": 4, "arch": "topk", "fvu": fvu, "l0": l0,
            "dead_fraction": dead, "train_tokens": 1, "run_id": name, "swept": swept}


def test_pareto_frontier_keeps_members_no_other_beats_on_l0_and_fvu():
    rows = [_row("a", 64, 8, 0.30), _row("b", 64, 16, 0.20), _row("c", 64, 16, 0.25), _row("d", 64, 32, 0.22)]
    assert [r["member"] for r in pareto_frontier(rows)] == ["a", "b"]
    for r in rows:  # a metric where higher is better
        r["explained_variance"] = 1 - r["fvu"]
    assert [r["member"] for r in pareto_frontier(rows, "explained_variance")] == ["a", "b"]


def test_an_unknown_frontier_metric_is_refused_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sae_dist", *TINY, "tracking.frontier=accuracy",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "tracking.frontier ('accuracy') must be one of fvu" in proc.stderr
    assert not (tmp_path / "sae").exists()


def test_report_table_has_a_column_per_swept_key(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row("0", 64, 4, 0.5, **{"sae.k": "4"}), _row("1", 128, 8, 0.4, **{"sae.k": "8"})]
    files = write_report(rows, str(tmp_path), ["sae.n_latents", "sae.k"])
    header, first, _ = (tmp_path / "sweep_report.csv").read_text().splitlines()
    assert header.split(",")[:3] == ["member", "run_name", "sae.k"] and first.split(",")[2] == "4"
    assert sorted(f.rsplit("/", 1)[-1] for f in files if f.endswith(".png")) == [
        "dead_fraction.png", "fvu_l0_frontier.png", "fvu_vs_n_latents.png", "fvu_vs_sae_k.png"]


def test_a_learning_rate_sweep_gets_fvu_against_lr_and_a_named_sweep_does_not(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row(str(i), 64, 4, fvu, **{"trainer.lr": lr, "sae.arch": arch})
            for i, (lr, fvu, arch) in enumerate([("0.001", 0.3, "topk"), ("0.004", 0.2, "batchtopk"), ("0.016", 0.25, "topk")])]
    files = write_report(rows, str(tmp_path), ["trainer.lr", "sae.arch"])
    names = sorted(f.rsplit("/", 1)[-1] for f in files if f.endswith(".png"))
    assert "fvu_vs_trainer_lr.png" in names and "fvu_vs_sae_arch.png" not in names
    assert (tmp_path / "fvu_vs_trainer_lr.png").stat().st_size > 1000
