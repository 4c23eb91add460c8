"""`sae-dist dashboard serve DIR`: the static dashboard over HTTP on 127.0.0.1 (stdlib http.server)."""

from __future__ import annotations

import functools
import http.server
import logging
import os

log = logging.getLogger(__name__)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("%s " + format, self.address_string(), *args)


def make_server(directory: str, port: int = 8000, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """A server for `directory` (port 0 picks a free one: read it from server.server_address)."""
    if not os.path.isfile(os.path.join(directory, "index.html")):
        raise FileNotFoundError(f"{directory!r} has no index.html; build it with `sae-dist dashboard build`")
    handler = functools.partial(_QuietHandler, directory=directory)
    return http.server.ThreadingHTTPServer((host, port), handler)
