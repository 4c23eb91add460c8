"""The project's configuration error, importable from anywhere without a cycle."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting is wrong. The message names the field, its value and the fix."""


def require(ok: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless `ok`."""
    if not ok:
        raise ConfigError(msg)
