"""vLLM backend for the LM shard actors (GPU clusters only). UNVERIFIED: written from vLLM's documentation;
vLLM needs CUDA, so it has never run on this project's CPU machines nor been carried to a lent GPU.

    sae-dist model.backend=vllm model.name=meta-llama/Llama-3.1-8B model.hook_point=model.layers.16 \
        cluster.producers=8

How it hooks: `LLM.apply_model(fn)` runs `fn(model)` inside every vLLM worker. `install_hook` registers a
forward hook on the hook module that appends its output to a buffer on the model; a prefill-only
`generate` (max_tokens=1) runs the contexts; `collect` pops the buffer. vLLM's decoder layers return
`(hidden_states, residual)` with the residual add fused into the next layer's norm, so the residual
stream after the layer is their sum (`residual_stream`). All contexts go in ONE forward (no chunked
prefill, no prefix caching, eager mode: no CUDA-graph padding), so the captured rows are the contexts'
tokens in submission order. The pieces that do not need vLLM (`install_hook`, `collect`,
`residual_stream`, `split_rows`) are unit-tested on CPU with a plain torch module.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor, nn

_BUFFER = "_sae_dist_captured"


def residual_stream(out: Any) -> Tensor:
    """The hook module's output as a (tokens, d) residual stream."""
    if isinstance(out, tuple):
        if len(out) == 2 and isinstance(out[1], Tensor) and out[1].shape == out[0].shape:
            return out[0] + out[1]  # vLLM's fused-residual layers: (delta, residual)
        return out[0]
    return out


def install_hook(model: nn.Module, hook_point: str) -> int:
    """Runs inside a vLLM worker: capture `hook_point`'s output on every forward. Returns d_model."""
    from sae_dist.data.lm import find_module

    module = find_module(model, hook_point)
    setattr(model, _BUFFER, [])

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        getattr(model, _BUFFER).append(residual_stream(out).detach().float().cpu())

    module.register_forward_hook(hook)
    return int(getattr(getattr(model, "config", None), "hidden_size", 0))


def collect(model: nn.Module) -> Tensor:
    """Runs inside a vLLM worker: every row captured since the last call, in forward order."""
    rows = getattr(model, _BUFFER)
    setattr(model, _BUFFER, [])
    return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]) if rows else torch.empty(0)


def split_rows(rows: Tensor, n_contexts: int, context_size: int) -> Tensor:
    """Flat (n_contexts * context_size, d) rows of one batched prefill -> (n_contexts, context_size, d)."""
    if rows.shape[0] != n_contexts * context_size:
        raise RuntimeError(
            f"vLLM returned {rows.shape[0]} activation rows for {n_contexts} contexts of {context_size} tokens; "
            "the prefill was split or padded (check max_num_batched_tokens and enforce_eager)"
        )
    return rows.view(n_contexts, context_size, -1)


def engine_env(tensor_parallel_size: int, environ: dict[str, str]) -> dict[str, str]:
    """Environment for the vLLM engine, set before it starts. `apply_model` ships our hook functions to
    the workers: with one GPU the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so they
    are called directly and nothing is serialised. Tensor parallelism needs worker processes, and vLLM
    V1 then sends callables to them only with VLLM_ALLOW_INSECURE_SERIALIZATION=1 (pickle between the
    local processes of this engine, never data from storage or the network): that must be the user's
    explicit choice, so it is refused rather than set."""
    if tensor_parallel_size <= 1:
        return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
        raise RuntimeError(
            f"the vLLM backend with tensor_parallel_size={tensor_parallel_size} hooks layers inside vLLM's "
            "worker processes, which needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 (pickled hook functions between "
            "this engine's local processes); set it in the producers' environment, or use one GPU per producer"
        )
    return {}


class VLLMHookedModel:
    """Drop-in for `HookedModel`: (input_ids, attention_mask) -> (C, T, d) at the hook point."""

    def __init__(self, name: str, hook_point: str, context_size: int, batch_contexts: int, **llm_kwargs: Any) -> None:
        os.environ.update(engine_env(int(llm_kwargs.get("tensor_parallel_size", 1)), dict(os.environ)))
        from vllm import LLM  # GPU clusters only: the `vllm` extra

        self.llm = LLM(  # max_model_len: a full context plus the one token generate() samples
            model=name, enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False,
            max_model_len=context_size + 1, max_num_seqs=batch_contexts,
            max_num_batched_tokens=max(context_size * batch_contexts, context_size + 1), **llm_kwargs,
        )
        self.llm.apply_model(functools.partial(install_hook, hook_point=hook_point))

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in input_ids]
        self.llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
        rows = self.llm.apply_model(collect)[0]  # tensor-parallel workers all see the full residual
        return split_rows(rows, input_ids.shape[0], input_ids.shape[1])
