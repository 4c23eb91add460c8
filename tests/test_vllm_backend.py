"""The vLLM backend's parts that do not need vLLM (which needs CUDA and is never installed here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sae_dist.data.vllm_backend import collect, install_hook, residual_stream, split_rows


class FusedResidualLayer(nn.Module):
    """Like vLLM's decoder layers: returns (delta, residual) and leaves the add to the next layer."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h, residual):
        residual = h if residual is None else h + residual
        return self.lin(residual), residual


class TinyDecoder(nn.Module):
    def __init__(self, d: int = 8, n_layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(FusedResidualLayer(d) for _ in range(n_layers))

    def forward(self, x):
        h, res = x, None
        for layer in self.layers:
            h, res = layer(h, res)
        return h + res


def test_hook_captures_the_residual_stream_in_forward_order():
    torch.manual_seed(0)
    model = TinyDecoder()
    install_hook(model, "layers.1")
    a, b = torch.randn(5, 8), torch.randn(3, 8)
    model(a)
    model(b)
    rows = collect(model)
    # the residual stream after layer 1 is what layer 2 adds its input to
    want = []
    for x in (a, b):
        h, res = model.layers[0](x, None)
        h, res = model.layers[1](h, res)
        want.append(h + res)
    assert torch.allclose(rows, torch.cat(want))
    assert collect(model).shape == (8, 8)  # only the rows captured since the last collect


def test_split_rows_checks_the_prefill_was_one_unpadded_batch():
    rows = torch.arange(24.0).view(12, 2)
    assert split_rows(rows, 3, 4).shape == (3, 4, 2)
    with pytest.raises(RuntimeError, match="returned 12 activation rows for 2 contexts of 4 tokens"):
        split_rows(rows, 2, 4)


def test_residual_stream_of_plain_outputs():
    t = torch.randn(4, 3)
    assert residual_stream(t) is t
    assert residual_stream((t,)) is t


def test_unknown_hook_point_is_a_config_error():
    from sae_dist.config import ConfigError

    with pytest.raises(ConfigError, match=r"model\.hook_point \('layers\.9'\)"):
        install_hook(TinyDecoder(), "layers.9")


def test_engine_runs_in_process_on_one_gpu_and_tensor_parallel_needs_an_explicit_opt_in():
    from sae_dist.data.vllm_backend import engine_env

    assert engine_env(1, {}) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # hooks called directly, no pickling
    with pytest.raises(RuntimeError, match=r"tensor_parallel_size=2.*VLLM_ALLOW_INSECURE_SERIALIZATION=1"):
        engine_env(2, {})
    assert engine_env(2, {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}) == {}
