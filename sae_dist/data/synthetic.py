"""Activations made from a known sparse dictionary, for ground-truth tests of the trainer."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


class SyntheticSource:
    """x = sum of `k` random unit directions (of `n_features`) with magnitudes in [0.5, 1.5).

    The dictionary depends on `seed` only; chunk i of stream s (0 = train, 1 = held-out) is a pure
    function of (seed, s, i), so a position is enough to resume. With `sites` = S >= 2 each token is
    (S, d): the same codes written through S dictionaries (`dictionaries`, (S, F, d); site 0's is
    `dictionary`), as an MLP's input and output share the latents a transcoder should find."""

    def __init__(
        self, d_model: int, n_features: int, k: int, seed: int = 0, stream: int = 0, chunk_tokens: int = 4096,
        sites: int = 0,
    ) -> None:
        self.d_model, self.n_features, self.k = d_model, n_features, k
        self.seed, self.stream, self.chunk_tokens = seed, stream, chunk_tokens
        self.n_sites = sites
        g = torch.Generator().manual_seed(seed)
        D = torch.randn(max(sites, 1), n_features, d_model, generator=g)
        self.dictionaries = D / D.norm(dim=2, keepdim=True)  # (S, F, d) the true features of each site
        self.dictionary = self.dictionaries[0]

    def chunk(self, i: int) -> Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.stream) * 1_000_003 + i + 1)
        T = self.chunk_tokens
        ids = torch.rand(T, self.n_features, generator=g).topk(self.k, dim=1).indices  # (T, k) distinct
        mags = 0.5 + torch.rand(T, self.k, generator=g)
        x = [torch.nn.functional.embedding_bag(ids, D, per_sample_weights=mags, mode="sum") for D in self.dictionaries]
        return torch.stack(x, dim=1) if self.n_sites else x[0]

    def chunks(self, start: int = 0) -> Iterator[tuple[Tensor, int]]:
        i = start
        while True:
            yield self.chunk(i), i + 1
            i += 1
