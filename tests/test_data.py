"""Activation sources: special tokens excluded, deterministic splits, exact stream resume, caches."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import pydoc_jsonl, synthetic_config

from sae_dist.config import DataConfig, ModelConfig
from sae_dist.data import heldout_batches
from sae_dist.data.cache import CachedSource, write_cache
from sae_dist.data.corpus import is_heldout, load_split
from sae_dist.data.lm import LMActivationSource
from sae_dist.data.stream import BatchStream
from sae_dist.data.synthetic import SyntheticSource


def _tiny_corpus(tmp_path):
    return pydoc_jsonl(tmp_path / "docs.jsonl", 12)


def test_heldout_split_is_disjoint_and_stable():
    train = load_split("python-docs", "train", 0.02)
    held = load_split("python-docs", "heldout", 0.02)
    assert held and train
    assert not set(held) & set(train[:5000])
    assert all(is_heldout(d, 0.02) for d in held[:50])
    assert sum(map(len, train)) > 1_000_000  # real prose, enough for the default job


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lm_source_excludes_special_tokens(tmp_path, dtype):
    cfg = ModelConfig(context_size=32, batch_contexts=4, dtype=dtype)
    src = LMActivationSource(cfg, DataConfig(corpus=_tiny_corpus(tmp_path), heldout_fraction=0.01))
    assert next(src.hooked.model.parameters()).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    acts, pos = next(src.chunks())
    assert acts.dtype == torch.float32  # whatever the LM's precision
    assert pos == 4
    # [CLS] + 30 text tokens + [SEP] per context: only the 30 reach the SAE
    assert acts.shape == (4 * 30, 384)
    contexts = [c for _, c in zip(range(4), src.packer)]
    assert all(c[0] == src.tokenizer.cls_token_id and c[-1] == src.tokenizer.sep_token_id for c in contexts)
    # the same contexts through the full model (no early stop) give the same activations at layer 3
    ids = torch.tensor(contexts)
    with torch.no_grad():
        hidden = src.hooked.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    expected = hidden.hidden_states[4][:, 1:-1].reshape(-1, 384)  # hidden_states[0] is the embeddings
    mask = ~torch.isin(ids[:, 1:-1], src.special).reshape(-1)
    assert torch.allclose(acts, expected[mask].float(), atol=1e-5)


def test_batch_stream_resumes_exactly_mid_block():
    src = SyntheticSource(16, 64, 3, seed=5, chunk_tokens=100)
    full = BatchStream(src, 64, 500, seed=1)
    it = iter(full)
    batches = [next(it) for _ in range(30)]
    a = BatchStream(src, 64, 500, seed=1)
    it = iter(a)
    for _ in range(11):
        next(it)
    state = a.state_dict()
    b = BatchStream(src, 64, 500, seed=1)
    b.load_state_dict(state)
    resumed = [x for _, x in zip(range(19), b)]
    for x, y in zip(resumed, batches[11:]):
        assert torch.equal(x, y)


def test_shuffle_mixes_contexts():
    src = SyntheticSource(8, 32, 2, seed=0, chunk_tokens=50)
    plain = next(iter(BatchStream(src, 50, 0)))
    mixed = next(iter(BatchStream(src, 50, 400, seed=3)))
    assert torch.equal(plain, src.chunk(0))
    assert not torch.equal(mixed, src.chunk(0))


def test_cache_roundtrip_gives_the_same_activations(tmp_path):
    src = SyntheticSource(16, 64, 3, seed=2, chunk_tokens=100)
    index = write_cache(src.chunks(), str(tmp_path / "c" / "train"), 950, {"note": "t"})
    assert index["tokens"] == 1000 and len(index["shards"]) == 10 and index["note"] == "t"
    cached = CachedSource(str(tmp_path / "c" / "train"))
    for i, (acts, pos) in zip(range(12), cached.chunks()):
        assert pos == i + 1 and torch.equal(acts, src.chunk(i % 10))  # one shard per chunk, then cycles


def test_a_cached_heldout_split_is_read_once_not_cycled(tmp_path):
    src = SyntheticSource(16, 64, 3, seed=2, chunk_tokens=100)
    write_cache(src.chunks(), str(tmp_path / "c" / "heldout"), 250, {})
    cfg = synthetic_config(tmp_path, data={"source": "cache", "cache_dir": str(tmp_path / "c")})
    chunks = list(itertools.islice(heldout_batches(cfg), 5))
    assert [int(c.shape[0]) for c in chunks] == [100, 100, 100]  # evaluation counts each token once
    assert all(torch.equal(c, src.chunk(i)) for i, c in enumerate(chunks))


@pytest.mark.parametrize("seed", [0, 3])
def test_the_peer_benchmark_feeds_the_rows_a_cache_job_trains_on_in_its_order(tmp_path, seed):
    """scripts/bench_quality.py hands sparsify the cache rows of `sae-dist data=cache trainer.seed=SEED`
    in the job's order (row_order); the comparison is only fair if that is what the job's own stream
    (lifecycle.batches over the configured source) yields."""
    import os
    import sys
    from types import SimpleNamespace

    from sae_dist.data import build_source
    from sae_dist.lifecycle import batches
    from sae_dist.parallel import single_process
    from sae_dist.trainer import TrainState

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    from bench_quality import row_order

    src = SyntheticSource(4, 16, 2, seed=1, chunk_tokens=300)
    write_cache(src.chunks(), str(tmp_path / "c" / "train"), 2700, {})
    rows = torch.cat([src.chunk(i) for i in range(9)])
    cfg = synthetic_config(tmp_path, data={"source": "cache", "cache_dir": str(tmp_path / "c"),
                                           "shuffle_buffer_tokens": 1200},
                           trainer={"seed": seed, "batch_tokens": 256})
    job = SimpleNamespace(cfg=cfg, mesh=single_process(cfg.parallel, cfg.sae.n_latents),
                          source=build_source(cfg, "train"), trainer=SimpleNamespace(state=TrainState()))
    trained = torch.cat([b for _, b in zip(range(16), batches(job))])  # 4096 tokens: the cache cycles once
    order = row_order(str(tmp_path / "c"), 256, 4096, seed, shuffle_buffer_tokens=1200)
    assert torch.equal(rows[order], trained)
    assert not torch.equal(order, torch.arange(4096) % 2700)  # shuffled, so the check has teeth
