"""The optimizer engine of a rank: plain Adam (replicated over dp, gradients averaged) or DeepSpeed ZeRO
(Adam sharded over dp), chosen from the config, and the checks that refuse what this process cannot run."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from sae_dist.config import Config, ConfigError
from sae_dist.parallel.dims import Mesh, resolve_backend
from sae_dist.parallel.dp import DataParallel
from sae_dist.parallel.zero import DeepSpeedEngine
from sae_dist.sae import SparseAutoencoder
from sae_dist.trainer import TorchEngine, lazy_rows, optimizer_of


def engine_name(cfg: Config) -> str:
    """parallel.engine resolved: auto is deepspeed with data replicas (dp > 1) or bf16 weights (its fp32
    master copies), torch otherwise."""
    if cfg.parallel.engine == "auto":
        return "deepspeed" if cfg.parallel.dp > 1 or cfg.trainer.param_dtype == "bf16" else "torch"
    return cfg.parallel.engine


def check_supported(cfg: Config, device: torch.device) -> None:
    """Refuses, before any work, what this process cannot run (`device` is trainer.device resolved)."""
    p, t = cfg.parallel, cfg.trainer
    resolve_backend(p.backend, device)
    if optimizer_of(cfg) != "adam" and engine_name(cfg) == "deepspeed":
        fix = ("set trainer.param_dtype=fp32 and parallel.engine=torch" if t.param_dtype == "bf16" else
               "set parallel.engine=torch (fp32 weights, the optimizer state replicated over dp)")
        why = ("parallel.engine is deepspeed" if p.engine == "deepspeed" else
               f"parallel.engine ({p.engine}) picks deepspeed for parallel.dp ({p.dp}) / trainer.param_dtype "
               f"({t.param_dtype})")
        raise ConfigError(
            f"trainer.optimizer ({t.optimizer}) runs on the torch engine only, but {why}, whose ZeRO optimizer is "
            f"Adam; {fix}, or set trainer.optimizer=adam"
        )
    if t.lazy_rows == "on" and engine_name(cfg) == "deepspeed":
        raise ConfigError(
            f"trainer.lazy_rows (on) needs the torch engine, but parallel.engine ({p.engine}) is deepspeed for "
            f"parallel.dp ({p.dp}) / trainer.param_dtype ({t.param_dtype}), whose ZeRO Adam updates every element; "
            "set parallel.engine=torch, or trainer.lazy_rows=auto (dense Adam there)"
        )
    if engine_name(cfg) == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"parallel.engine ({p.engine}) is deepspeed for parallel.dp ({p.dp}) / trainer.param_dtype "
            f"({cfg.trainer.param_dtype}), but DeepSpeed is not installed; DS_BUILD_OPS=0 pip install "
            "'sae-dist[deepspeed]', or set parallel.engine=torch (fp32 weights only)"
        )


def build_engine(cfg: Config, sae: SparseAutoencoder, mesh: Mesh, lr: float) -> Any:
    if engine_name(cfg) == "deepspeed":
        return DeepSpeedEngine(sae, lr, cfg, mesh)
    return TorchEngine(sae, lr, data=DataParallel(mesh) if mesh.dp > 1 else None, kind=optimizer_of(cfg),
                       lazy=lazy_rows(cfg))
