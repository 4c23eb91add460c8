"""Loading what the feature tools need: the exported SAE, its LM (with the LM head when it has one),
the hook module, and packed contexts of the run's text."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sae_dist.config import ConfigError
from sae_dist.data.corpus import load_split
from sae_dist.data.heldout import DEFAULTS as HELDOUT_DEFAULTS
from sae_dist.data.heldout import KEY as HELDOUT_KEY
from sae_dist.data.lm import ContextPacker, find_module, resolve_model_path
from sae_dist.export import load_saelens
from sae_dist.sae import SparseAutoencoder

log = logging.getLogger(__name__)


def find_export(path: str) -> str:
    """The export folder for a run folder (`<run>/sae`) or an export folder itself."""
    for cand in (path, os.path.join(path, "sae")):
        if os.path.isfile(os.path.join(cand, "cfg.json")):
            return cand
    raise ConfigError(f"{path!r} holds no SAE export (cfg.json); give a run folder or its sae/ folder")


def run_settings(export_dir: str, export_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The held-out set of the run that wrote the export (sae_dist.data.heldout): as its cfg.json
    records it, else as the run's Hydra config implies, else the defaults."""
    settings = dict(HELDOUT_DEFAULTS)
    hydra_cfg = os.path.join(os.path.dirname(os.path.abspath(export_dir)), ".hydra", "config.yaml")
    if os.path.isfile(hydra_cfg):
        from omegaconf import OmegaConf

        saved = OmegaConf.to_container(OmegaConf.load(hydra_cfg))
        saved = saved if isinstance(saved, dict) else {}
        for section, keys in (("data", ("source", "corpus", "heldout_fraction", "text_field")),
                              ("model", ("context_size", "batch_contexts")), ("trainer", ("eval_tokens",))):
            part = saved.get(section) or {}
            settings.update({k.removeprefix("eval_"): part[k] for k in keys if k in part})
    if export_cfg and "context_size" in export_cfg:
        settings["context_size"] = export_cfg["context_size"]
    return settings | ((export_cfg or {}).get(HELDOUT_KEY) or {})


def is_causal(model: Any) -> bool:
    """Has an LM head and is a decoder (HF PreTrainedModel)."""
    return model.get_output_embeddings() is not None and bool(getattr(model.config, "is_decoder", False) or any(
        a.endswith(("LMHeadModel", "ForCausalLM")) for a in (model.config.architectures or [])
    ))


def load_lm(name: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """The model with its LM head when its checkpoint is a causal LM, else the bare encoder, with its
    weights in `dtype` (float32 or bfloat16: the held-out set's LM precision)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    try:
        archs = AutoConfig.from_pretrained(path).architectures or []
        cls = AutoModelForCausalLM if any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in archs) else AutoModel
        model: Any = cls.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ConfigError(f"model_name ({name!r}) could not be loaded ({err}); give a local model folder") from err
    return model.to(device=device, dtype=getattr(torch, dtype)).eval(), tokenizer


def resolve_hook(model: nn.Module, hook_point: str) -> str:
    """The hook module's name in `model`, also when the export names it relative to the base model
    (GPT2Model's `h.3` is GPT2LMHeadModel's `transformer.h.3`) or the other way round."""
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") + "."
    for name in (hook_point, prefix + hook_point, hook_point.removeprefix(prefix)):
        if name in modules:
            return name
    find_module(model, hook_point)  # raises, naming close matches
    return hook_point


@dataclass
class FeatureSetup:
    sae: SparseAutoencoder
    cfg: dict[str, Any]
    """The export's cfg.json."""
    model: Any
    """An HF PreTrainedModel (with its LM head for causal LMs)."""
    tokenizer: Any
    hook_name: str
    """The hook module's name in `model`; its output (B, T, d) is what the SAE reads."""
    settings: dict[str, Any]
    """The run's held-out set (sae_dist.data.heldout): corpus, split, context size, batch, tokens, LM dtype."""

    @property
    def module(self) -> nn.Module:
        return find_module(self.model, self.hook_name)

    @property
    def causal(self) -> bool:
        return is_causal(self.model)

    def special_ids(self) -> Tensor:
        return torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)

    def context_batches(self, split: str, batch_contexts: int, corpus: str = "") -> Iterator[Tensor]:
        """(C, T) token ids of packed contexts of the run's text, `split` train or heldout."""
        s = self.settings
        docs = load_split(corpus or s["corpus"], split, s["heldout_fraction"], s["text_field"])
        packer = ContextPacker(self.tokenizer, docs, int(s["context_size"]))
        batch: list[list[int]] = []
        for ctx in packer:
            batch.append(ctx)
            if len(batch) == batch_contexts:
                yield torch.tensor(batch)
                batch = []
        if batch:
            yield torch.tensor(batch)


def load_setup(path: str, device: str = "cpu", multi_site: bool = False) -> FeatureSetup:
    """The export at `path` with its LM. `multi_site`: the caller handles a dictionary over several
    sites (eval's replacement model); dashboards and steering read one-site SAEs only."""
    export_dir = find_export(path)
    sae, cfg = load_saelens(export_dir)
    for key in ("model_name", "hook_name"):
        if not cfg.get(key):
            raise ConfigError(f"{export_dir}/cfg.json has no {key}; re-export with sae_dist.export.export_saelens")
    if cfg.get("sites") and not multi_site:
        raise ConfigError(
            f"{export_dir} is a {cfg.get('sae_dist_arch')} over the sites {cfg['sites']}: dashboards and steering "
            "read one-site SAEs; `sae-dist eval` splices transcoders and CLTs in as a replacement model"
        )
    settings = run_settings(export_dir, cfg)
    model, tokenizer = load_lm(cfg["model_name"], device, settings["lm_dtype"])
    hook_name = resolve_hook(model, cfg["hook_name"])
    return FeatureSetup(sae.to(device), cfg, model, tokenizer, hook_name, settings)
