"""End to end on a real local Ray cluster: 2 MiniLM producer actors feed a trainer group with fp=2;
the producers also fill an activation cache that a later run trains from in the same order."""

from __future__ import annotations

import json
import math

import pytest
from conftest import pydoc_jsonl

ray = pytest.importorskip("ray")

from sae_dist.config import (  # noqa: E402
    CheckpointConfig,
    ClusterConfig,
    Config,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrackingConfig,
    TrainerConfig,
    sae_config,
)
from sae_dist.data.cache import write_cache  # noqa: E402
from sae_dist.data.lm import LMActivationSource  # noqa: E402
from sae_dist.pipeline.group import run_trainer_group  # noqa: E402
from sae_dist.run import train  # noqa: E402


def _config(out, corpus, **over) -> Config:
    groups = dict(
        model=ModelConfig(context_size=64, batch_contexts=8),
        data=DataConfig(corpus=corpus, heldout_fraction=0.1, shuffle_buffer_tokens=2048),
        sae=sae_config(n_latents=256, k=8, dead_tokens=4096),
        trainer=TrainerConfig(total_tokens=512 * 24, batch_tokens=512, warmup_tokens=512 * 4, log_every=4,
                              eval_tokens=2048, scale_tokens=1024, encoder_chunk=128),
        checkpoint=CheckpointConfig(every_steps=0),
        tracking=TrackingConfig(enabled=False),
        cluster=ClusterConfig(),
    )
    groups.update(over)
    return Config(**groups, output_dir=str(out))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return pydoc_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", 60)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_producers_feed_fp2_group_and_cache_replays_the_same_order(ray_cluster, corpus, tmp_path):
    cache = tmp_path / "cache"
    cluster = ClusterConfig(producers=2, producer_cpus=0.5, trainer_cpus=0.5, max_in_flight=4, cache_url=str(cache))
    piped = run_trainer_group(_config(tmp_path / "piped", corpus, cluster=cluster, parallel=ParallelConfig(fp=2)))
    assert piped["steps"] == 24 and piped["tokens"] > 0

    single = train(_config(tmp_path / "single", corpus))
    # same chunks in the same order; fp=2 and fp=1 differ only by float summation order
    assert len(piped["history"]) == len(single["history"]) == 24
    for a, b in zip(piped["history"], single["history"]):
        assert math.isclose(a, b, rel_tol=1e-4)
    assert abs(piped["fvu"] - single["fvu"]) < 0.01

    index = json.loads((cache / "train" / "index.json").read_text())
    assert index["tokens"] >= 512 * 24
    held = LMActivationSource(ModelConfig(context_size=64, batch_contexts=8), DataConfig(corpus=corpus, heldout_fraction=0.1), "heldout")
    write_cache(held.chunks(), str(cache / "heldout"), 2048, {})
    cached = train(_config(tmp_path / "cached", corpus, data=DataConfig(source="cache", cache_dir=str(cache),
                                                                         shuffle_buffer_tokens=2048)))
    assert cached["history"] == single["history"]


def test_fanout_members_equal_training_each_alone(tmp_path):
    import dataclasses

    from conftest import synthetic_config

    from sae_dist.pipeline.fanout import train_fanout

    cfg = synthetic_config(tmp_path, trainer={"total_tokens": 256 * 12}, checkpoint={"every_steps": 0})
    cfg = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, fanout_n_latents=[64, 128]))
    members = train_fanout(cfg)
    alone = train(synthetic_config(tmp_path / "alone", sae={"n_latents": 128}, trainer={"total_tokens": 256 * 12},
                                   checkpoint={"every_steps": 0}))
    assert [m["n_latents"] for m in members] == [64, 128]
    assert members[1]["history"] == alone["history"]
    assert members[1]["fvu"] == pytest.approx(alone["fvu"], rel=1e-6)


def test_fanout_export_and_results_carry_what_a_single_run_writes(tmp_path):
    """One lifecycle: a fan-out member's cfg.json and results.json have the single run's fields and, for
    the same SAE, the same values (the fan-out once dropped context_size, so dashboards assumed 128)."""
    import dataclasses
    import os

    from conftest import synthetic_config

    from sae_dist.pipeline.fanout import train_fanout

    over = {"trainer": {"total_tokens": 256 * 6}, "checkpoint": {"every_steps": 0}}
    cfg = synthetic_config(tmp_path, **over, model={"d_model": 32, "context_size": 48})
    cfg = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, fanout_n_latents=[128]))
    member = train_fanout(cfg)[0]
    alone = train(synthetic_config(tmp_path / "alone", **over, model={"d_model": 32, "context_size": 48},
                                   sae={"n_latents": 128}))
    read = lambda run, name: json.loads(open(os.path.join(run, name)).read())  # noqa: E731
    fan_cfg, one_cfg = read(member["export_dir"], "cfg.json"), read(alone["export_dir"], "cfg.json")
    assert fan_cfg == one_cfg and fan_cfg["context_size"] == 48
    fan_res = read(os.path.dirname(member["export_dir"]), "results.json")
    one_res = read(os.path.dirname(alone["export_dir"]), "results.json")
    assert fan_res.keys() == one_res.keys()
    timing = {"train_s", "train_tokens_per_s", "peak_rss_gib"}  # measurements of the process, not results
    assert {k: v for k, v in fan_res.items() if k not in timing} == {k: v for k, v in one_res.items() if k not in timing}


def _after_first_checkpoint(cfg, action):
    """A thread that runs `action` once the run's first checkpoint is complete (polled every 0.1 s for at
    most ~120 s) -> (thread, event set when it ran)."""
    import threading

    from sae_dist.checkpoint import Checkpointer

    ck, done = Checkpointer(cfg), threading.Event()

    def watch():
        for _ in range(1200):
            if ck.complete_steps():
                action()
                done.set()
                return
            threading.Event().wait(0.1)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread, done


def test_dead_trainer_actor_restarts_the_group_from_the_last_checkpoint(ray_cluster, tmp_path):

    from conftest import synthetic_config

    from sae_dist.pipeline.group import trainer_name

    cfg = synthetic_config(
        tmp_path, parallel={"fp": 2}, trainer={"total_tokens": 256 * 1000, "log_every": 100},
        checkpoint={"every_steps": 50, "async_upload": False},
        cluster={"trainer_cpus": 0.5, "timeout_s": 120.0},
    )
    killer, killed = _after_first_checkpoint(cfg, lambda: ray.kill(ray.get_actor(trainer_name(0, 1))))
    out = run_trainer_group(cfg)
    killer.join()
    assert killed.is_set()
    assert out["group_restarts"] == 1
    assert out["steps"] == 1000
    # the second attempt resumed: it trained fewer than all 1000 steps itself
    assert 0 < len(out["history"]) < 1000


def test_sigterm_to_a_trainer_actor_checkpoints_its_step_and_the_group_resumes_from_it(ray_cluster, tmp_path, caplog):
    """A drained node: SIGTERM reaches one trainer actor's process; both ranks stop after the same step,
    checkpoint it, and the group restarts from that step (not from the last periodic checkpoint)."""
    import logging
    import re
    import signal

    psutil = pytest.importorskip("psutil")
    from conftest import synthetic_config


    cfg = synthetic_config(
        tmp_path, parallel={"fp": 2}, trainer={"total_tokens": 256 * 1200, "log_every": 100},
        checkpoint={"every_steps": 400, "async_upload": False},
        cluster={"trainer_cpus": 0.5, "timeout_s": 120.0},
    )

    def sigterm_one_rank():
        ranks = [p for p in psutil.process_iter(["cmdline"]) if "TrainerWorker.run" in " ".join(p.info["cmdline"] or [])]
        ranks[-1].send_signal(signal.SIGTERM)

    term, sent = _after_first_checkpoint(cfg, sigterm_one_rank)
    with caplog.at_level(logging.WARNING, logger="sae_dist.pipeline.group"):
        out = run_trainer_group(cfg)
    term.join()
    assert sent.is_set()
    assert out["group_restarts"] == 1 and out["steps"] == 1200
    stopped = [int(m) for m in re.findall(r"stopped by SIGTERM after step (\d+)", caplog.text)]
    assert len(stopped) == 1 and 400 <= stopped[0] < 1200
    assert len(out["history"]) == 1200 - stopped[0]  # the restart resumed from the preemption checkpoint


def test_dp2_trainer_group_trains_with_zero_by_default(ray_cluster, tmp_path):
    """parallel.engine=auto is DeepSpeed ZeRO with data replicas; Ray actors join without torchrun's
    variables."""
    pytest.importorskip("deepspeed")
    from conftest import synthetic_config

    cfg = synthetic_config(tmp_path, parallel={"dp": 2}, trainer={"total_tokens": 256 * 2 * 20, "log_every": 5},
                           cluster={"trainer_cpus": 0.5, "timeout_s": 120.0})
    out = run_trainer_group(cfg)
    assert out["engine"] == "deepspeed" and out["steps"] == 20
    assert out["fvu"] < 1.0
