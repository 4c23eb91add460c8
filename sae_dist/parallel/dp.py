"""Data parallelism over the dp axis: gradient averaging for the torch engine, and disjoint data.

Each replica's loss is its share of the global batch's FVU (`FeatureParallelComm.data_variance`), so
averaging gradients over replicas gives exactly the gradient of one replica training on the
concatenated batch. Tokens since a latent last fired count the global batch, so the fired masks are
OR-ed over replicas: the dead set, and with it AuxK, is the same on every replica.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from sae_dist.data.stream import Source
from sae_dist.parallel.dims import Mesh


class DataParallel:
    """`reduce` averages the gradients over replicas in place and ORs the fired mask: each weight
    matrix's gradient is all-reduced in place (no copy of the big tensors) and every small gradient
    plus the mask share one flat buffer, so a step costs a fixed three all-reduces whatever n_latents."""

    def __init__(self, mesh: Mesh) -> None:
        self.size = mesh.dp
        self.group = mesh.group("dp")

    def reduce(self, params: list[Tensor], fired: Tensor | None) -> Tensor | None:
        if self.group is None:
            return fired
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for g in grads:
            if g.dim() >= 2:
                dist.all_reduce(g, group=self.group)
                g.div_(self.size)
        small = [g for g in grads if g.dim() < 2]
        dtype = small[0].dtype if small else torch.float32
        flat = torch.cat([g.reshape(-1) for g in small] + ([fired.to(dtype)] if fired is not None else []))
        dist.all_reduce(flat, group=self.group)
        pos = 0
        for g in small:
            g.copy_(flat[pos : pos + g.numel()].view_as(g)).div_(self.size)
            pos += g.numel()
        return flat[pos:] > 0 if fired is not None else None

    def any(self, fired: Tensor | None) -> Tensor | None:
        """The fired mask OR-ed over replicas (for engines that reduce gradients themselves)."""
        if self.group is None or fired is None:
            return fired
        out = fired.to(torch.uint8)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out.bool()


class ReplicaSource:
    """The source's chunks dealt round-robin: of each run of n chunks, replica r takes the r-th, so
    replicas never share a chunk and the fp ranks of one replica read the same ones. A position is the
    source's position after a whole run, so a replica's stream state resumes like a single process's.
    Every replica still reads the others' chunks: cheap for synthetic and cached data, an n-fold LM
    cost for data.source=lm (the Ray pipeline hands each replica its own chunks instead)."""

    def __init__(self, source: Source, replica: int, n_replicas: int) -> None:
        self.source, self.replica, self.n_replicas = source, replica, n_replicas
        self.d_model = source.d_model
        self.n_sites = getattr(source, "n_sites", 0)

    def chunks(self, start: int = 0) -> Iterator[tuple[Tensor, int]]:
        it = self.source.chunks(start)
        while True:
            run = list(itertools.islice(it, self.n_replicas))
            if len(run) < self.n_replicas:
                return
            yield run[self.replica][0], run[-1][1]
