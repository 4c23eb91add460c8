"""Checkpoints at any fsspec URL (DESIGN §5).

    <url>/<run>/step-<N>/model-rank<R>.safetensors   SAE shard + per-latent firing counters
                         optim-rank<R>.safetensors   Adam state of that shard
                         trainer_state.json          step, tokens, scale, data position, seed, config
                         manifest.json               written LAST: every file's size and sha256
    <url>/<run>/latest                               name of the newest complete step

A step without a readable manifest does not exist. Loading reads safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sae_dist.config import Config, ConfigError, flatten

log = logging.getLogger(__name__)

_STEP = re.compile(r"step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be used; the message names the file and what was wrong."""


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def optimizer_tensors(sae: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in sae.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            out[f"{name}.{key}"] = value.detach().clone() if torch.is_tensor(value) else torch.tensor(float(value))
    return out


def load_optimizer_tensors(sae: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    for name, p in sae.named_parameters():
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name}
        if state:
            optimizer.state[p] = {k: v.to(p.device) for k, v in state.items()}


class Checkpointer:
    """Saves and restores a Trainer. `rank`/`world` name this process's shard files; with more than one
    rank, `gather` (set by the parallel layer) collects every rank's manifest entries on rank 0."""

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1) -> None:
        ck = cfg.checkpoint
        base = ck.url or _join(cfg.output_dir, "checkpoints")
        self.fs, root = fsspec.core.url_to_fs(base)
        self.run_root = _join(root, ck.run_name)
        self.cfg, self.rank, self.world = cfg, rank, world
        self.last_saved: str | None = None
        self.gather = lambda entries: entries
        self.barrier = lambda: None

    def _write(self, path: str, data: bytes) -> dict[str, Any]:
        with self.fs.open(path, "wb") as fh:
            fh.write(data)
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def save(self, trainer: Any) -> str:
        step_dir = _join(self.run_root, step_name(trainer.state.step))
        self.fs.makedirs(step_dir, exist_ok=True)
        r = f"rank{self.rank:05d}"
        model = {k: v.detach().contiguous() for k, v in trainer.sae.state_dict().items()}
        model["tokens_since_fired"] = trainer.tokens_since_fired.clone()
        entries = {
            f"model-{r}.safetensors": self._write(_join(step_dir, f"model-{r}.safetensors"), st_save(model)),
            f"optim-{r}.safetensors": self._write(
                _join(step_dir, f"optim-{r}.safetensors"), st_save(optimizer_tensors(trainer.sae, trainer.optimizer))
            ),
        }
        entries = self.gather(entries)
        if self.rank == 0:
            state = trainer.state.to_json() | {"config": flatten(self.cfg), "world": self.world}
            entries["trainer_state.json"] = self._write(
                _join(step_dir, "trainer_state.json"), json.dumps(state, indent=1).encode()
            )
            manifest = {"step": trainer.state.step, "files": entries, "format": "sae-dist-ckpt-v1"}
            self._write(_join(step_dir, "manifest.json"), json.dumps(manifest, indent=1).encode())
            self._write(_join(self.run_root, "latest"), step_name(trainer.state.step).encode())
            self.prune()
        self.barrier()
        self.last_saved = step_dir
        log.info("checkpoint %s", step_dir)
        return step_dir

    def complete_steps(self, run_root: str | None = None) -> list[tuple[int, str]]:
        """(step, folder) of every step with a readable manifest, oldest first."""
        root = run_root or self.run_root
        if not self.fs.exists(root):
            return []
        found = []
        for path in self.fs.ls(root, detail=False):
            m = _STEP.search(path.rstrip("/"))
            if m and self.fs.exists(_join(path, "manifest.json")):
                try:
                    json.loads(self.fs.cat_file(_join(path, "manifest.json")))
                except (ValueError, OSError):
                    continue
                found.append((int(m.group(1)), path.rstrip("/")))
        return sorted(found)

    def prune(self) -> None:
        ck = self.cfg.checkpoint
        steps = self.complete_steps()
        keep = {s for s, _ in steps[-ck.keep_last :]}
        for step, path in steps:
            if step not in keep and not (ck.keep_every and step % ck.keep_every == 0):
                self.fs.rm(path, recursive=True)

    def resolve(self, resume_from: str) -> str | None:
        """The step folder to resume from, or None when there is none yet."""
        if resume_from == "latest":
            steps = self.complete_steps()
            return steps[-1][1] if steps else None
        fs, path = fsspec.core.url_to_fs(resume_from)
        self.fs = fs
        if _STEP.search(path.rstrip("/")):
            if not fs.exists(_join(path, "manifest.json")):
                raise ConfigError(
                    f"checkpoint.resume_from ({resume_from!r}) has no manifest.json: the step is incomplete; "
                    "point at the run folder to take the newest complete step"
                )
            return path
        steps = self.complete_steps(path)
        if not steps:
            raise ConfigError(f"checkpoint.resume_from ({resume_from!r}) holds no complete step; check the URL")
        return steps[-1][1]

    def _read_verified(self, step_dir: str, name: str, manifest: dict[str, Any]) -> bytes:
        entry = manifest["files"].get(name)
        if entry is None:
            raise CheckpointError(f"{_join(step_dir, name)} is not listed in the manifest")
        data = self.fs.cat_file(_join(step_dir, name))
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(
                f"{_join(step_dir, name)} does not match its manifest checksum (corrupt or partly written); "
                "delete that step folder to resume from the one before"
            )
        return data

    def load(self, trainer: Any, step_dir: str) -> None:
        manifest = json.loads(self.fs.cat_file(_join(step_dir, "manifest.json")))
        state = json.loads(self._read_verified(step_dir, "trainer_state.json", manifest))
        r = f"rank{self.rank:05d}"
        model = st_load(self._read_verified(step_dir, f"model-{r}.safetensors", manifest))
        trainer.tokens_since_fired.copy_(model.pop("tokens_since_fired"))
        trainer.sae.load_state_dict(model)
        optim = st_load(self._read_verified(step_dir, f"optim-{r}.safetensors", manifest))
        load_optimizer_tensors(trainer.sae, trainer.optimizer, optim)
        st = trainer.state
        st.step, st.tokens, st.scale, st.data, st.seed = (
            state["step"], state["tokens"], state["scale"], state["data"], state["seed"]
        )
        self.last_saved = step_dir
        log.info("resumed from %s (step %d)", step_dir, st.step)
