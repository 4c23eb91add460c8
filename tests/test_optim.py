"""The optimizers of `trainer.optimizer`: signum_sf's update rule and muon's Newton-Schulz against hand
computations, the sharded Newton-Schulz and fp=2 training against fp=1 with real gloo processes, exact
resume (and resharding the state from fp=2 to fp=1), and checkpoints or engines of another optimizer
refusing them.

    python -m pytest -q tests/test_optim.py
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import synthetic_config
from safetensors.torch import load_file

from sae_dist.checkpoint import Checkpointer, step_name
from sae_dist.config import ConfigError, ParallelConfig
from sae_dist.optim import NS_COEFFICIENTS, ChunkedAdam, Muon, SignumScheduleFree, newton_schulz, reset_rows
from sae_dist.parallel.dims import init_distributed
from sae_dist.parallel.engine import check_supported
from sae_dist.parallel.fp import FeatureParallelComm
from sae_dist.run import train
from sae_dist.sae import SaeOutput, SparseAutoencoder
from sae_dist.tracking import NullTracker
from sae_dist.trainer import Trainer, TrainState, adam_lr_in_n, revive_window

STEPS = 20


def _cfg(tmp, fp=1, optimizer="signum_sf", lazy="auto", **checkpoint):
    """`optimizer` "lazy_adam" is trainer.optimizer=adam with trainer.lazy_rows=on; `lazy` is lazy_rows."""
    lazy = "on" if optimizer == "lazy_adam" else lazy
    optimizer = "adam" if optimizer == "lazy_adam" else optimizer
    return synthetic_config(
        tmp,
        trainer={"optimizer": optimizer, "lazy_rows": lazy, "total_tokens": 256 * STEPS, "log_every": 1},
        parallel={"fp": fp, "engine": "torch"},
        checkpoint={"every_steps": 10, "keep_last": 5, "async_upload": False, **checkpoint},
    )


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("chunk", [777, 4096, 1 << 22])
def test_chunked_adam_is_torch_adam_bit_for_bit_and_shares_its_state(chunk, lazy):
    # slices that split rows (777), that are whole rows (4096 = some rows of 384 and not others: 4096
    # is not a multiple of 384) and one slice per parameter; the learning rate changes every step, as
    # under warm-up, and the gradients' scale spans six orders of magnitude. Every row has a gradient,
    # so lazy Adam (whose slices are whole rows) is torch's Adam too
    g = torch.Generator().manual_seed(0)
    shapes = [(1000, 384), (1000,), (3, 5, 7)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = ChunkedAdam(ours, lr=1e-3, chunk=chunk, lazy=lazy)
    ref_opt = torch.optim.Adam(ref, lr=1e-3, foreach=False)
    for step in range(6):
        for o in (opt, ref_opt):
            o.param_groups[0]["lr"] = 1e-3 * (step + 1) / 3
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g) * 10.0 ** (step - 3)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, ref):
            assert torch.equal(a, b), (chunk, step)
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[a][key], ref_opt.state[b][key]), (chunk, step, key)
    # a checkpoint of either loads into the other
    again = ChunkedAdam(ref, lr=1e-3, chunk=chunk)
    again.load_state_dict(ref_opt.state_dict())
    assert again.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("chunk", [777, 1 << 22])
def test_lazy_adam_is_sparse_adam_on_the_rows_with_gradient_and_leaves_the_others(chunk):
    """torch's SparseAdam (the reference of "lazy" Adam: it updates the rows present in a sparse gradient,
    with the global step's bias corrections) on the same gradients with their zero rows left out; 777
    elements make slices of 32 rows of 24. A row without gradient keeps its weights and moments bit for
    bit."""
    g = torch.Generator().manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(300, 24, generator=g))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt = ChunkedAdam([ours], lr=1e-2, chunk=chunk, lazy=True)
    ref_opt = torch.optim.SparseAdam([ref], lr=1e-2)
    dense = ChunkedAdam([torch.nn.Parameter(ours.detach().clone())], lr=1e-2, chunk=chunk)
    start = ours.detach().clone()
    for step in range(6):
        grad = torch.randn(ours.shape, generator=g)
        grad[torch.rand(300, generator=g) < 0.5] = 0.0  # half the rows (latents) have no gradient
        grad[:10] = 0.0  # rows 0-9 never get one
        before = {k: t.clone() for k, t in opt.state[ours].items()} if step else {}
        kept = ours.detach().clone()
        ours.grad = grad.clone()
        ref.grad = grad.to_sparse(sparse_dim=1)  # the rows with gradient
        opt.step()
        ref_opt.step()
        idle = grad.eq(0).all(dim=1)
        assert torch.equal(ours[idle], kept[idle])
        for key in ("exp_avg", "exp_avg_sq"):
            if before:
                assert torch.equal(opt.state[ours][key][idle], before[key][idle]), (step, key)
            assert torch.allclose(opt.state[ours][key], ref_opt.state[ref][key], rtol=1e-5, atol=1e-7), (step, key)
        # SparseAdam adds eps to sqrt(v) before the bias correction, torch's Adam after: within 0.2% of a step
        assert torch.allclose(ours, ref, rtol=0, atol=2e-5), step
        dense.param_groups[0]["params"][0].grad = grad.clone()
        dense.step()
    assert torch.equal(ours[:10], start[:10]) and torch.equal(opt.state[ours]["exp_avg"][:10], torch.zeros(10, 24))
    assert not torch.allclose(dense.param_groups[0]["params"][0], ours)  # dense Adam moved the idle rows


@pytest.mark.parametrize("optimizer", ["adam", "signum_sf"])
def test_lazy_rows_change_the_synthetic_job_that_the_fp_and_resume_tests_train(tmp_path, optimizer):
    """Latents that do not fire in a step exist in `_cfg`'s job, so its fp=2 and resume cases of adam and
    signum_sf (lazy by default) test the lazy path, and trainer.lazy_rows=off turns it off."""
    lazy = train(_cfg(tmp_path / "lazy", optimizer=optimizer))
    dense = train(_cfg(tmp_path / "dense", optimizer=optimizer, lazy="off"))
    assert lazy["history"][0] == dense["history"][0]
    assert lazy["history"][-1] != dense["history"][-1]


def test_lazy_adam_on_the_deepspeed_engine_is_refused_before_any_work(tmp_path):
    cfg = synthetic_config(tmp_path, trainer={"optimizer": "adam", "lazy_rows": "on"}, parallel={"dp": 2})
    with pytest.raises(ConfigError, match=r"trainer\.lazy_rows \(on\) needs the torch engine, but parallel\.engine "
                       r"\(auto\) is deepspeed for parallel\.dp \(2\).*set parallel\.engine=torch"):
        check_supported(cfg, torch.device("cpu"))


def test_signum_sf_matches_a_hand_computed_three_steps():
    """momentum 0.5 and lrs 0.5, 1, 1 keep the arithmetic exact or nearly; loss (p - t)^2 / 2 makes the
    gradient sign(y - t), so a gradient taken at x or z instead of y gives other signs at step 3."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    target = torch.tensor([0.25, -3.0])
    opt = SignumScheduleFree([p], lr=1.0, momentum=0.5)
    seen_y = []
    for lr in (0.5, 1.0, 1.0):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        opt.gradient_point()
        seen_y.append(p.detach().clone())
        ((p - target) ** 2).sum().div(2).backward()
        opt.step()
    # step 1: y = x = z = [1, -2], sign(y - t) = [+, +]  -> z = [0.5, -2.5], c = 1: x = z
    # step 2: y = [0.5, -2.5],  sign = [+, +]             -> z = [-0.5, -3.5], c = 1 / 1.25: x = [-0.3, -3.3]
    # step 3: y = [-0.4, -3.4], sign = [-, -]             -> z = [0.5, -2.5], c = 1 / 2.25: x = x + (z - x) 4/9
    want_y = [[1.0, -2.0], [0.5, -2.5], [-0.4, -3.4]]
    for got, want in zip(seen_y, want_y):
        assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    assert torch.allclose(p.detach(), torch.tensor([-0.3 + 0.8 * 4 / 9, -3.3 + 0.8 * 4 / 9]), atol=1e-6)
    st = opt.state[p]
    assert torch.equal(st["z"], torch.tensor([0.5, -2.5]))
    assert (float(st["step"]), float(st["lr_max"]), float(st["weight_sum"])) == (3.0, 1.0, 2.25)


def test_lazy_signum_sf_leaves_rows_without_gradient_and_steps_the_others_as_the_dense_update():
    g = torch.Generator().manual_seed(0)
    lazy_p = torch.nn.Parameter(torch.randn(40, 6, generator=g))
    dense_p = torch.nn.Parameter(lazy_p.detach().clone())
    lazy = SignumScheduleFree([lazy_p], lr=0.1, lazy=True)
    dense = SignumScheduleFree([dense_p], lr=0.1)
    idle = torch.arange(40) < 10
    for step in range(5):
        grad = torch.randn(40, 6, generator=g)
        if step >= 2:
            grad[idle] = 0.0  # rows 0-9 stop getting a gradient after two steps
        x_before = lazy_p.detach().clone()
        z_before = lazy.state[lazy_p]["z"].clone() if step else None
        for opt, p in ((lazy, lazy_p), (dense, dense_p)):
            opt.gradient_point()
            p.grad = grad.clone()
            opt.step()
        if step < 2:  # every row has a gradient: the dense update, bit for bit
            assert torch.equal(lazy_p, dense_p) and torch.equal(lazy.state[lazy_p]["z"], dense.state[dense_p]["z"])
        else:
            assert torch.equal(lazy_p[idle], x_before[idle]) and torch.equal(lazy.state[lazy_p]["z"][idle], z_before[idle])
            assert not torch.equal(dense_p[idle], x_before[idle])  # the dense average kept moving toward z
            assert not torch.equal(lazy_p[~idle], x_before[~idle])


def test_signum_sf_keeps_unit_rows_of_z_and_refuses_a_step_without_gradient_point():
    W = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(4, 3), dim=1))
    opt = SignumScheduleFree([W], lr=0.3, unit_rows=(W,))
    opt.gradient_point()
    W.sum().backward()
    opt.step()
    assert torch.allclose(opt.state[W]["z"].norm(dim=1), torch.ones(4))
    with pytest.raises(RuntimeError, match=r"call gradient_point\(\) before the forward"):
        opt.step()


def test_newton_schulz_maps_each_singular_value_through_the_quintic():
    """NS(G) = U f(S / ||S||) V^T for G = U S V^T, f the quintic iterated 5 times, computed here on the
    singular values alone; for a tall random matrix every f(s) lands in the band around 1."""
    G = torch.randn(257, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    a, b, c = NS_COEFFICIENTS
    s = S / S.norm()
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    assert torch.allclose(newton_schulz(G), U @ torch.diag(s) @ Vh, atol=1e-10)
    assert 0.68 < float(s.min()) and float(s.max()) < 1.21, s
    assert float(s.max() - s.min()) > 0.05  # not U V^T: the iteration stops in a band, not at 1


class _MirroredShard:
    """Shard 0 of 2 whose other shard holds the same rows: the sum over shards is twice this one's."""

    n_shards = 2

    def sum_over_shards(self, t):  # type: ignore[no-untyped-def]
        return 2 * t


def test_muon_steps_a_shard_as_its_rows_of_the_whole_matrix_and_vectors_as_adam():
    """One step: the matrix moves by lr 0.2 sqrt(max(rows, d)) NS(g) with the whole matrix's rows (Nesterov
    momentum's u is a multiple of g, and NS ignores scale), the vector exactly as torch Adam moves it;
    reset_rows zeroes the momentum of the rows given."""
    gen = torch.Generator().manual_seed(1)
    W, gW = torch.randn(40, 8, generator=gen), torch.randn(40, 8, generator=gen)
    b, gb = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    shard, bias, ref_bias = (torch.nn.Parameter(t.clone()) for t in (W, b, b))
    opt = Muon([shard, bias], lr=0.01, comm=_MirroredShard(), sharded=(shard,))
    ref = torch.optim.Adam([ref_bias], lr=0.01)
    shard.grad, bias.grad, ref_bias.grad = gW.clone(), gb.clone(), gb.clone()
    opt.step()
    ref.step()
    whole = newton_schulz(torch.cat([gW, gW]))[:40]  # the 80 rows both shards make up
    assert torch.allclose(shard.detach(), W - 0.01 * 0.2 * 80**0.5 * whole, atol=1e-6)
    assert torch.allclose(bias.detach(), ref_bias.detach(), rtol=0, atol=1e-7)
    assert set(opt.state[shard]) == {"momentum_buffer"}
    assert set(opt.state[bias]) == {"step", "exp_avg", "exp_avg_sq"}
    reset_rows(opt, shard, torch.tensor([3, 7]))
    reset_rows(opt, bias, torch.tensor([3]))
    momentum = opt.state[shard]["momentum_buffer"]
    assert not momentum[[3, 7]].any() and momentum[0].any()
    assert opt.state[bias]["exp_avg"][3] == 0 and opt.state[bias]["exp_avg_sq"][3] == 0


class _StopAt(NullTracker):
    """Ends the job (an exception out of train) when step `step` is logged: a kill after a checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def log_metrics(self, metrics, step):  # type: ignore[no-untyped-def]
        if step == self.step:
            raise KeyboardInterrupt(f"stopped at step {step}")


def _export(out: dict) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out["export_dir"], "sae_weights.safetensors"))


@pytest.mark.parametrize("optimizer", ["signum_sf", "muon", "lazy_adam"])
def test_resumes_bit_exactly(tmp_path, optimizer):
    straight = train(_cfg(tmp_path / "straight", optimizer=optimizer))
    assert len(straight["history"]) == STEPS
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "broken", optimizer=optimizer), _StopAt(13))
    steps = [s for s, _ in Checkpointer(_cfg(tmp_path / "broken", optimizer=optimizer)).complete_steps()]
    assert steps == [10]
    resumed = train(_cfg(tmp_path / "broken", optimizer=optimizer, resume_from="latest"))
    assert resumed["history"] == straight["history"][10:]
    for name, t in _export(straight).items():
        assert torch.equal(_export(resumed)[name], t), name


@pytest.mark.parametrize(("saved", "configured"), [("adam", "signum_sf"), ("adam", "muon"), ("muon", "adam")])
def test_checkpoint_does_not_seed_another_optimizer(tmp_path, saved, configured):
    """muon's keys include Adam's (its vectors train with Adam): an Adam checkpoint is still told apart."""
    train(_cfg(tmp_path, optimizer=saved))
    want = rf"holds {saved} state .* but trainer\.optimizer is {configured}; "
    want += rf"resume with trainer\.optimizer={saved}"
    with pytest.raises(ConfigError, match=want):
        train(_cfg(tmp_path, optimizer=configured, resume_from="latest"))


@pytest.mark.parametrize("optimizer", ["signum_sf", "muon"])
def test_checkpoint_does_not_seed_deepspeed_adam(tmp_path, optimizer):
    pytest.importorskip("deepspeed")
    train(_cfg(tmp_path, optimizer=optimizer))
    cfg = _cfg(tmp_path, optimizer="adam", resume_from="latest")
    cfg.parallel.engine = "deepspeed"
    want = rf"holds {optimizer} state .* is adam; resume with trainer\.optimizer={optimizer},"
    with pytest.raises(ConfigError, match=want):
        train(cfg)


@pytest.mark.parametrize("optimizer", ["signum_sf", "muon"])
@pytest.mark.parametrize(("parallel", "fix"), [
    ({"engine": "deepspeed"}, r"parallel\.engine is deepspeed, .*set parallel\.engine=torch"),
    ({"engine": "auto", "dp": 2}, r"parallel\.engine \(auto\) picks deepspeed for parallel\.dp \(2\)"),
])
def test_deepspeed_engine_refuses_other_optimizers_before_any_work(tmp_path, parallel, fix, optimizer):
    cfg = synthetic_config(tmp_path, trainer={"optimizer": optimizer}, parallel=parallel)
    want = rf"trainer\.optimizer \({optimizer}\) runs on the torch engine only, but {fix}"
    want += r".*or set trainer\.optimizer=adam"
    with pytest.raises(ConfigError, match=want):
        check_supported(cfg, torch.device("cpu"))
    if parallel["engine"] == "deepspeed":
        with pytest.raises(ConfigError, match=rf"trainer\.optimizer \({optimizer}\)"):
            train(cfg)
        assert not (tmp_path / "checkpoints").exists()


def test_bf16_weights_refuse_signum_sf_naming_param_dtype(tmp_path):
    cfg = synthetic_config(tmp_path, trainer={"optimizer": "signum_sf", "param_dtype": "bf16"})
    with pytest.raises(ConfigError, match=r"set trainer\.param_dtype=fp32 and parallel\.engine=torch"):
        check_supported(cfg, torch.device("cpu"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, tmp: str, optimizer: str) -> None:
    """One rank of an fp=2 job through the driver's own path (run.train), as under torchrun."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    out = train(_cfg(tmp, fp=2, optimizer=optimizer))
    if rank == 0:
        with open(os.path.join(tmp, "history.json"), "w") as fh:
            json.dump({"history": out["history"], "export_dir": out["export_dir"]}, fh)


@pytest.fixture(scope="module", params=["signum_sf", "muon", "lazy_adam"])
def fp2(tmp_path_factory, request):
    tmp = str(tmp_path_factory.mktemp(f"fp2-{request.param}"))
    mp.spawn(_rank, args=(_free_port(), tmp, request.param), nprocs=2)
    with open(os.path.join(tmp, "history.json")) as fh:
        return json.load(fh) | {"tmp": tmp, "optimizer": request.param}


def test_fp2_matches_fp1_losses_and_weights(fp2, tmp_path):
    one = train(_cfg(tmp_path, optimizer=fp2["optimizer"]))
    assert torch.allclose(torch.tensor(fp2["history"]), torch.tensor(one["history"]), rtol=1e-5, atol=0)
    sharded, whole = _export(fp2), _export(one)
    assert sharded.keys() == whole.keys()
    for name, t in whole.items():
        assert torch.allclose(sharded[name], t, rtol=1e-5, atol=1e-6), name
    norms = whole["W_dec"].norm(dim=1)  # unit rows, then scaled by the export's activation scale
    assert torch.allclose(norms, norms[0].expand_as(norms))


def test_fp2_keeps_replicated_parameters_and_their_state_identical_on_both_shards(fp2):
    step = os.path.join(fp2["tmp"], "checkpoints", "sae", step_name(STEPS))
    for kind in ("model", "optim"):
        shards = [load_file(os.path.join(step, f"{kind}-fp{j}of2.safetensors")) for j in range(2)]
        replicated = [k for k in shards[0] if k.split(".")[0] == "b_dec"]
        assert replicated, kind
        for k in replicated:
            assert torch.equal(shards[0][k], shards[1][k]), k


def test_fp2_checkpoint_reshards_onto_fp1(fp2, tmp_path):
    """The fp=2 run's step-10 state (per-latent rows cut, b_dec's and the counters whole) continues on one
    process along the fp=2 run's own path."""
    step10 = os.path.join(fp2["tmp"], "checkpoints", "sae", step_name(10))
    resumed = train(_cfg(tmp_path, optimizer=fp2["optimizer"], resume_from=step10))
    assert len(resumed["history"]) == STEPS - 10
    assert torch.allclose(torch.tensor(resumed["history"]), torch.tensor(fp2["history"][10:]), rtol=1e-5, atol=0)
    for name, t in _export(fp2).items():
        assert torch.allclose(_export(resumed)[name], t, rtol=1e-5, atol=1e-6), name


NS_ROWS = 96


def _newton_schulz_rank(rank: int, port: int, tmp: str) -> None:
    """Shard `rank` of 2 of the encoder and decoder gradients (2, 96, 24) through FeatureParallelComm,
    counting the all-reduces."""
    torch.set_num_threads(1)
    mesh = init_distributed(rank, 2, "127.0.0.1", port, ParallelConfig(fp=2), NS_ROWS, timeout_s=60)
    try:
        G = torch.randn(2, NS_ROWS, 24, generator=torch.Generator().manual_seed(3))
        rows = slice(mesh.latent_offset, mesh.latent_offset + mesh.dims.n_local)
        calls, all_reduce = [], dist.all_reduce

        def counted(t, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(t.shape)
            return all_reduce(t, *args, **kwargs)

        dist.all_reduce = counted
        try:
            out = newton_schulz(G[:, rows], 5, FeatureParallelComm(mesh).sum_over_shards)
        finally:
            dist.all_reduce = all_reduce
        torch.save({"out": out, "all_reduces": calls}, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_newton_schulz_over_gloo_matches_unsharded(tmp_path):
    mp.spawn(_newton_schulz_rank, args=(_free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = newton_schulz(torch.randn(2, NS_ROWS, 24, generator=torch.Generator().manual_seed(3)))
    sharded = torch.cat([r["out"] for r in ranks], dim=1)
    assert torch.allclose(sharded, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))
    assert ranks[0]["all_reduces"] == [torch.Size([2, 24, 24])] * 5  # one per iteration, the norm included


def test_automatic_schedule_scales_with_the_batch_and_the_token_budget(tmp_path):
    from sae_dist.trainer import auto_lr, dead_window, optimizer_of

    def cfg(batch, total=1_048_576, dp=1, **trainer):
        return synthetic_config(tmp_path, sae={"n_latents": 16384, "k": 4, "dead_tokens": 0},
                                trainer={"batch_tokens": batch, "total_tokens": total, "optimizer": "adam", **trainer},
                                parallel={"dp": dp})

    base = auto_lr(cfg(1024))
    # Gao et al.'s rule at n = 6144, falling as n^-0.65 to 2^14, x lr_scale, at the tuned batch
    assert base == pytest.approx(2e-4 * (16384 / 6144) ** 0.5 * (16384 / 6144) ** -0.65 * 6)
    assert adam_lr_in_n(6144) == pytest.approx(2e-4 / (6144 / 16384) ** 0.5)  # Gao et al.'s at the tuned size
    assert adam_lr_in_n(49152) == pytest.approx(adam_lr_in_n(6144) * 8**-0.65)
    assert auto_lr(cfg(4096)) == pytest.approx(2 * base)  # square root of the batch
    assert auto_lr(cfg(2048, dp=2)) == pytest.approx(2 * base)  # every replica's tokens count
    assert auto_lr(cfg(4096, lr=1e-3)) == 1e-3
    # a 32nd of the run, but at least 128 firings of an average latent (n / k = 4096 tokens each here)
    assert dead_window(cfg(1024)) == 128 * 16384 // 4 and dead_window(cfg(1024, total=10**10)) == 10_000_000
    assert dead_window(cfg(1024, total=2**26)) == 2**26 // 32
    # a CLT's latents per token are k on every one of its L layers: 16 x 6 over 6144 latents
    clt = synthetic_config(tmp_path, sae={"arch": "clt", "n_latents": 6144, "k": 16, "dead_tokens": 0},
                           data={"synthetic_sites": 12}, trainer={"total_tokens": 2**17})
    assert dead_window(clt) == 128 * 6144 // (16 * 6)
    c = cfg(4096, warmup_tokens=51_200)
    trainer = Trainer(c, SparseAutoencoder(c.sae, 32), TrainState())
    assert trainer.warmup_steps == 13 and trainer.total_steps == 256  # ceil(51200 / 4096) steps of warm-up
    assert trainer.optimizer_name == "adam"
    assert optimizer_of(cfg(1024, total=1024 * 127, optimizer="auto")) == "signum_sf"  # fewer than 128 steps
    assert optimizer_of(cfg(1024, total=1024 * 128, optimizer="auto")) == "adam"
    # signum_sf: sparsify's rule from 128 steps up, sqrt(128 / steps) times it below (64 steps: x sqrt 2)
    assert auto_lr(cfg(1024, total=1024 * 64, optimizer="auto")) == pytest.approx(5e-3 * 2**0.5)
    assert auto_lr(cfg(1024, total=1024 * 32, optimizer="signum_sf")) == pytest.approx(1e-2)
    assert auto_lr(cfg(1024, total=1024 * 512, optimizer="signum_sf")) == pytest.approx(5e-3)
    assert optimizer_of(cfg(512, total=1024 * 64, dp=2, optimizer="auto", param_dtype="bf16")) == "adam"  # ZeRO


@pytest.mark.parametrize("optimizer", ["adam", "signum_sf"])
def test_revival_raises_b_enc_of_starving_latents_by_a_step_up_to_the_cap(tmp_path, optimizer):
    """Latents without a firing for `revive_window` tokens get b_enc + revive_step x the mean
    k-th activation, no higher than revive_cap x it (one already above stays); the others are left
    alone; signum_sf's base iterate z moves with its average, so their distance is unchanged."""
    cfg = synthetic_config(tmp_path, trainer={"optimizer": optimizer}, parallel={"engine": "torch"})
    trainer = Trainer(cfg, SparseAutoencoder(cfg.sae, 32), TrainState())
    trainer.train_step(torch.randn(256, 32))  # the optimizer's state exists
    window = revive_window(cfg)
    assert window == trainer.revive_tokens == max(16 * 256 / 4, cfg.trainer.total_tokens / 64)
    trainer.tokens_since_fired.zero_()
    trainer.tokens_since_fired[:3] = int(window)
    trainer.tokens_since_fired[3] = int(window) - 1
    b = trainer.sae.b_enc.detach()
    b[:4] = torch.tensor([-0.5, 1.97, 2.1, -0.5])
    z = trainer.optimizer.state[trainer.sae.b_enc].get("z")
    assert (z is not None) == (optimizer == "signum_sf")
    gap = (b - z).clone() if z is not None else None
    before = b.clone()
    theta = torch.tensor([1.0, 2.0, 3.0])  # mean 2: a step of 0.08, the cap at 2
    trainer.revive(SaeOutput(x_hat=torch.zeros(3, 32), loss=torch.zeros(()), kth=theta))
    assert cfg.sae.revive_step == 0.04 and cfg.sae.revive_cap == 1.0
    assert torch.allclose(b[:4], torch.tensor([-0.42, 2.0, 2.1, -0.5]))  # step; to the cap; above it; not yet
    assert torch.equal(b[4:], before[4:])
    if gap is not None:
        assert torch.allclose(b - z, gap)


def test_revival_acts_in_the_synthetic_job_that_the_fp_and_resume_tests_train(tmp_path):
    """Starving latents exist in `_cfg`'s job, so its fp=2 and resume cases test the revival, and
    sae.revive_after=0 turns it off."""
    on = train(_cfg(tmp_path / "on", optimizer="lazy_adam"))
    cfg = _cfg(tmp_path / "off", optimizer="lazy_adam")
    cfg.sae.revive_after = 0.0
    off = train(cfg)
    assert on["history"][0] == off["history"][0]
    assert on["history"][-1] != off["history"][-1]


def test_revival_is_on_by_default_for_topk_alone_and_both_transcoders_take_auxk_at_an_eighth():
    """The transcoders and the crosscoder left more latents dead with revival (docs/training.md, "Revival
    and the dictionaries across sites"): their default, from the Hydra command line and from the
    dataclasses alike, is revive_after 0 (no window); sae.revive_after=16 still turns it on. Both
    transcoders weight AuxK at 1/8, which the skip-transcoder lacked until 2026-12-03."""
    from hydra import compose, initialize_config_dir

    from sae_dist.cli import CONF_DIR
    from sae_dist.config import sae_config, to_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        def composed(*overrides: str):
            return to_config(compose("config", overrides=[*overrides, "output_dir=/tmp/x"]))

        windows = {family: revive_window(composed(f"sae={family}"))
                   for family in ("topk", "transcoder", "skip_transcoder", "crosscoder")}
        assert windows == {"topk": 16384.0, "transcoder": 0.0, "skip_transcoder": 0.0, "crosscoder": 0.0}
        assert revive_window(composed("sae=transcoder", "sae.revive_after=16")) == 16384.0
        aux = {family: composed(f"sae={family}").sae.aux_coef for family in ("transcoder", "skip_transcoder")}
        assert aux == {"transcoder": 0.125, "skip_transcoder": 0.125}  # AuxK at 4x TopK's weight, both
    assert sae_config(arch="topk").revive_after == 16.0
    for family in ("transcoder", "skip_transcoder", "crosscoder"):
        assert sae_config(arch=family).revive_after == 0.0


def test_revival_settings_are_checked_before_any_work(tmp_path):
    for field, value in (("revive_after", -1.0), ("revive_step", -0.1), ("revive_cap", -1.0)):
        with pytest.raises(ConfigError, match=rf"sae\.{field} \({value}\) must be >= 0"):
            synthetic_config(tmp_path, sae={field: value})
