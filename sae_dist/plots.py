"""Training curves as a PNG for the run's MLflow artifacts (matplotlib, the `plots` extra)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

PANELS = (("train/fvu", "FVU"), ("train/l0", "L0"), ("train/dead_fraction", "dead fraction"), ("train/lr", "lr"))


def plot_training(logged: list[dict[str, Any]], path: str) -> bool:
    """FVU, L0, dead fraction and learning rate against step; False when there is nothing to plot or
    matplotlib is missing."""
    if not logged:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no training-curve plot (pip install 'sae-dist[plots]')")
        return False
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3))
    steps = [row["step"] for row in logged]
    for ax, (key, title) in zip(axes, PANELS):
        ax.plot(steps, [row.get(key, float("nan")) for row in logged], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
