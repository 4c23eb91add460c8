"""An LM shard: one model replica, the chunks j with j % n_shards == shard. A plain class; the launcher
makes it a Ray actor (`ray.remote(...)(ActivationProducer)`), so it is unit-tested without Ray."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from sae_dist.config import DataConfig, ModelConfig

log = logging.getLogger(__name__)


class ActivationProducer:
    def __init__(
        self, model_cfg: ModelConfig, data_cfg: DataConfig, shard: int, n_shards: int, split: str = "train",
        threads: int = 0, cache_url: str = "",
    ) -> None:
        from sae_dist.data.lm import LMActivationSource

        if threads:
            torch.set_num_threads(threads)
        if not 0 <= shard < n_shards:
            raise ValueError(f"producer shard ({shard}) must be in [0, n_shards ({n_shards}))")
        self.source = LMActivationSource(model_cfg, data_cfg, split)
        self.cache = None
        if cache_url:
            from sae_dist.data.cache import CacheWriter

            self.cache = CacheWriter(f"{cache_url.rstrip('/')}/{split}")
        self.shard, self.n_shards = shard, n_shards
        self.batch_contexts = model_cfg.batch_contexts
        self._batches: Iterator[tuple[int, list[list[int]]]] | None = None
        self._next_chunk = -1
        self.busy_s = 0.0
        self.served = 0
        self.started = time.perf_counter()

    @property
    def d_model(self) -> int:
        return self.source.d_model

    def chunk(self, index: int) -> Tensor:
        """Activations of chunk `index` (tokens, d). Pure in `index`: a retry after a restart gives the
        same tensor."""
        if index % self.n_shards != self.shard:
            raise ValueError(f"chunk {index} belongs to shard {index % self.n_shards}, not {self.shard}")
        t0 = time.perf_counter()
        if self._batches is None or index < self._next_chunk:
            self._batches = self.source.context_batches(index * self.batch_contexts)
            self._next_chunk = index
        for _pos, contexts in self._batches:
            current = self._next_chunk
            self._next_chunk += 1
            if current == index:
                acts = self.source.activations(contexts)
                if self.cache is not None and not self.cache.has(index):
                    self.cache.put(index, acts)
                self._skip_to_own_next()
                self.busy_s += time.perf_counter() - t0
                self.served += 1
                return acts
        raise IndexError(f"chunk {index} is past the end of the {self.source.cycle and 'train' or 'held-out'} text")

    def _skip_to_own_next(self) -> None:
        """Tokenise past the other shards' chunks now, so the next request starts at our chunk."""
        assert self._batches is not None
        for _ in range(self.n_shards - 1):
            if next(self._batches, None) is None:
                return
            self._next_chunk += 1

    def stats(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.started
        return {"shard": self.shard, "served": self.served, "busy_s": self.busy_s, "idle_fraction": 1 - self.busy_s / max(wall, 1e-9)}

    def width(self) -> int:
        return self.source.d_model
