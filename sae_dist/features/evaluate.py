"""`sae-dist eval`: held-out reconstruction metrics (sae_dist.metrics) plus the spliced-model metrics
(sae_dist.features.splice) and the feature-frequency histogram, written to <out>/metrics.json and
<out>/feature_density.png."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch
from tqdm import tqdm

from sae_dist.features.core import core_result
from sae_dist.features.replace import SiteSplice
from sae_dist.features.source import FeatureSetup
from sae_dist.features.splice import SpliceMeter
from sae_dist.metrics import MAX_COS_LATENTS, HeldoutMeter, weight_metrics

log = logging.getLogger(__name__)


def evaluate_setup(setup: FeatureSetup, tokens: int = 0, batch_contexts: int = 0, corpus: str = "",
                   split: str = "heldout") -> tuple[dict[str, Any], HeldoutMeter, SpliceMeter]:
    """Metrics over the run's held-out set (sae_dist.data.heldout; `tokens`, `batch_contexts` and
    `corpus` override its own), with the two meters (firings per latent, batches read). The held-out
    metrics count exactly its first `tokens` tokens, as the end-of-training evaluation does; the
    spliced-model metrics read the contexts those tokens come from."""
    if setup.settings.get("source", "lm") != "lm":
        log.warning("the run trained on data.source=%s; sae-dist eval reads the held-out documents through the LM, "
                    "so its figures match the training's only if that source held the same activations",
                    setup.settings["source"])
    tokens = tokens or int(setup.settings["tokens"])
    batch_contexts = batch_contexts or int(setup.settings["batch_contexts"])
    heldout = HeldoutMeter(setup.sae.eval(), tokens)
    if setup.cfg.get("sites"):  # a transcoder or CLT: the replacement model (sae_dist.features.replace)
        splice = SiteSplice(setup.model, setup.sae, setup.cfg["sites"], heldout)
        meter = SpliceMeter(setup.model, None, setup.sae, setup.causal, sites=splice)
    else:
        meter = SpliceMeter(setup.model, setup.module, setup.sae, setup.causal, heldout)
    special = setup.special_ids()
    with tqdm(total=tokens, desc="eval", unit="tok", disable=None) as bar:
        for ids in setup.context_batches(split, batch_contexts, corpus):
            meter.add(ids, ~torch.isin(ids, special))
            bar.update(int(heldout.count) - bar.n)
            if heldout.full:
                break
    if not heldout.full:
        log.warning("the %s split has only %d tokens (asked for %d)", split, heldout.count, tokens)
    return heldout.result() | meter.result(), heldout, meter


def save_density_plot(fired: torch.Tensor, tokens: int, path: str) -> bool:
    """Histogram of log10 firing frequency per latent (dead latents counted in the title)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'sae-dist[plots]'): no %s", path)
        return False
    freq = fired.double() / max(tokens, 1)
    alive = freq[freq > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(alive.log10().numpy(), bins=50, color="#d97706")
    ax.set_xlabel("log10 firing frequency (fraction of tokens)")
    ax.set_ylabel("latents")
    ax.set_title(f"{len(alive)} latents fired, {int((freq == 0).sum())} never fired, {tokens} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_eval(setup: FeatureSetup, out_dir: str, tokens: int = 0, batch_contexts: int = 0,
             corpus: str = "", max_cos_latents: int = MAX_COS_LATENTS) -> dict[str, Any]:
    """Writes <out_dir>/metrics.json (the flat figures), core.json (SAEBench's core result) and
    feature_density.png; returns the flat figures."""
    os.makedirs(out_dir, exist_ok=True)
    results, heldout, splice = evaluate_setup(setup, tokens, batch_contexts, corpus)
    n = int(results["tokens"])
    weights = weight_metrics(setup.sae, max_cos_latents)
    results |= weights
    settings = setup.settings | {"tokens": tokens or setup.settings["tokens"], "corpus": corpus or setup.settings["corpus"],
                                 "batch_contexts": batch_contexts or setup.settings["batch_contexts"]}
    if not setup.cfg.get("sites"):  # SAEBench's core result describes an SAE of one site
        core = core_result(results, weights, settings, setup.cfg, splice.batches, splice.positions)
        _write_json(os.path.join(out_dir, "core.json"), core)
    if save_density_plot(heldout.fired, n, os.path.join(out_dir, "feature_density.png")):
        results["density_plot"] = os.path.join(out_dir, "feature_density.png")
    results["model_name"], results["hook_name"] = setup.cfg["model_name"], setup.cfg["hook_name"]
    if setup.cfg.get("sites"):
        results["sites"] = setup.cfg["sites"]
    _write_json(os.path.join(out_dir, "metrics.json"), results)
    return results


def _write_json(path: str, obj: Any) -> None:
    """JSON with NaN written as null (the standard has no NaN)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return [clean(x) for x in v] if isinstance(v, list) else v

    with open(path, "w") as fh:
        json.dump(clean(obj), fh, indent=1)
