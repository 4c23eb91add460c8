"""Checkpoint storage: one fsspec filesystem behind retries, exponential backoff and a per-operation
timeout, so that a slow or absent object store delays a checkpoint instead of hanging or killing the job.

Any fsspec URL works (`file://`, plain paths, `s3://` through s3fs, `gs://`, ...). Credentials come from
the filesystem's own standard sources (for S3: the AWS environment variables and config files); this
module never reads or logs them, and logs URLs with any user-info part masked.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

import fsspec
import fsspec.asyn

log = logging.getLogger(__name__)

try:  # botocore errors that are not OSErrors (EndpointConnectionError, ClientError for 5xx/throttling)
    from botocore.exceptions import BotoCoreError, ClientError

    _BOTO_ERRORS: tuple[type[BaseException], ...] = (BotoCoreError, ClientError)
except ImportError:  # pragma: no cover - s3fs not installed
    _BOTO_ERRORS = ()

RETRYABLE: tuple[type[BaseException], ...] = (OSError, *_BOTO_ERRORS)
"""Storage errors worth retrying; TimeoutError (and fsspec's FSTimeoutError) are OSErrors."""
PERMANENT: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError)
"""Errors that retrying cannot fix: a missing bucket or object, refused credentials."""


class StorageError(RuntimeError):
    """A storage operation kept failing until its deadline."""


def redact(url: str) -> str:
    """The URL with any `user:password@` part masked, for logs."""
    return re.sub(r"//[^/@]*@", "//***@", url)


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


class Storage:
    """Byte-level access to one filesystem. Every operation has a timeout (`op_timeout_s`, enforced by
    cancelling the coroutine on async filesystems such as s3fs, whose PUTs can otherwise wait forever on
    a stalled server) and is retried with exponential backoff until `deadline` (a time.monotonic value)."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        endpoint_url: str = "",
        op_timeout_s: float = 600.0,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
    ) -> None:
        options = dict(storage_options or {})
        if endpoint_url and url.startswith(("s3://", "s3a://")):
            options.setdefault("endpoint_url", endpoint_url)
        self.fs, self.root = fsspec.core.url_to_fs(url, **options)
        self.url = url
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.op_timeout_s, self.retry_initial_s, self.retry_max_s = op_timeout_s, retry_initial_s, retry_max_s
        self.on_retry: Callable[[str, BaseException, int], None] | None = None
        """Called as (operation, error, attempt) before each retry's wait; for metrics and tests."""

    def unstrip(self, path: str) -> str:
        """A path of this filesystem as a URL that `Storage(url)` opens again (local paths stay paths)."""
        return path if self.local else self.fs.unstrip_protocol(path)

    def _run(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if getattr(self.fs, "async_impl", False) and hasattr(self.fs, f"_{name}"):
            return fsspec.asyn.sync(self.fs.loop, getattr(self.fs, f"_{name}"), *args, timeout=self.op_timeout_s, **kwargs)
        return getattr(self.fs, name)(*args, **kwargs)

    def call(self, what: str, deadline: float | None, name: str, *args: Any, **kwargs: Any) -> Any:
        """`fs.<name>(*args)` with retries on storage errors until `deadline` (None: one attempt more
        than the first, for reads that a person is waiting on)."""
        delay, attempt = self.retry_initial_s, 0
        limit = deadline if deadline is not None else time.monotonic() + 2 * self.retry_max_s
        while True:
            attempt += 1
            try:
                return self._run(name, *args, **kwargs)
            except PERMANENT:
                raise
            except RETRYABLE as err:
                why = f"{type(err).__name__}: {err or f'no answer within {self.op_timeout_s}s (checkpoint.op_timeout_s)'}"
                if time.monotonic() + delay > limit:
                    raise StorageError(
                        f"{what} failed {attempt} times, the last with {why}; gave up at the deadline "
                        "(checkpoint.upload_timeout_s)"
                    ) from err
                log.warning("storage: %s failed (%s); retry %d in %.1fs", what, why, attempt, delay)
                if self.on_retry is not None:
                    self.on_retry(what, err, attempt)
                time.sleep(delay)
                delay = min(2 * delay, self.retry_max_s)

    def put(self, path: str, data: bytes | bytearray, deadline: float | None) -> None:
        """Writes one object. Object stores publish a PUT whole or not at all; on a local disk the
        bytes go to a temporary name that is renamed into place, which is atomic too."""
        if self.local:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            tmp = f"{path}.partial"
            self.call(f"write {path}", deadline, "pipe_file", tmp, data)
            self.call(f"rename {path}", deadline, "mv", tmp, path)
        else:
            self.call(f"write {path}", deadline, "pipe_file", path, data)

    def get(self, path: str, deadline: float | None = None) -> bytes:
        return self.call(f"read {path}", deadline, "cat_file", path)

    def get_if_exists(self, path: str, deadline: float | None = None) -> bytes | None:
        try:
            return self.get(path, deadline)
        except FileNotFoundError:
            return None

    def list_dirs(self, path: str, deadline: float | None = None) -> list[str]:
        """Entries directly under `path`, freshly listed (fsspec caches listings of object stores)."""
        self.fs.invalidate_cache(path)
        try:
            return [p.rstrip("/") for p in self.call(f"list {path}", deadline, "ls", path, detail=False)]
        except FileNotFoundError:
            return []

    def remove_tree(self, path: str, deadline: float | None = None) -> None:
        try:
            self.call(f"remove {path}", deadline, "rm", path, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)
