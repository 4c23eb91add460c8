"""The trainer side of the pipeline: an activation source that pulls chunks from producer actors with
at most `max_in_flight` requests outstanding (backpressure: producers only work on requested chunks)."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from typing import Any

from torch import Tensor

log = logging.getLogger(__name__)


class PipelineTimeoutError(TimeoutError):
    """A producer did not deliver in time; says which chunk, for how long, and the setting to change."""


class RayStreamSource:
    """Source protocol over producer actors: chunks(start) yields the same (activations, position)
    sequence as LMActivationSource.chunks(start), with start a multiple of batch_contexts.

    `dp_rank`/`dp_size`: replica r takes chunks j with j % dp_size == r, so replicas draw distinct data."""

    def __init__(
        self, producers: list[Any], d_model: int, batch_contexts: int, max_in_flight: int = 4,
        timeout_s: float = 300.0, dp_rank: int = 0, dp_size: int = 1, n_sites: int = 0,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"cluster.max_in_flight ({max_in_flight}) must be >= 1")
        self.producers = producers
        self.d_model = d_model
        self.n_sites = n_sites
        self.batch_contexts = batch_contexts
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.created = time.perf_counter()
        self.wait_s = 0.0
        """Seconds spent blocked waiting for data (trainer starvation)."""
        self.received: list[int] = []
        """Chunk numbers delivered, in order (tests check that none is lost or repeated)."""

    def for_replica(self, dp_rank: int, dp_size: int) -> RayStreamSource:
        """The same producers, dealing replica `dp_rank` its own chunks (j % dp_size == dp_rank)."""
        return RayStreamSource(self.producers, self.d_model, self.batch_contexts, self.max_in_flight,
                               self.timeout_s, dp_rank, dp_size, self.n_sites)

    def metrics(self) -> dict[str, float]:
        """Trainer starvation (share of wall time blocked on data since the last call) and producer
        idle time, for the tracker."""
        import ray

        now = time.perf_counter()
        last_t, last_wait = getattr(self, "_last", (self.created, 0.0))
        self._last = (now, self.wait_s)
        try:
            stats = ray.get([p.stats.remote() for p in self.producers], timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            raise PipelineTimeoutError(
                f"waited {self.timeout_s:.0f}s for the producers' stats; raise cluster.timeout_s"
            ) from err
        return {
            "pipeline/trainer_starvation": (self.wait_s - last_wait) / max(now - last_t, 1e-9),
            "pipeline/producer_idle_fraction": sum(s["idle_fraction"] for s in stats) / len(stats),
        }

    def _request(self, j: int) -> Any:
        return self.producers[j % len(self.producers)].chunk.remote(j)

    def chunks(self, start: int = 0) -> Iterator[tuple[Tensor, int]]:
        import ray

        if start % self.batch_contexts:
            raise ValueError(f"stream position {start} is not a multiple of model.batch_contexts ({self.batch_contexts})")
        first = start // self.batch_contexts
        numbers = (j for j in _count(first) if j % self.dp_size == self.dp_rank)
        pending: collections.deque[tuple[int, Any]] = collections.deque()
        for j in numbers:
            pending.append((j, self._request(j)))
            if len(pending) < self.max_in_flight:
                continue
            yield self._take(ray, pending)
        while pending:  # pragma: no cover - the stream is infinite on the train split
            yield self._take(ray, pending)

    def _take(self, ray: Any, pending: collections.deque) -> tuple[Tensor, int]:
        j, ref = pending.popleft()
        t0 = time.perf_counter()
        try:
            acts = ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            raise PipelineTimeoutError(
                f"waited {self.timeout_s:.0f}s for activation chunk {j} from producer {j % len(self.producers)}; "
                "raise cluster.timeout_s or add producers (cluster.producers)"
            ) from err
        self.wait_s += time.perf_counter() - t0
        self.received.append(j)
        return acts, (j + 1) * self.batch_contexts


def _count(start: int) -> Iterator[int]:
    j = start
    while True:
        yield j
        j += 1
