"""`sae-dist steer`: generate from a causal LM with one SAE feature clamped or added at the hook.

clamp: x -> x + (value - f_i(x)) W_dec[i]  (the feature reads `value` at every token; the SAE's error
       term and all other features stay as they were);
add:   x -> x + value W_dec[i].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sae_dist.config import ConfigError
from sae_dist.features.splice import replace_output
from sae_dist.sae import SparseAutoencoder

MODES = ("clamp", "add")


def steering_fn(sae: SparseAutoencoder, feature: int, value: float, mode: str):  # type: ignore[no-untyped-def]
    if mode not in MODES:
        raise ConfigError(f"--mode ({mode!r}) must be one of {', '.join(MODES)}")
    if not 0 <= feature < sae.n_local:
        raise ConfigError(f"--feature ({feature}) must be in [0, {sae.n_local})")
    direction = sae.W_dec[feature].detach()  # (d,)

    def fn(x: Tensor) -> Tensor:
        if mode == "add":
            return x + value * direction.to(x.dtype)
        vals, idx = sae.encode_sparse(x.float())  # (N, k)
        current = (vals * (idx == feature)).sum(1, keepdim=True)  # (N, 1)
        return x + (value - current).to(x.dtype) * direction.to(x.dtype)

    return fn


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 32,
             module: nn.Module | None = None, fn: Any = None) -> Tensor:
    """Greedy continuation ids (1, T + new) of `prompt`, with the hook module's output steered by fn."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        raise ConfigError("--prompt is empty after tokenisation; give some text")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad,
              "attention_mask": torch.ones_like(ids)}
    if fn is None:
        return model.generate(ids, **kwargs)
    assert module is not None
    with replace_output(module, fn):
        return model.generate(ids, **kwargs)
