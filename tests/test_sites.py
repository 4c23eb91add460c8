"""Multi-site activations (model.sites): one forward pass, several hook points, aligned per token, and
carried by the cache and the shuffle buffer exactly as single-site chunks are."""

from __future__ import annotations

import pytest
import torch
from conftest import pydoc_jsonl

from sae_dist.config import ConfigError, DataConfig, ModelConfig
from sae_dist.data.cache import CachedSource, write_cache
from sae_dist.data.lm import LMActivationSource
from sae_dist.data.stream import BatchStream

MLP_IN, MLP_OUT = "encoder.layer.3.intermediate:in", "encoder.layer.3.output.dense:out"


def _source(tmp_path, **model):  # type: ignore[no-untyped-def]
    cfg = ModelConfig(context_size=32, batch_contexts=4, dtype="fp32", **model)
    return LMActivationSource(cfg, DataConfig(corpus=pydoc_jsonl(tmp_path / "docs.jsonl", 12), heldout_fraction=0.01))


def test_mlp_input_and_output_are_aligned_per_token_and_the_pass_stops_after_them(tmp_path):
    src = _source(tmp_path, sites=[MLP_IN, MLP_OUT])
    assert src.n_sites == 2 and src.d_model == 384
    model = src.hooked.model
    later = []
    handle = model.encoder.layer[4].register_forward_hook(lambda *a: later.append(1))
    try:
        acts, pos = next(src.chunks())
    finally:
        handle.remove()
    assert not later  # the pass ended at layer 3's MLP
    assert acts.shape == (4 * 30, 2, 384) and pos == 4
    # the MLP's output is that MLP applied to the recorded input, token by token
    layer = model.encoder.layer[3]
    with torch.no_grad():
        assert torch.allclose(layer.output.dense(layer.intermediate(acts[:, 0])), acts[:, 1], atol=1e-4)
    # and the sites are in the order given, whatever order the model reaches them in
    flipped, _ = next(_source(tmp_path, sites=[MLP_OUT, MLP_IN]).chunks())
    assert torch.equal(flipped, acts.flip(1))


def test_one_site_source_is_unchanged_and_equals_the_site_sliced_from_several(tmp_path):
    plain, _ = next(_source(tmp_path).chunks())  # model.hook_point: encoder.layer.3's output
    assert plain.shape == (4 * 30, 384)
    both, _ = next(_source(tmp_path, sites=["encoder.layer.3:out", "encoder.layer.2"]).chunks())
    assert torch.equal(both[:, 0], plain)


def test_multi_site_chunks_survive_the_cache_and_the_shuffle_aligned(tmp_path):
    src = _source(tmp_path, sites=[MLP_IN, MLP_OUT])
    chunks = [c for c, _ in zip(src.chunks(), range(3))]
    url = str(tmp_path / "cache" / "train")
    index = write_cache(iter(chunks), url, 3 * 120, {"sites": [MLP_IN, MLP_OUT]})
    assert index["n_sites"] == 2 and index["d_model"] == 384
    cached = CachedSource(url)
    assert cached.n_sites == 2
    for (want, _), (got, _) in zip(chunks, cached.chunks()):
        assert torch.equal(got, want)
    # the shuffle buffer permutes tokens, never sites: each batch row is one token's (input, output) pair
    layer = src.hooked.model.encoder.layer[3]
    batch = next(iter(BatchStream(cached, batch_tokens=64, buffer_tokens=360, seed=3)))
    assert batch.shape == (64, 2, 384)
    with torch.no_grad():
        assert torch.allclose(layer.output.dense(layer.intermediate(batch[:, 0])), batch[:, 1], atol=1e-4)
    all_rows = torch.cat([c for c, _ in chunks])
    assert not torch.equal(batch, all_rows[:64])  # shuffled ...
    assert all((all_rows == row).all(dim=(1, 2)).any() for row in batch)  # ... whole tokens only


@pytest.mark.parametrize("sites, needle", [
    (["encoder.layer.3.intermediat:in", MLP_OUT], "model.sites ('encoder.layer.3.intermediat')"),
    (["encoder.layer.3.intermediate.dense:out", MLP_OUT], "different widths"),
])
def test_bad_sites_are_refused_naming_the_setting(tmp_path, sites, needle):
    with pytest.raises(ConfigError) as err:
        _source(tmp_path, sites=sites)
    assert needle in str(err.value)


@pytest.mark.parametrize("fields, needle", [
    ({"sites": ["encoder.layer.3:middle"]}, "model.sites entry 'encoder.layer.3:middle'"),
    ({"sites": [MLP_IN, MLP_IN]}, "more than once"),
    ({"sites": [MLP_IN, MLP_OUT], "backend": "vllm"}, "model.backend=hf"),
])
def test_malformed_sites_are_refused_before_any_model_loads(fields, needle):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**fields)
    assert needle in str(err.value)
