"""Checkpoint storage: one fsspec filesystem behind retries, exponential backoff and a per-operation
timeout, so that a slow or absent object store delays a checkpoint instead of hanging or killing the job.

Any fsspec URL works (`file://`, plain paths, `s3://` through s3fs, `gs://`, ...). Credentials come from
the filesystem's own standard sources (for S3: the AWS environment variables and config files); this
module never reads or logs them, and logs URLs with any user-info part masked.

Errors that no retry heals (no credentials, refused credentials, a missing bucket, a full or read-only
disk) fail at once with `PermanentStorageError`, whose message names the fix; `Storage.probe` finds them
at job start.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import fsspec
import fsspec.asyn

log = logging.getLogger(__name__)

try:  # botocore errors that are not OSErrors (EndpointConnectionError, ClientError for 5xx/throttling)
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    _BOTO_ERRORS: tuple[type[BaseException], ...] = (BotoCoreError, ClientError)
    _NO_CREDENTIALS: tuple[type[BaseException], ...] = (NoCredentialsError, PartialCredentialsError)
except ImportError:  # pragma: no cover - s3fs not installed
    _BOTO_ERRORS = _NO_CREDENTIALS = ()

RETRYABLE: tuple[type[BaseException], ...] = (OSError, *_BOTO_ERRORS)
"""Storage errors worth retrying unless `permanent_fix` names them; TimeoutError (and fsspec's
FSTimeoutError) are OSErrors."""

_CREDENTIALS_FIX = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the job's environment, or run it "
    "where an instance role provides credentials"
)
_REFUSED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"})
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class StorageError(RuntimeError):
    """A storage operation kept failing until its deadline."""


class PermanentStorageError(StorageError):
    """A storage operation failed in a way no retry heals; the message names the URL and the fix."""


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and the errors it was raised from (s3fs raises PermissionError from botocore's ClientError)."""
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return out


def permanent_fix(err: BaseException) -> str | None:
    """What the user must change when `err` is one that retrying cannot heal; None for a transient one
    (a timeout, a refused connection, a 5xx, throttling) and for a missing object (FileNotFoundError
    without a missing bucket behind it, which callers treat as "not written yet")."""
    chain = _chain(err)
    answers = [e.response.get("Error", {}) for e in chain if _BOTO_ERRORS and isinstance(e, ClientError)]
    codes = {a.get("Code") for a in answers}
    if any(isinstance(e, _NO_CREDENTIALS) for e in chain):
        return f"no credentials were found: {_CREDENTIALS_FIX}"
    if codes & _REFUSED_CODES or (answers and isinstance(err, PermissionError)):  # a HEAD's 403 has no code
        return (f"the store refused the credentials ({', '.join(sorted(str(c) for c in codes))}): check "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the instance role), their permissions on the "
                "bucket, and that checkpoint.endpoint_url is the store they belong to")
    if "NoSuchBucket" in codes:
        bucket = next((a["BucketName"] for a in answers if a.get("BucketName")), "<bucket>")
        return f"bucket {bucket!r} does not exist: create it (`aws s3 mb s3://{bucket}`) or fix the bucket in the URL"
    if isinstance(err, PermissionError):
        return "permission denied: make the folder writable for this user or point the URL elsewhere"
    oserr = next((e for e in chain if isinstance(e, OSError) and e.errno is not None), None)
    if oserr is not None and oserr.errno in _DISK_FULL:
        return f"the disk is full ({os.strerror(oserr.errno)}): free space on it or point the URL at another disk"
    if oserr is not None and oserr.errno == errno.EROFS:
        return "the filesystem is read-only: point the URL at a writable one"
    return None


def probe_name() -> str:
    """Name of the object `Storage.probe` writes: unique among the processes alive at one time."""
    return f".sae-dist-probe-{socket.gethostname()}-{os.getpid()}"


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
        self.deadline_setting = "checkpoint.upload_timeout_s"
        """The setting that gave `call`'s deadline, named when it gives up."""

    def unstrip(self, path: str) -> str:
        """A path of this filesystem as a URL that `Storage(url)` opens again (local paths stay paths)."""
        return path if self.local else self.fs.unstrip_protocol(path)

    def where(self, path: str) -> str:
        """`path` as a URL for messages and logs (user-info masked)."""
        return redact(self.unstrip(path))

    def _run(self, name: str, timeout: float, *args: Any, **kwargs: Any) -> Any:
        if getattr(self.fs, "async_impl", False) and hasattr(self.fs, f"_{name}"):
            return fsspec.asyn.sync(self.fs.loop, getattr(self.fs, f"_{name}"), *args, timeout=timeout, **kwargs)
        return getattr(self.fs, name)(*args, **kwargs)

    def call(self, what: str, deadline: float | None, name: str, *args: Any, **kwargs: Any) -> Any:
        """`fs.<name>(*args)` with retries on transient storage errors until `deadline` (None: one attempt
        more than the first, for reads that a person is waiting on); each attempt ends by the deadline.
        Errors no retry heals raise PermanentStorageError at once (a missing object: FileNotFoundError)."""
        delay, attempt, first = self.retry_initial_s, 0, ""
        limit = deadline if deadline is not None else time.monotonic() + 2 * self.retry_max_s
        while True:
            attempt += 1
            timeout = max(min(self.op_timeout_s, limit - time.monotonic()), 0.001)
            try:
                return self._run(name, timeout, *args, **kwargs)
            except RETRYABLE as err:
                fix = permanent_fix(err)
                if fix is not None:
                    raise PermanentStorageError(
                        f"{what} failed with {type(err).__name__}: {err}; not retried: {fix}"
                    ) from err
                if isinstance(err, FileNotFoundError):
                    raise
                bound = "checkpoint.op_timeout_s" if timeout >= self.op_timeout_s else f"what was left of {self.deadline_setting}"
                why = f"{type(err).__name__}: {str(err) or f'no answer within {timeout:.3g}s ({bound})'}"
                first = first or why
                if time.monotonic() + delay > limit:
                    earlier = f"the first with {first}, " if first != why else ""
                    raise StorageError(
                        f"{what} failed {attempt} times, {earlier}the last with {why}; gave up at the deadline "
                        f"({self.deadline_setting})"
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
            self.call(f"create the folder of {self.where(path)}", deadline, "makedirs", self.fs._parent(path), exist_ok=True)
            tmp = f"{path}.partial"
            self.call(f"write {self.where(path)}", deadline, "pipe_file", tmp, data)
            self.call(f"rename {self.where(path)}", deadline, "mv", tmp, path)
        else:
            for attempt in (1, 2):
                try:
                    self.call(f"write {self.where(path)}", deadline, "pipe_file", path, data)
                    return
                except FileNotFoundError as err:
                    # A PUT has no object to miss: this is S3's NoSuchUpload, the answer to a retried
                    # CompleteMultipartUpload whose first attempt completed while its answer was lost (a
                    # client timeout on a large object; seen on a loaded moto server at 1 GiB). The
                    # object is then whole if its size is ours (the manifest's checksums are verified at
                    # resume); else the upload was aborted and is made again once, from the start.
                    if self._size(path, deadline) == len(data):
                        log.warning("storage: write %s answered %s after it completed; the object is whole",
                                    self.where(path), type(err).__name__)
                        return
                    if attempt == 2:
                        raise StorageError(f"write {self.where(path)} failed twice with {type(err).__name__}: {err}") from err

    def _size(self, path: str, deadline: float | None) -> int | None:
        """The size of the object at `path` as the store lists it now, or None if there is none."""
        self.fs.invalidate_cache(path)
        try:
            return int(self.call(f"stat {self.where(path)}", deadline, "info", path)["size"])
        except FileNotFoundError:
            return None

    def get(self, path: str, deadline: float | None = None) -> bytes:
        return self.call(f"read {self.where(path)}", deadline, "cat_file", path)

    def get_if_exists(self, path: str, deadline: float | None = None) -> bytes | None:
        try:
            return self.get(path, deadline)
        except FileNotFoundError:
            return None

    def list_dirs(self, path: str, deadline: float | None = None) -> list[str]:
        """Entries directly under `path`, freshly listed (fsspec caches listings of object stores)."""
        self.fs.invalidate_cache(path)
        try:
            return [p.rstrip("/") for p in self.call(f"list {self.where(path)}", deadline, "ls", path, detail=False)]
        except FileNotFoundError:
            return []

    def remove_tree(self, path: str, deadline: float | None = None) -> None:
        try:
            self.call(f"remove {self.where(path)}", deadline, "rm", path, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)

    def probe(self, deadline: float) -> None:
        """Writes, reads back and deletes a small object at the root, all by `deadline` (a
        time.monotonic value), so that a store this job cannot use fails at its start, not at its first
        checkpoint. Raises what put/get raise; StorageError if the object read back differs."""
        path = join(self.root, probe_name())
        data = f"sae-dist storage probe {time.time()}".encode()
        self.put(path, data, deadline)
        try:
            back = self.call(f"read {self.where(path)}", deadline, "cat_file", path)
            if back != data:
                raise StorageError(f"read {self.where(path)} returned {len(back)} bytes other than the {len(data)} written")
        finally:
            self.call(f"remove {self.where(path)}", deadline, "rm", path)
