"""The sweep report: FVU against n_latents, the L0 frontier of FVU or of any held-out core metric
(tracking.frontier) and the dead fraction, as PNG plots (matplotlib, the `plots` extra) and a table
(CSV + markdown) with SAEBench's core metrics as the members' MLflow runs logged them. `SweepCallback` writes it at the end of
a sweep and logs it on the parent MLflow run; from a finished sweep's store:

    python -c "from sae_dist.sweep_report import report_from_store as r; r('sqlite:///multirun/x/mlflow.db', '<parent run id>', 'out')"
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import defaultdict
from typing import Any

log = logging.getLogger(__name__)

COLUMNS = ("member", "run_name", "n_latents", "k", "arch", "fvu", "l0", "dead_fraction", "train_tokens", "run_id")
CORE_COLUMNS = ("explained_variance", "mse", "cossim", "l2_ratio", "relative_reconstruction_bias", "l1", "frac_alive",
                "freq_over_1_percent", "freq_over_10_percent", "average_max_encoder_cosine_sim",
                "average_max_decoder_cosine_sim")
"""SAEBench core metrics of the held-out set that each member's run logs at the end of training."""
HIGHER_IS_BETTER = ("explained_variance", "explained_variance_legacy", "cossim", "frac_alive")
FRONTIER_METRICS = ("fvu", "explained_variance", "explained_variance_legacy", "mse", "cossim", "l2_ratio",
                    "relative_reconstruction_bias", "l1", "frac_alive", "dead_fraction", "freq_over_1_percent",
                    "freq_over_10_percent", "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim")
"""What the frontier plot can put against L0 (tracking.frontier)."""


def collect_rows(client: Any, parent_run_id: str) -> list[dict[str, Any]]:
    """One row per member: its newest child run that reached the final evaluation (a member killed
    after evaluating and then skipped on resume still counts)."""
    from sae_dist.sweep import MEMBER_TAG, SWEPT_TAG

    exp_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=50000)
    newest: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        if "eval.fvu" in run.data.metrics:
            newest[run.data.tags.get(MEMBER_TAG, run.info.run_id)] = run
    rows = []
    for member, run in sorted(newest.items()):
        m, p = run.data.metrics, run.data.params
        rows.append({
            "member": member, "run_name": run.info.run_name, "n_latents": int(p.get("sae.n_latents", 0)),
            "k": int(p.get("sae.k", 0)), "arch": p.get("sae.arch", ""), "fvu": m["eval.fvu"],
            "l0": m.get("eval.l0", float("nan")), "dead_fraction": m.get("eval.dead_fraction", float("nan")),
            "train_tokens": int(p.get("trainer.total_tokens", 0)), "run_id": run.info.run_id,
            "swept": json.loads(run.data.tags.get(SWEPT_TAG, "{}")),
        } | {k: m.get(f"eval.{k}", float("nan")) for k in FRONTIER_METRICS if k not in ("fvu", "dead_fraction")})
    return rows


def write_report(rows: list[dict[str, Any]], out_dir: str, swept_keys: list[str], frontier: str = "fvu") -> list[str]:
    """sweep_report.csv / .md and, with matplotlib, fvu_vs_n_latents.png, <frontier>_l0_frontier.png,
    dead_fraction.png, and fvu_vs_<key>.png for each other swept key with numeric values (e.g.
    fvu_vs_trainer_lr.png). Returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["n_latents"], r["member"]))
    extra = [k for k in swept_keys if k != "sae.n_latents"]
    header = list(COLUMNS[:2]) + extra + list(COLUMNS[2:-1]) + list(CORE_COLUMNS) + [COLUMNS[-1]]
    table = [[r.get(c, r["swept"].get(c, "")) for c in header] for r in rows]
    written = [os.path.join(out_dir, "sweep_report.csv"), os.path.join(out_dir, "sweep_report.md")]
    with open(written[0], "w", newline="") as fh:
        csv.writer(fh).writerows([header, *table])
    with open(written[1], "w") as fh:
        fh.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
        for line in table:
            fh.write("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in line) + " |\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: sweep report without plots (pip install 'sae-dist[plots]')")
        return written
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:  # one line per combination of the other swept values
        groups[",".join(f"{k}={r['swept'].get(k, '')}" for k in extra) or "sweep"].append(r)
    for name, y, label in (("fvu_vs_n_latents", "fvu", "held-out FVU"), ("dead_fraction", "dead_fraction", "dead fraction")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for group, members in groups.items():
            ax.plot([r["n_latents"] for r in members], [r[y] for r in members], "o-", label=group)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n_latents")
        ax.set_ylabel(label)
        if len(groups) > 1:
            ax.legend(fontsize=7)
        written.append(_save(fig, out_dir, name))
    for key in extra:  # FVU against each other numeric swept value (a learning-rate sweep), one line per n
        by_n: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            value = _number(r["swept"].get(key))
            if value is not None:
                by_n[r["n_latents"]].append((value, r["fvu"]))
        if not by_n:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for n, points in sorted(by_n.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"n={n}")
        if all(p[0] > 0 for points in by_n.values() for p in points):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("held-out FVU")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir, f"fvu_vs_{key.replace('.', '_')}"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter([r["l0"] for r in rows], [r[frontier] for r in rows])
    for r in rows:
        ax.annotate(r["run_name"], (r["l0"], r[frontier]), fontsize=6)
    front = pareto_frontier(rows, frontier)
    ax.plot([r["l0"] for r in front], [r[frontier] for r in front], "rx--", label="frontier")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(f"held-out {frontier}")
    ax.legend(fontsize=7)
    written.append(_save(fig, out_dir, f"{frontier}_l0_frontier"))
    return written


def _number(value: Any) -> float | None:
    """A swept value as a number, or None (a name, a list)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def pareto_frontier(rows: list[dict[str, Any]], metric: str = "fvu") -> list[dict[str, Any]]:
    """Members no other member beats on both L0 (lower is better) and `metric` (lower is better, or
    higher for HIGHER_IS_BETTER), by L0."""
    sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0
    front: list[dict[str, Any]] = []
    for r in sorted(rows, key=lambda r: (r["l0"], sign * r[metric])):
        if not front or sign * r[metric] < sign * front[-1][metric]:
            front.append(r)
    return front


def _save(fig: Any, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_from_store(uri: str, parent_run_id: str, out_dir: str, frontier: str = "fvu") -> list[str]:
    """The report of a sweep already in an MLflow store, written to a local folder."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    keys = client.get_run(parent_run_id).data.tags.get("sae_dist.swept_keys", "")
    return write_report(collect_rows(client, parent_run_id), out_dir, [k for k in keys.split(",") if k], frontier)
