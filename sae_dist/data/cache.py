"""Activation cache: safetensors shards plus an `index.json`, at any fsspec URL or path.

Write one with `sae-dist cache` (or `write_cache`); train from it with data.source=cache. A shard is one
tensor `activations` (tokens, d); position = shards consumed. Nothing here unpickles.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from sae_dist.config import ConfigError

log = logging.getLogger(__name__)


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def write_cache(
    chunks: Iterator[tuple[Tensor, int]], url: str, total_tokens: int, meta: dict[str, Any], shard_tokens: int = 65536
) -> dict[str, Any]:
    """Writes shards of about `shard_tokens` until `total_tokens`; index.json last, so a cache without
    one is incomplete."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    shards: list[dict[str, Any]] = []
    pending: list[Tensor] = []
    have = written = 0
    d_model = 0

    def flush() -> None:
        nonlocal pending, have, written
        acts = torch.cat(pending)
        name = f"shard-{len(shards):05d}.safetensors"
        with fs.open(_join(root, name), "wb") as fh:
            fh.write(st_save({"activations": acts.contiguous()}))
        shards.append({"file": name, "tokens": int(acts.shape[0])})
        written += int(acts.shape[0])
        pending, have = [], 0

    for acts, _pos in chunks:
        d_model = int(acts.shape[1])
        acts = acts[: total_tokens - written - have]
        pending.append(acts)
        have += int(acts.shape[0])
        if have >= shard_tokens:
            flush()
        if written + have >= total_tokens:
            break
    if pending:
        flush()
    index = {**meta, "d_model": d_model, "tokens": written, "shards": shards, "format": "sae-dist-cache-v1"}
    with fs.open(_join(root, "index.json"), "w") as fh:
        json.dump(index, fh, indent=1)
    return index


class CachedSource:
    def __init__(self, url: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(url)
        index_path = _join(self.root, "index.json")
        if not self.fs.exists(index_path):
            raise ConfigError(
                f"data.cache_dir ({url!r}) holds no index.json (missing or incomplete cache); "
                "write one with `sae-dist cache` first"
            )
        with self.fs.open(index_path) as fh:
            self.index = json.load(fh)
        self.d_model = int(self.index["d_model"])
        if not self.index["shards"]:
            raise ConfigError(f"data.cache_dir ({url!r}) has no shards; write a non-empty cache")

    def chunks(self, start: int = 0) -> Iterator[tuple[Tensor, int]]:
        shards = self.index["shards"]
        pos = start
        while True:
            entry = shards[pos % len(shards)]
            with self.fs.open(_join(self.root, entry["file"]), "rb") as fh:
                acts = st_load(fh.read())["activations"].float()
            pos += 1
            yield acts, pos
