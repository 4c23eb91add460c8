"""Activation sources behind one interface: `chunks(start) -> (activations (T, d), position)`.

`build_source` picks one from the config; `BatchStream` turns any of them into shuffled batches.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from sae_dist.config import Config
from sae_dist.data.stream import BatchStream, Source


def build_source(cfg: Config, split: str = "train") -> Source:
    """The configured source in this process (the Ray producers' stream is built by the runner that
    starts them: sae_dist.pipeline)."""
    if cfg.data.source == "synthetic":
        from sae_dist.data.synthetic import SyntheticSource

        d = cfg.data
        stream = 1 if split == "heldout" else 0
        return SyntheticSource(cfg.model.d_model, d.synthetic_n_features, d.synthetic_k, cfg.trainer.seed, stream,
                               sites=d.synthetic_sites)
    if cfg.data.source == "cache":
        from sae_dist.data.cache import CachedSource

        return CachedSource(cfg.data.cache_dir.rstrip("/") + "/" + split, cycle=split != "heldout")
    from sae_dist.data.lm import LMActivationSource

    return LMActivationSource(cfg.model, cfg.data, split)


def heldout_batches(cfg: Config) -> Iterator[Tensor]:
    """Every held-out chunk, whole and in order (evaluation reads each token once, drops none)."""
    return (acts for acts, _ in build_source(cfg, "heldout").chunks())


__all__ = ["BatchStream", "Source", "build_source", "heldout_batches"]
