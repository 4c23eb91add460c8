"""Preemption: SIGTERM (Kubernetes, Ray node draining, spot reclaim) or SIGINT asks the job to stop.

Every rank finishes the step it is in, the ranks agree to stop at the same step (`Mesh.any`), a
checkpoint of that step is written synchronously within checkpoint.preempt_grace_s of the signal, the
tracker marks the run KILLED, and the process exits with PREEMPTED_EXIT. `checkpoint.resume_from=latest`
then continues bit-exactly. A second signal exits at once (the checkpoints before stay loadable: a step
becomes visible only when its manifest is written).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75
"""Exit status of a preempted run that saved its checkpoint (EX_TEMPFAIL: "try again"), distinct from a
failure (1), a config error (2) and a death by the signal itself (128 + signal number)."""

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptedError(RuntimeError):
    """The run stopped on a signal after checkpointing; `checkpoint` is the step folder to resume from."""

    def __init__(self, step: int, checkpoint: str | None, signum: int) -> None:
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint or 'none'} "
            "(resume with checkpoint.resume_from=latest)"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray actors: pickles with its fields
        return PreemptedError, (self.step, self.checkpoint, self.signum)


class Preemption:
    """The signal handlers of one training run (a context manager). `requested()` is this process's
    flag; the loop asks the mesh whether any rank has it. Outside the main thread (where Python cannot
    install handlers) it does nothing and says so."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.signum = 0
        self.at: float | None = None
        """time.monotonic() of the first signal."""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is not threading.main_thread():
            log.info("not the main thread: SIGTERM/SIGINT keep their default handlers (no preemption checkpoint)")
            return self
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.at is not None:
            log.warning("second %s: exiting now, without a checkpoint", signal.Signals(signum).name)
            os._exit(128 + signum)
        self.signum, self.at = signum, time.monotonic()
        log.warning("%s: finishing this step, then checkpointing within %.0fs (checkpoint.preempt_grace_s)",
                    signal.Signals(signum).name, self.grace_s)

    def requested(self) -> bool:
        return self.at is not None

    def deadline(self) -> float:
        """When the checkpoint must be written: grace_s after the signal (after now on ranks that did
        not get one themselves)."""
        return (self.at if self.at is not None else time.monotonic()) + self.grace_s
