"""The registry of dictionary families, keyed by `sae.arch`.

Every module in this package is imported here, and each registers its `Arch` subclass with
`@register`: adding a family is one new module (plus its `conf/sae/<name>.yaml` and its tests), with
no list to edit elsewhere. See docs/extending.md.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, TypeVar

from sae_dist.archs.base import Arch, SaeConfig, SaeOutput
from sae_dist.errors import ConfigError

_REGISTRY: dict[str, type[Arch]] = {}
A = TypeVar("A", bound=type[Arch])


def register(cls: A) -> A:
    """Class decorator: makes `cls` the family `sae.arch=<cls.name>`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"sae.arch {cls.name!r} is registered twice ({_REGISTRY[cls.name]} and {cls})")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> type[Arch]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"sae.arch ({name!r}) must be one of {', '.join(_REGISTRY)}") from None


def build_config(fields: dict[str, Any]) -> SaeConfig:
    """The family's own config dataclass from `sae.*` fields (arch defaults to topk)."""
    cls = get(fields.get("arch", "topk")).config
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        arch = fields.get("arch", "topk")
        raise ConfigError(
            f"sae.arch={arch} has no field sae.{unknown[0]} (its fields: {', '.join(sorted(known))}); pick the "
            f"family with the config group `sae={arch}` (not `sae.arch={arch}`), and drop fields it lacks"
        )
    return cls(**fields)


for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["Arch", "SaeConfig", "SaeOutput", "register", "names", "get", "build_config"]
