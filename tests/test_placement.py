"""A job the Ray cluster cannot hold is refused before any actor starts; auto CPUs share a local
cluster; an actor that is not placed, and a rank that never joins the rendezvous, are reported within
their timeouts, naming the setting. Real local Ray clusters, no mocks."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest
from conftest import synthetic_config

from sae_dist.config import ClusterConfig, ConfigError, ParallelConfig
from sae_dist.parallel.dims import RendezvousTimeoutError, init_distributed
from sae_dist.pipeline.resources import auto_cpus, check_placeable, resolve_cpus

TINY = ["data=synthetic", "model.d_model=16", "sae.n_latents=64", "sae.k=4", "trainer.batch_tokens=256",
        "trainer.total_tokens=2048", "trainer.eval_tokens=512", "trainer.scale_tokens=256", "tracking=none"]


def _job(tmp_path, producers=1, fp=2, **cluster):
    return synthetic_config(tmp_path, parallel={"fp": fp}, cluster={"producers": producers, **cluster})


def test_auto_cpus_share_a_local_cluster_without_overbooking_and_take_one_each_on_ray():
    assert auto_cpus("local", 2, 4) == 0.5
    assert 3 * auto_cpus("local", 2, 3) <= 2  # Ray counts in 1e-4 units: 0.6667 x 3 would overbook
    assert auto_cpus("local", 16, 3) == 1.0
    assert auto_cpus("ray", 2, 4) == 1.0


def test_producers_1_fp_2_on_two_cpus_fits_by_default_and_is_refused_with_one_cpu_each(tmp_path):
    two = {"CPU": 2.0}
    fits = resolve_cpus(_job(tmp_path), ranks=2, cluster_cpus=2)
    check_placeable(fits, 2, 0, two, [two])
    assert fits.cluster.producer_cpus == fits.cluster.trainer_cpus == pytest.approx(0.6666)

    one_each = resolve_cpus(_job(tmp_path, producer_cpus=1, trainer_cpus=1), ranks=2, cluster_cpus=2)
    with pytest.raises(ConfigError) as err:
        check_placeable(one_each, 2, 0, two, [two])
    msg = str(err.value)
    for part in ("asks Ray for 3 CPUs", "cluster.producers (1) x cluster.producer_cpus (1)",
                 "parallel.dp (1) x parallel.fp (2) x cluster.trainer_cpus (1)", "the cluster has 2",
                 "cluster.trainer_cpus=0 (auto"):
        assert part in msg


def test_trainer_cpus_beyond_every_node_is_refused_even_when_the_total_suffices(tmp_path):
    cfg = _job(tmp_path, producers=0, fp=1, trainer_cpus=4)
    with pytest.raises(ConfigError, match=r"cluster.trainer_cpus \(4\) is more than any one node has \(largest: 2 "
                                          r"CPUs of 2 node\(s\)\).*set cluster.trainer_cpus <= 2"):
        check_placeable(cfg, 1, 0, {"CPU": 4.0}, [{"CPU": 2.0}, {"CPU": 2.0}])


@pytest.mark.parametrize("field", ["producer_cpus", "trainer_cpus"])
def test_cpus_must_be_a_fraction_or_whole(field):
    with pytest.raises(ConfigError, match=rf"cluster.{field} \(1.5\) must be 0 \(auto\), a fraction up to 1"):
        ClusterConfig(**{field: 1.5})


def test_rendezvous_timeout_must_be_positive():
    with pytest.raises(ConfigError, match=r"parallel.rendezvous_timeout_s \(0\) must be > 0"):
        ParallelConfig(rendezvous_timeout_s=0)


def test_cli_refuses_trainer_cpus_beyond_the_machine_before_starting_actors(tmp_path):
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sae_dist", *TINY, "cluster.producers=1", "cluster.num_cpus=2",
         "cluster.trainer_cpus=4", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cluster.trainer_cpus (4) is more than any one node has (largest: 2 CPUs" in proc.stderr
    assert "set cluster.trainer_cpus <= 2" in proc.stderr
    assert elapsed < 15, f"refusal took {elapsed:.1f} s"


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_trainer_actor_that_is_never_placed_is_reported_within_cluster_timeout(ray_cluster, tmp_path):
    from sae_dist.pipeline.group import TrainerWorker, run_trainer_group
    from sae_dist.pipeline.stream import PipelineTimeoutError

    ray = ray_cluster
    blocker = ray.remote(num_cpus=1.5)(TrainerWorker).remote(0, 1)  # another job's actor: the check sees 2 CPUs
    assert ray.get(blocker.node.remote(), timeout=60)
    cfg = _job(tmp_path, producers=0, trainer_cpus=0.5, timeout_s=8.0)
    t0 = time.monotonic()
    with pytest.raises(PipelineTimeoutError) as err:
        run_trainer_group(cfg)
    assert time.monotonic() - t0 < 8.0 + 10
    msg = str(err.value)
    # rank 1 never fits; rank 0 may also still be starting its worker process on a loaded machine
    assert re.search(r"trainer rank\(s\) \[(0, )?1\] of 2 not placed on a node after 8 s \(cluster.timeout_s\)", msg), msg
    assert "cluster.trainer_cpus=0.5" in msg and "Lower cluster.trainer_cpus" in msg
    ray.kill(blocker)


def test_producer_that_is_never_placed_is_reported_within_cluster_timeout(ray_cluster, tmp_path):
    from sae_dist.pipeline.group import TrainerWorker
    from sae_dist.pipeline.launch import start_producers
    from sae_dist.pipeline.stream import PipelineTimeoutError

    ray = ray_cluster
    blocker = ray.remote(num_cpus=2)(TrainerWorker).remote(0, 1)
    assert ray.get(blocker.node.remote(), timeout=60)
    cfg = _job(tmp_path, producers=1, producer_cpus=1, timeout_s=3.0)
    t0 = time.monotonic()
    with pytest.raises(PipelineTimeoutError, match=r"producer\(s\) \[0\] of 1 not started .* after 3 s "
                                                   r"\(cluster.timeout_s\); each asks for cluster.producer_cpus=1"):
        start_producers(cfg)
    assert time.monotonic() - t0 < 3.0 + 10
    ray.kill(blocker)
    assert ray.util.list_named_actors() == []


def test_running_cluster_refuses_trainer_cpus_beyond_its_nodes_before_starting_actors(ray_cluster, tmp_path):
    from sae_dist.pipeline.group import run_trainer_group

    with pytest.raises(ConfigError, match=r"cluster.trainer_cpus \(4\) is more than any one node has \(largest: 2 CPUs"):
        run_trainer_group(_job(tmp_path, trainer_cpus=4))
    assert ray_cluster.util.list_named_actors() == []


def test_rank_that_never_joins_fails_the_rendezvous_naming_the_setting():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(RendezvousTimeoutError, match=r"not all 2 ranks joined .* within 2 s "
                                                     r"\(parallel.rendezvous_timeout_s\)"):
        init_distributed(0, 2, "127.0.0.1", port, ParallelConfig(fp=2, rendezvous_timeout_s=2), 64)
    assert time.monotonic() - t0 < 30
