"""Batches for the trainer: a block shuffle buffer over any source's chunks, resumable exactly.

A block is filled with whole chunks until it holds `buffer_tokens`, permuted by an RNG seeded from
(seed, block number) and cut into batches. The state is (block number, source position at the block's
start, batches already taken from it): resuming re-reads that one block and skips what was used, so
the batches after a resume are exactly those of an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor


class Source(Protocol):
    d_model: int
    n_sites: int
    """0: chunks are (tokens, d); S: (tokens, S, d), the sites of model.sites in order."""

    def chunks(self, start: int = 0) -> Iterator[tuple[Tensor, int]]: ...


class BatchStream:
    def __init__(self, source: Source, batch_tokens: int, buffer_tokens: int, seed: int = 0) -> None:
        self.source = source
        self.batch_tokens = batch_tokens
        self.buffer_tokens = max(buffer_tokens, batch_tokens)
        self.seed = seed
        self.block, self.block_start, self.taken = 0, 0, 0
        self.shuffle = buffer_tokens > 0

    def state_dict(self) -> dict[str, Any]:
        return {"block": self.block, "block_start": self.block_start, "taken": self.taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.block, self.block_start, self.taken = state["block"], state["block_start"], state["taken"]

    def __iter__(self) -> Iterator[Tensor]:
        chunks = self.source.chunks(self.block_start)
        while True:
            parts, have, pos = [], 0, self.block_start
            for acts, end in chunks:
                pos = end
                parts.append(acts)
                have += acts.shape[0]
                if have >= self.buffer_tokens:
                    break
            if have < self.batch_tokens:
                return
            block = torch.cat(parts)  # (T, d) or (T, sites, d): rows are tokens either way
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.block)
                block = block[torch.randperm(block.shape[0], generator=g)]
            n_batches = block.shape[0] // self.batch_tokens
            while self.taken < n_batches:
                b = self.taken
                self.taken += 1
                yield block[b * self.batch_tokens : (b + 1) * self.batch_tokens]
            self.block, self.block_start, self.taken = self.block + 1, pos, 0
