"""Activation cache: one safetensors shard per source chunk plus an `index.json`, at any fsspec URL.

Shard j holds chunk j of the source (tensor `activations`, (tokens, d), or (tokens, sites, d) for a
multi-site source: every site of a token in one row, so the sites share one token order by
construction and a chunk is one read), so training from a cache sees
the same chunks in the same order as training from the live stream it was written from. Write one with
`sae-dist cache`, or let the pipeline's producers write each chunk as they make it
(cluster.cache_url). index.json is written last: a cache without one is incomplete. It records each
shard's token count, size and sha256, which reading checks (caches from before the checksums were
recorded are checked for a readable (tokens, d_model) `activations` tensor only). Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import fsspec
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from sae_dist.config import ConfigError
from sae_dist.storage import redact

log = logging.getLogger(__name__)

FORMAT = "sae-dist-cache-v2"


class CacheError(RuntimeError):
    """A cache shard is unreadable or differs from its index; the message names the shard and the fix."""


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def shard_name(index: int) -> str:
    return f"chunk-{index:06d}.safetensors"


class CacheWriter:
    """Writes chunk shards under `url`; `finish` writes the index of chunks 0..n-1."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)

    def put(self, index: int, acts: Tensor) -> None:
        path = _join(self.root, shard_name(index))
        tmp = path + ".partial"
        with self.fs.open(tmp, "wb") as fh:
            fh.write(st_save({"activations": acts.contiguous()}))
        self.fs.mv(tmp, path)

    def has(self, index: int) -> bool:
        return self.fs.exists(_join(self.root, shard_name(index)))

    def contiguous(self) -> int:
        """Number of shards 0, 1, ... present without a gap."""
        n = 0
        while self.has(n):
            n += 1
        return n

    def finish(self, n_chunks: int, meta: dict[str, Any]) -> dict[str, Any]:
        shards = []
        d_model = tokens = n_sites = 0
        for j in range(n_chunks):
            path = _join(self.root, shard_name(j))
            if not self.fs.exists(path):
                raise FileNotFoundError(f"cache {self.url}: chunk {j} was never written ({path})")
            with self.fs.open(path, "rb") as fh:
                data = fh.read()
            acts = st_load(data)["activations"]
            d_model = int(acts.shape[-1])
            n_sites = int(acts.shape[1]) if acts.dim() == 3 else 0
            shards.append({"file": shard_name(j), "tokens": int(acts.shape[0]), "size": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
            tokens += int(acts.shape[0])
        index = {**meta, "d_model": d_model, "n_sites": n_sites, "tokens": tokens, "shards": shards, "format": FORMAT}
        with self.fs.open(_join(self.root, "index.json"), "w") as fh:
            json.dump(index, fh, indent=1)
        return index


def write_cache(chunks: Iterator[tuple[Tensor, int]], url: str, total_tokens: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Writes whole chunks until at least `total_tokens` tokens; the index last."""
    writer = CacheWriter(url)
    n = have = 0
    for acts, _pos in chunks:
        writer.put(n, acts)
        n += 1
        have += int(acts.shape[0])
        if have >= total_tokens:
            break
    return writer.finish(n, meta)


class CachedSource:
    """Position = chunks consumed; cycles over the cache like the LM source cycles over its corpus, or, with
    `cycle=False` (the held-out split), ends after the last shard so that evaluation counts each token once."""

    def __init__(self, url: str, cycle: bool = True) -> None:
        self.url, self.cycle = url, cycle
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
        self.n_sites = int(self.index.get("n_sites", 0))
        """Sites per token: 0 for (tokens, d) chunks, S for (tokens, S, d)."""
        if not self.index["shards"]:
            raise ConfigError(f"data.cache_dir ({url!r}) has no shards; write a non-empty cache")

    def chunks(self, start: int = 0) -> Iterator[tuple[Tensor, int]]:
        shards = self.index["shards"]
        pos = start
        while self.cycle or pos < len(shards):
            entry = shards[pos % len(shards)]
            with self.fs.open(_join(self.root, entry["file"]), "rb") as fh:
                acts = self._verified(entry, fh.read()).float()
            pos += 1
            yield acts, pos

    def _verified(self, entry: dict[str, Any], data: bytes) -> Tensor:
        """The shard's activations, checked against its index entry."""
        where = redact(_join(self.url, entry["file"]))
        fix = f"re-create the cache: `sae-dist cache data.cache_dir={redact(self.url.rsplit('/', 1)[0])}`"
        if "sha256" in entry and (len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]):
            raise CacheError(
                f"cache shard {where} does not match its index ({len(data)} bytes, {entry['size']} recorded, "
                f"or another sha256): corrupt or overwritten; {fix}"
            )
        try:
            acts = st_load(data)["activations"]
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CacheError(f"cache shard {where} is not a readable safetensors file ({err}); {fix}") from err
        want = (entry["tokens"], self.n_sites, self.d_model) if self.n_sites else (entry["tokens"], self.d_model)
        if tuple(acts.shape) != want or not acts.is_floating_point():
            dims = "(tokens, sites, d_model)" if self.n_sites else "(tokens, d_model)"
            raise CacheError(
                f"cache shard {where} holds {acts.dtype} activations of shape {tuple(acts.shape)}, the index "
                f"says {dims} = {want}; {fix}"
            )
        return acts
