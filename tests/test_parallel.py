"""Feature and data parallelism with real gloo processes on CPU (docs/design.md §3).

    python -m pytest -q tests/test_parallel.py

Each world of processes is spawned once per module (a fixture) and runs several scenarios; the tests
assert on what they recorded against single-process references computed here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import synthetic_config

from sae_dist import archs, kernels  # type: ignore[attr-defined]
from sae_dist.config import ConfigError, ParallelConfig
from sae_dist.data.stream import BatchStream
from sae_dist.data.synthetic import SyntheticSource
from sae_dist.export import export_saelens
from sae_dist.metrics import evaluate, weight_metrics
from sae_dist.parallel import (
    ParallelDims,
    ReplicaSource,
    apply_feature_parallel,
    gather_full_state,
    init_distributed,
    single_process,
)
from sae_dist.parallel.dims import build_mesh
from sae_dist.parallel.engine import build_engine
from sae_dist.parallel.export import export_sharded, full_sae
from sae_dist.sae import SparseAutoencoder
from sae_dist.trainer import Trainer, TrainState, auto_lr

D, N, K, B, STEPS = 32, 256, 4, 64, 20
ARCHS = ("topk", "batchtopk", "matryoshka", "jumprelu", "gated", "transcoder", "skip_transcoder", "crosscoder", "clt")
"""Every sparse-path family; each trains fp=2 and fp=4 against one process."""
ZERO_MULTISITE = ("crosscoder", "clt")
"""Families across sites that also train under ZeRO-2 at dp=2 x fp=2 against dp=1 with the doubled batch."""
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "broadcast",
               "reduce_scatter_tensor", "barrier", "all_gather_object", "broadcast_object_list", "gather")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(tmp, arch="topk", n=N, dp=1, fp=1, batch=B, engine="torch", zero_stage=1, dead_tokens=2 * B,
         offload=False, param_dtype="fp32", **sae):
    return synthetic_config(
        tmp,
        sae={"arch": arch, "n_latents": n, "k": K, "dead_tokens": dead_tokens, **sae},
        trainer={"batch_tokens": batch, "total_tokens": batch * dp * STEPS, "encoder_chunk": 32, "warmup_tokens": 5 * batch * dp,
                 "optimizer": "adam", "lazy_rows": "off",  # as ZeRO's: layouts and engines compare like for like
                 "param_dtype": param_dtype},
        parallel={"dp": dp, "fp": fp, "engine": engine, "zero_stage": zero_stage, "offload_optimizer": offload},
    )


def _batches(rows: int, steps: int = STEPS, arch: str = "topk", sites: int = 3) -> list[torch.Tensor]:
    """Synthetic batches (rows, D); for a multi-site family (rows, S, D): the input, then fixed
    nonlinear functions of it (an MLP's output; further layers). S is 2 for a transcoder, `sites` for
    a family that takes any number."""
    src = SyntheticSource(D, 128, 3, seed=0)
    data = torch.cat([src.chunk(i) for i in range(rows * steps // 4096 + 1)])
    n_sites = archs.get(arch).sites or (4 if arch == "clt" and sites == 3 else sites)  # a CLT: L inputs, L outputs
    if n_sites > 1:
        g = torch.Generator().manual_seed(5)
        layers = [data]
        for _ in range(n_sites - 1):
            layers.append(torch.tanh(layers[-1] @ (torch.randn(D, D, generator=g) / D**0.5)))
        data = torch.stack(layers, dim=1)
    return [data[s * rows : (s + 1) * rows] for s in range(steps)]


def _train(cfg, mesh, batches, count_at=None):
    """Runs `batches` through a Trainer on this rank; records losses, the selected latents and bytes."""
    kernels.set_select_precision(cfg.trainer.encoder_select)  # as run.train does
    sites = batches[0].shape[1] if batches[0].dim() == 3 else 0
    family = archs.get(cfg.sae.arch)
    full = SparseAutoencoder(cfg.sae, family.width(D, sites), d_out=family.out_width(D, sites),
                             encoder_chunk=cfg.trainer.encoder_chunk, generator=torch.Generator().manual_seed(1))
    sae = apply_feature_parallel(full, mesh)
    trainer = Trainer(cfg, sae, TrainState(), engine=build_engine(cfg, sae, mesh, auto_lr(cfg)))
    comm, picks, chosen = sae.comm, [], []

    def record(vals, idx):
        mask = torch.zeros(vals.shape[0], cfg.sae.n_latents, dtype=torch.bool)
        rows, cols = (vals.detach() != 0).nonzero(as_tuple=True)  # this rank's entries only
        mask[rows, idx[rows, cols] + comm.latent_offset] = True
        picks.append(mask)

    select_topk, select_batch = comm.select_topk, comm.select_batch_topk

    def topk(vals, idx, k):
        out = select_topk(vals, idx, k)
        record(*out)
        return out

    def batch_topk(vals, idx, total):
        out = select_batch(vals, idx, total)
        if picks:
            picks.pop()  # the candidate list was too short and is being widened: keep the final pick
        record(out[0], out[1])
        return out

    comm.select_topk, comm.select_batch_topk = topk, batch_topk
    losses, counts = [], {}
    for step, x in enumerate(batches):
        picks.clear()
        with _counting() if step in (count_at or ()) else contextlib.nullcontext() as c:
            losses.append(float(trainer.train_step(x).loss.detach()))
        if c is not None:
            counts[step] = dict(c)
        chosen.append(picks[0] if picks else torch.zeros(0))  # TopK's selection (AuxK's comes second)
    opt = trainer.optimizer
    state = getattr(opt, "state", {})
    opt_bytes = sum(t.numel() * t.element_size() for st in state.values() for t in st.values() if torch.is_tensor(t))
    param_bytes = sum(p.numel() * p.element_size() for p in sae.parameters())
    return {"losses": losses, "chosen": torch.stack(chosen), "weights": gather_full_state(sae, mesh),
            "bytes": opt_bytes + param_bytes, "opt_bytes": opt_bytes, "param_bytes": param_bytes, "counts": counts,
            "dtypes": {p.dtype for p in sae.parameters()}, "masters": trainer.engine.weight_tensors(),
            "model": {k: v.clone() for k, v in sae.state_dict().items()}}


@contextlib.contextmanager
def _counting():
    """Counts top-level torch.distributed collectives called in the block (nested calls count once)."""
    counts: Counter = Counter()
    depth = threading.local()
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            outer = getattr(depth, "n", 0) == 0
            if outer:
                counts[name] += 1
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth.n -= 1

        return counted

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _mesh(cfg):
    return build_mesh(cfg.parallel, cfg.sae.n_latents)


def _job_world2(rank, tmp):
    out = {}
    for arch in ARCHS:
        cfg = _cfg(tmp, arch, fp=2)
        out[f"fp2-{arch}"] = _train(cfg, _mesh(cfg), _batches(B, arch=arch))
    cfg = _cfg(tmp, "topk", fp=2, batch=2 * B)
    out["dp1-fp2-double"] = _train(cfg, _mesh(cfg), _batches(2 * B))
    for arch in ZERO_MULTISITE:
        cfg = _cfg(tmp, arch, fp=2, batch=2 * B)
        out[f"dp1-fp2-double-{arch}"] = _train(cfg, _mesh(cfg), _batches(2 * B, arch=arch))
    cfg = _cfg(tmp, "topk", dp=2)
    out["dp2-fp1"] = _train(cfg, _mesh(cfg), _replica_batches(rank, 1))
    for n in (128, 512):
        cfg = _cfg(tmp, "topk", n=n, fp=2, batch=16, dead_tokens=1)
        out[f"count-{n}"] = _train(cfg, _mesh(cfg), _batches(16, 4), count_at=(2, 3))["counts"]
    for arch in ("jumprelu", "gated"):
        for n in (128, 512):
            cfg = _cfg(tmp, arch, n=n, fp=2, batch=16, dead_tokens=1)
            out[f"count-{arch}-{n}"] = _train(cfg, _mesh(cfg), _batches(16, 4), count_at=(2, 3))["counts"]
    for n, prefixes in ((128, [8, 128]), (512, [8, 32, 64, 128, 512])):
        cfg = _cfg(tmp, "matryoshka", n=n, fp=2, batch=16, dead_tokens=1, prefixes=prefixes)
        out[f"count-matryoshka-{n}"] = _train(cfg, _mesh(cfg), _batches(16, 4), count_at=(2, 3))["counts"]
    for sites in (2, 4):
        cfg = _cfg(tmp, "crosscoder", n=256, fp=2, batch=16, dead_tokens=1)
        out[f"count-crosscoder-{sites}"] = _train(cfg, _mesh(cfg), _batches(16, 4, "crosscoder", sites),
                                                  count_at=(2, 3))["counts"]
    for layers in (2, 4):
        cfg = _cfg(tmp, "clt", n=256, fp=2, batch=16, dead_tokens=1)
        out[f"count-clt-{layers}"] = _train(cfg, _mesh(cfg), _batches(16, 4, "clt", 2 * layers),
                                            count_at=(2, 3))["counts"]
    out["export_sharded"] = _export_both_ways(tmp, rank)
    out["heldout"] = _heldout_metrics(tmp, fp=2)
    return out


def _heldout_metrics(tmp, fp):
    """The held-out metrics (SAEBench's core token set) and the max-cosine weight metrics, sampled, of one
    SAE on a feature-parallel mesh or in one process."""
    cfg = _cfg(tmp, "topk", fp=fp)
    sae = SparseAutoencoder(cfg.sae, D, encoder_chunk=32, generator=torch.Generator().manual_seed(3))
    sae = apply_feature_parallel(sae, _mesh(cfg)) if fp > 1 else sae
    held = _batches(B, 3)
    return evaluate(sae, held, 1.3, 2 * B + 5) | weight_metrics(sae, max_cos_latents=N // 2, seed=4)


def _export_both_ways(tmp, rank):
    """The fp=2 SAE exported shard by shard into one file, and gathered whole by rank 0."""
    cfg = _cfg(tmp, "jumprelu", fp=2)
    mesh = _mesh(cfg)
    sae = apply_feature_parallel(
        SparseAutoencoder(cfg.sae, D, encoder_chunk=32, generator=torch.Generator().manual_seed(1)), mesh)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(sae.n_local, generator=torch.Generator().manual_seed(rank)))
        sae.log_threshold.add_(0.1 * (rank + 1))
    meta = {"hook_name": "h"}
    ok = export_sharded(sae, mesh, 1.7, os.path.join(tmp, "sharded"), meta)
    whole = full_sae(sae, mesh)
    if rank == 0:
        export_saelens(whole, 1.7, os.path.join(tmp, "gathered"), meta)
    return ok


def _replica_batches(rank, fp, arch="topk"):
    half = (rank // fp) * B
    return [x[half : half + B] for x in _batches(2 * B, arch=arch)]


def _job_world4(rank, tmp):
    out = {}
    for arch in ARCHS:
        cfg = _cfg(tmp, arch, fp=4)
        out[f"fp4-{arch}"] = _train(cfg, _mesh(cfg), _batches(B, arch=arch))
    cfg = _cfg(tmp, "topk", dp=2, fp=2)
    out["dp2-fp2"] = _train(cfg, _mesh(cfg), _replica_batches(rank, 2))
    for n in (128, 512):
        cfg = _cfg(tmp, "topk", n=n, dp=2, fp=2, batch=16, dead_tokens=1)
        out[f"count-{n}"] = _train(cfg, _mesh(cfg), [x[(rank // 2) * 16 :][:16] for x in _batches(32, 4)],
                                   count_at=(2, 3))["counts"]
    return out


def _job_zero(rank, tmp):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="4")
    out = {}
    for stage, offload in ((1, False), (2, False), (2, True)):
        cfg = _cfg(tmp, "topk", dp=2, fp=2, engine="deepspeed", zero_stage=stage, offload=offload)
        out[f"zero{stage}{'-offload' * offload}"] = _train(cfg, _mesh(cfg), _replica_batches(rank, 2))
    cfg = _cfg(tmp, "topk", dp=2, fp=2, engine="deepspeed", zero_stage=2, param_dtype="bf16")
    out["zero2-bf16"] = _train(cfg, _mesh(cfg), _replica_batches(rank, 2))
    for arch in ZERO_MULTISITE:
        cfg = _cfg(tmp, arch, dp=2, fp=2, engine="deepspeed", zero_stage=2)
        out[f"zero2-{arch}"] = _train(cfg, _mesh(cfg), _replica_batches(rank, 2, arch))
    return out


def _job_bf16(rank, tmp):
    """dp=4: ZeRO's flat partitions cut W_dec's rows between ranks (the masters' row norms are partial
    sums over dp); fp32, bf16, and bf16 with masters and Adam offloaded."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="4")
    out = {}
    for dtype, offload in (("fp32", False), ("bf16", False), ("bf16", True)):
        # the plain transposed encoder: "it learns" below is measured from its worse first loss
        cfg = _cfg(tmp, "topk", dp=4, engine="deepspeed", zero_stage=2, param_dtype=dtype, offload=offload,
                   encoder_scale=1.0)
        out[dtype + "-offload" * offload] = _train(cfg, _mesh(cfg), [x[rank * B : (rank + 1) * B] for x in _batches(4 * B)])
    return out


def _worker(rank, world, port, tmp, job):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(rank, world, "127.0.0.1", port, ParallelConfig(fp=world), N, timeout_s=120)
    try:
        torch.save(job(rank, tmp), os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path_factory, name, job, world):
    tmp = str(tmp_path_factory.mktemp(name))
    mp.spawn(_worker, args=(world, _free_port(), tmp, job), nprocs=world)
    out = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    for r in out:
        r["tmp"] = tmp
    return out


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _spawn(tmp_path_factory, "w2", _job_world2, 2)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _spawn(tmp_path_factory, "w4", _job_world4, 4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    torch.set_num_threads(1)
    out = {arch: _train(cfg, single_process(cfg.parallel, N), _batches(B, arch=arch))
           for arch in ARCHS for cfg in [_cfg(tmp, arch)]}
    cfg = _cfg(tmp, "topk", batch=2 * B)
    out["double"] = _train(cfg, single_process(cfg.parallel, N), _batches(2 * B))
    out["heldout"] = _heldout_metrics(tmp, fp=1)
    return out


def _merged_choice(ranks, key):
    """Every slot of a selection is claimed by exactly one fp rank: OR the ranks' masks together."""
    masks = torch.stack([r[key]["chosen"] for r in ranks])  # (fp, steps, B, n)
    assert int(masks.sum(0).max()) <= 1, "two shards claimed the same latent"
    return masks.any(0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fp", [2, 4])
def test_fp_matches_fp1_losses_indices_and_weights(world2, world4, reference, fp, arch):
    """Losses within 1e-5 relative over 20 steps, the same selections (top-k families: the merged
    masks; threshold families decide per latent, so equal weights at every step mean equal ones) and
    the same weights."""
    ranks = world2 if fp == 2 else world4[:4]
    key = f"fp{fp}-{arch}"
    ref = reference[arch]
    for r in ranks:
        got, want = torch.tensor(r[key]["losses"]), torch.tensor(ref["losses"])
        assert torch.allclose(got, want, rtol=1e-5, atol=0), (got - want).abs().max()
    if not ref["chosen"].numel():  # a threshold family: no cross-shard selection to compare
        assert all(not r[key]["chosen"].numel() for r in ranks)
        chosen = None
    else:
        chosen = _merged_choice(ranks, key)
    assert chosen is None or torch.equal(chosen, ref["chosen"]), f"selection differs at steps {(chosen != ref['chosen']).any(-1).any(-1).nonzero().flatten().tolist()}"
    if arch == "topk":
        assert chosen is not None and bool((chosen.sum(-1) == K).all())
    for name, want in ref["weights"].items():
        got = ranks[0][key]["weights"][name]
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), f"{name}: {(got - want).abs().max()}"


@pytest.mark.parametrize("fp", [2, 4])
def test_per_rank_parameter_and_optimizer_bytes_are_one_over_fp(world2, world4, reference, fp):
    ranks = world2 if fp == 2 else world4
    total = reference["topk"]["bytes"]
    for r in ranks:
        assert abs(r[f"fp{fp}-topk"]["bytes"] * fp / total - 1) < 0.01


def _assert_same_updates(got_ranks, key, want, fp=2):
    """dp=2 replicas' mean loss is the doubled batch's loss; weights after every update agree."""
    losses = torch.tensor([r[key]["losses"] for r in got_ranks])  # (world, steps)
    mean_over_replicas = (losses[0] + losses[fp]) / 2  # rank = dp_rank * fp + fp_rank
    assert torch.allclose(mean_over_replicas, torch.tensor(want["losses"]), rtol=1e-5)
    for r in got_ranks:
        for name, w in want["weights"].items():
            assert torch.allclose(r[key]["weights"][name], w, atol=1e-5, rtol=1e-4), name


def test_dp2_fp2_matches_dp1_fp2_with_doubled_batch(world2, world4):
    _assert_same_updates(world4, "dp2-fp2", world2[0]["dp1-fp2-double"])


def test_dp2_fp1_matches_one_process_with_doubled_batch(world2, reference):
    _assert_same_updates(world2, "dp2-fp1", reference["double"], fp=1)


def test_parallel_dims_errors_name_the_field_and_values():
    with pytest.raises(ConfigError, match=r"parallel\.fp \(3\) must divide sae\.n_latents \(16384\)"):
        ParallelDims(dp=1, fp=3, world_size=3, n_latents=16384)
    with pytest.raises(ConfigError, match=r"parallel\.dp \(2\) x parallel\.fp \(2\) = 4 must equal the world size \(3\)"):
        ParallelDims(dp=2, fp=2, world_size=3, n_latents=16)
    with pytest.raises(ConfigError, match=r"world size \(1\)"):
        single_process(ParallelConfig(dp=2), 16)


def test_replicas_read_disjoint_chunks_and_resume_exactly():
    src = SyntheticSource(D, 16, 2, seed=0, chunk_tokens=8)
    firsts = [[acts for acts, _ in zip_n(ReplicaSource(src, r, 3).chunks(), 4)] for r in range(3)]
    dealt = torch.stack([firsts[i % 3][i // 3] for i in range(12)])
    assert torch.equal(dealt, torch.stack([src.chunk(i) for i in range(12)]))  # round-robin, nothing shared
    stream = BatchStream(ReplicaSource(src, 1, 3), 8, 16, seed=3)
    it = iter(stream)
    for _ in range(3):
        next(it)
    state = dict(stream.state_dict())
    after = [next(it) for _ in range(3)]
    again = BatchStream(ReplicaSource(src, 1, 3), 8, 16, seed=3)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, iter(again)))


def zip_n(it, n):
    return [x for x, _ in zip(it, range(n))]


def test_collectives_per_step_are_fixed_and_independent_of_n_latents(world2, world4):
    # TopK + AuxK with dead latents present. fp=2: dead count, L0, clip norm, 2 x decode, encoder-input
    # gradient, each token's k-th activation for the revival of starving latents (7 all-reduces) + 2
    # candidate all-gathers. dp=2 adds the gradient reduction (3 all-reduces), the revival's mean k-th
    # activation (1) and the global-batch variance for the two FVUs (2 all-gathers).
    fp_only = {"all_reduce": 7, "all_gather_single": 2}
    both = {"all_reduce": 11, "all_gather_single": 4}
    for ranks, want in ((world2, fp_only), (world4, both)):
        for r in ranks:
            for step in (2, 3):
                assert r["count-128"][step] == r["count-512"][step] == want, r["count-128"]


def test_clt_collectives_do_not_grow_with_the_number_of_layers(world2):
    # every layer's selection in one all-gather, and the same for AuxK's dead candidates; the decodes
    # of every layer's selection and of its AuxK latents in one all-reduce; with the dead count, the L0
    # statistic and the clip norm (the encoder's input is data, so no gradient to sum)
    for r in world2:
        for step in (2, 3):
            assert r["count-clt-2"][step] == r["count-clt-4"][step] == {"all_reduce": 4, "all_gather_single": 2}, r["count-clt-2"]


def test_crosscoder_collectives_do_not_grow_with_the_number_of_sites(world2):
    # TopK's: the sites' partial decodes travel as one (B, S d) sum, and their FVUs need no collective
    for r in world2:
        for step in (2, 3):
            assert r["count-crosscoder-2"][step] == r["count-crosscoder-4"][step] == r["count-128"][step], r["count-crosscoder-2"]


@pytest.mark.parametrize("arch,want", [
    # L0 penalty, L0, decode, encoder-input gradient, clip norm; no selection to gather
    ("jumprelu", {"all_reduce": 5}),
    # L1 penalty, L0, decode, frozen-decoder decode, encoder-input gradient, clip norm
    ("gated", {"all_reduce": 6}),
])
def test_threshold_family_collectives_do_not_grow_with_n(world2, arch, want):
    for r in world2:
        for step in (2, 3):
            assert r[f"count-{arch}-128"][step] == r[f"count-{arch}-512"][step] == want, r[f"count-{arch}-128"]


def test_matryoshka_collectives_do_not_grow_with_n_or_the_number_of_prefixes(world2):
    # BatchTopK + AuxK, fp=2: TopK's 6 all-reduces (dead count, L0, clip norm, the decode - here one
    # stack of every prefix's decode -, AuxK's decode, encoder-input gradient) plus the inference
    # threshold's minimum; the candidate all-gathers of the batch selection and AuxK. The same at
    # n=128 with 2 prefixes and n=512 with 5.
    for r in world2:
        for step in (2, 3):
            small, large = r["count-matryoshka-128"][step], r["count-matryoshka-512"][step]
            assert small == large == {"all_reduce": 7, "all_gather_single": 2}, (small, large)


def test_zero_stage_1_and_2_match_dp1_with_doubled_batch_and_shard_adam_over_dp(world2, reference, tmp_path_factory):
    pytest.importorskip("deepspeed")
    zero = _spawn(tmp_path_factory, "zero", _job_zero, 4)
    adam_total = reference["topk"]["opt_bytes"]  # whole Adam state (exp_avg, exp_avg_sq) of one process
    for key in ("zero1", "zero2", "zero2-offload"):
        _assert_same_updates(zero, key, world2[0]["dp1-fp2-double"])
        for r in zero:  # each of the 4 ranks holds a quarter: 1/fp of the latents, 1/dp of their state
            assert abs(r[key]["opt_bytes"] * 4 / adam_total - 1) < 0.01, (key, r[key]["opt_bytes"], adam_total)
    for r in zero:  # bf16 weights with fp shards: each shard's fp32 masters unit-norm, losses follow fp32
        assert r["zero2-bf16"]["dtypes"] == {torch.bfloat16}
        W = r["zero2-bf16"]["masters"]["W_dec"]
        assert W.shape[0] == N // 2 and (W.norm(dim=1) - 1).abs().max() < 1e-6
        got, want = torch.tensor(r["zero2-bf16"]["losses"]), torch.tensor(r["zero2"]["losses"])
        assert torch.allclose(got, want, rtol=3e-2), (got - want).abs().max()
    for arch in ZERO_MULTISITE:  # a crosscoder's and a CLT's (its zero blocks in ZeRO's flat partitions) updates
        _assert_same_updates(zero, f"zero2-{arch}", world2[0][f"dp1-fp2-double-{arch}"])


def test_bf16_weights_train_like_fp32_with_fp32_unit_norm_masters(tmp_path_factory):
    """trainer.param_dtype=bf16 under ZeRO-2, dp=4: bf16 weights (half the bytes), fp32 masters whose
    decoder rows are unit-norm, even the rows that ZeRO's partitions cut in two; the model weights are
    the masters rounded; losses follow the fp32 run."""
    pytest.importorskip("deepspeed")
    ranks = _spawn(tmp_path_factory, "bf16", _job_bf16, 4)
    fp32, bf16 = ranks[0]["fp32"], ranks[0]["bf16"]
    assert bf16["dtypes"] == {torch.bfloat16} and fp32["dtypes"] == {torch.float32}
    assert bf16["param_bytes"] * 2 == fp32["param_bytes"]
    for r, key in ((r, key) for r in ranks for key in ("bf16", "bf16-offload")):
        masters, model = r[key]["masters"], r[key]["model"]
        W = masters["W_dec"]
        assert W.dtype == torch.float32 and (W.norm(dim=1) - 1).abs().max() < 1e-6, (W.norm(dim=1) - 1).abs().max()
        assert not torch.equal(W, W.bfloat16().float())  # fp32 precision that bf16 weights cannot hold
        for name, m in masters.items():
            assert torch.equal(model[name], m.to(model[name].dtype)), name
            assert torch.equal(m, ranks[0][key]["masters"][name]), name  # every replica agrees
    # masters and Adam offloaded to the host: the same updates
    assert ranks[0]["bf16-offload"]["losses"] == ranks[0]["bf16"]["losses"]
    got = torch.tensor([r["bf16"]["losses"] for r in ranks]).mean(0)
    want = torch.tensor([r["fp32"]["losses"] for r in ranks]).mean(0)
    assert torch.allclose(got, want, rtol=3e-2), (got - want).abs().max()  # 20 steps: within 1.1% here
    assert got[-5:].mean() < 0.8 * got[0]  # and it learns


def test_torchrun_fp2_reaches_single_rank_fvu(tmp_path):
    from sae_dist.run import train

    overrides = {"model": {"d_model": 64}, "data": {"synthetic_n_features": 256, "synthetic_k": 4},
                 "sae": {"n_latents": 512, "k": 8, "dead_tokens": 20000},
                 "trainer": {"total_tokens": 512 * 60, "batch_tokens": 512, "encoder_chunk": 128, "log_every": 20,
                             "device": "cpu"}}
    single = train(synthetic_config(tmp_path / "single", **overrides))
    out = tmp_path / "fp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "sae_dist", "data=synthetic", "model.d_model=64", "data.synthetic_n_features=256",
           "data.synthetic_k=4", "sae.n_latents=512", "sae.k=8", "sae.dead_tokens=20000",
           "trainer.total_tokens=30720", "trainer.batch_tokens=512", "trainer.encoder_chunk=128",
           "trainer.eval_tokens=2048", "trainer.scale_tokens=1024", "trainer.warmup_tokens=2560",
           "data.shuffle_buffer_tokens=2048", "checkpoint.every_steps=0", "tracking=none", "parallel.fp=2",
           "trainer.device=cpu",  # a gloo test on CPU, also where GPUs are present
           f"hydra.run.dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == single["steps"] == 60
    assert abs(results["fvu"] - single["fvu"]) < 0.01 + 0.02 * single["fvu"], (results["fvu"], single["fvu"])
    assert (out / "sae" / "sae_weights.safetensors").exists()


def test_engine_auto_is_deepspeed_with_data_replicas_only(tmp_path):
    from sae_dist.parallel.engine import engine_name

    assert engine_name(synthetic_config(tmp_path, parallel={"dp": 2})) == "deepspeed"
    assert engine_name(synthetic_config(tmp_path, parallel={"dp": 1})) == "torch"
    assert engine_name(synthetic_config(tmp_path, parallel={"dp": 2, "engine": "torch"})) == "torch"


def test_fp2_heldout_and_weight_metrics_equal_one_process(world2, reference):
    """Every held-out figure (sums over shards) and the sampled max cosines (query directions summed,
    maxima reduced over shards) equal the one-process ones."""
    want = reference["heldout"]
    assert want["tokens"] == 2 * B + 5 and want["max_cos_latents"] == N // 2 and 0 < want["fvu"] < 2
    for r in world2:
        assert set(r["heldout"]) == set(want)
        for key, value in want.items():
            assert r["heldout"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_fp2_export_written_shard_by_shard_equals_the_gathered_one(world2):
    """No rank holds the whole SAE, and the file is the same as the one a gathered SAE gives."""
    from safetensors.torch import load_file

    assert all(r["export_sharded"] for r in world2)
    tmp = world2[0]["tmp"]
    sharded = load_file(os.path.join(tmp, "sharded", "sae_weights.safetensors"))
    gathered = load_file(os.path.join(tmp, "gathered", "sae_weights.safetensors"))
    assert set(sharded) == set(gathered) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    for name, want in gathered.items():
        assert torch.equal(sharded[name], want), name
    with open(os.path.join(tmp, "sharded", "cfg.json")) as a, open(os.path.join(tmp, "gathered", "cfg.json")) as b:
        assert json.load(a) == json.load(b)
    assert not [f for f in os.listdir(os.path.join(tmp, "sharded")) if "partial" in f]
