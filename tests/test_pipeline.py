"""The Ray pipeline on a real local Ray cluster with real MiniLM producers."""

from __future__ import annotations

import pytest
import torch
from conftest import pydoc_jsonl

ray = pytest.importorskip("ray")

from sae_dist.config import ClusterConfig, DataConfig, ModelConfig  # noqa: E402
from sae_dist.data.lm import LMActivationSource  # noqa: E402
from sae_dist.pipeline.producer import ActivationProducer  # noqa: E402
from sae_dist.pipeline.stream import RayStreamSource  # noqa: E402

MODEL = ModelConfig(context_size=24, batch_contexts=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return DataConfig(corpus=pydoc_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", 20), heldout_fraction=0.01)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


MLP = ["encoder.layer.3.intermediate:in", "encoder.layer.3.output.dense:out"]
MODEL_SITES = ModelConfig(context_size=24, batch_contexts=3, sites=MLP)


def _producers(data, n, max_in_flight=4, model=MODEL):
    actor = ray.remote(num_cpus=0.5, max_restarts=-1, max_task_retries=-1)(ActivationProducer)
    producers = [actor.remote(model, data, i, n, "train", 1) for i in range(n)]
    return producers, RayStreamSource(producers, 384, model.batch_contexts, max_in_flight, timeout_s=120,
                                      n_sites=len(model.sites))


def test_producer_is_a_plain_class_that_serves_its_own_chunks(corpus):
    p = ActivationProducer(MODEL, corpus, shard=1, n_shards=2)
    ref = LMActivationSource(MODEL, corpus)
    want = [acts for _, (acts, _) in zip(range(6), ref.chunks())]
    assert torch.equal(p.chunk(1), want[1])
    assert torch.equal(p.chunk(5), want[5])
    assert torch.equal(p.chunk(3), want[3])  # going back re-seeks
    with pytest.raises(ValueError, match="chunk 2 belongs to shard 0"):
        p.chunk(2)


def test_two_producers_stream_the_single_process_sequence(ray_cluster, corpus):
    producers, source = _producers(corpus, 2)
    ref = LMActivationSource(MODEL, corpus)
    got = [(a, pos) for _, (a, pos) in zip(range(7), source.chunks(MODEL.batch_contexts * 2))]
    want = [(a, pos) for _, (a, pos) in zip(range(7), ref.chunks(MODEL.batch_contexts * 2))]
    for (a, pa), (b, pb) in zip(got, want):
        assert pa == pb and torch.equal(a, b)
    for p in producers:
        ray.kill(p, no_restart=True)


def test_backpressure_bounds_chunks_produced_ahead_of_the_trainer(ray_cluster, corpus):
    producers, source = _producers(corpus, 2, max_in_flight=3)
    it = source.chunks()
    for consumed in range(1, 6):
        next(it)
        # actor methods run in submission order, so stats() reports after every pending chunk finished:
        # however slow the consumer, producers have made at most max_in_flight chunks beyond it
        served = sum(s["served"] for s in ray.get([p.stats.remote() for p in producers]))
        assert served <= consumed + source.max_in_flight - 1
    for p in producers:
        ray.kill(p, no_restart=True)


@pytest.mark.parametrize("model", [MODEL, MODEL_SITES], ids=["one-site", "mlp-in-out"])
def test_killed_producer_restarts_and_no_chunk_is_lost(ray_cluster, corpus, model):
    """Also for multi-site chunks: (tokens, 2, d) blocks of an MLP's input and output, in order."""
    producers, source = _producers(corpus, 2, model=model)
    ref = LMActivationSource(model, corpus)
    want = [a for _, (a, _) in zip(range(12), ref.chunks())]
    it = source.chunks()
    got = [next(it)[0] for _ in range(4)]
    ray.kill(producers[1], no_restart=False)  # Ray restarts it; pending chunks are retried
    got += [next(it)[0] for _ in range(8)]
    assert source.received == list(range(12))
    assert got[0].shape[1:] == ((2, 384) if model.sites else (384,))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for p in producers:
        ray.kill(p, no_restart=True)


def test_dp_replicas_draw_distinct_chunks(ray_cluster, corpus):
    producers, _ = _producers(corpus, 2)
    r0 = RayStreamSource(producers, 384, MODEL.batch_contexts, 2, 120, dp_rank=0, dp_size=2)
    r1 = RayStreamSource(producers, 384, MODEL.batch_contexts, 2, 120, dp_rank=1, dp_size=2)
    it0, it1 = r0.chunks(), r1.chunks()
    a = [next(it0) for _ in range(3)]
    b = [next(it1) for _ in range(3)]
    assert r0.received == [0, 2, 4] and r1.received == [1, 3, 5]
    assert [p for _, p in a] == [3, 9, 15] and [p for _, p in b] == [6, 12, 18]
    for p in producers:
        ray.kill(p, no_restart=True)


def test_timeout_error_names_the_setting(ray_cluster, corpus):
    producers, _ = _producers(corpus, 1)
    source = RayStreamSource(producers, 384, MODEL.batch_contexts, 1, timeout_s=0.001)
    from sae_dist.pipeline.stream import PipelineTimeoutError

    with pytest.raises(PipelineTimeoutError, match=r"chunk 0 .* raise cluster.timeout_s"):
        next(source.chunks())
    ray.kill(producers[0], no_restart=True)


def test_cluster_config_checks():
    from sae_dist.config import ConfigError

    with pytest.raises(ConfigError, match=r"cluster.max_in_flight \(-1\) must be >= 0 \(0 = auto\)"):
        ClusterConfig(max_in_flight=-1)
