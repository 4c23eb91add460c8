"""The training loop: a step function, the learning-rate schedule, and a loop that calls the data
stream, the step, the tracker and the checkpointer, each a separate piece.

Run it through the driver (`sae-dist`); tests build a `Trainer` directly from a Config and a stream.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from sae_dist import archs
from sae_dist.config import Config
from sae_dist.optim import (
    SignumScheduleFree,
    build_optimizer,
    check_state_keys,
    muon_lr,
    optimizer_name,
    reset_rows,
    saved_optimizer,
)
from sae_dist.sae import SaeOutput, SparseAutoencoder
from sae_dist.snapshot import load_optimizer_tensors, optimizer_tensors
from sae_dist.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Loss or activations went NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    scale: float = 1.0
    """Activation scale so that E||x * scale||^2 = d_model."""
    data: dict[str, Any] = field(default_factory=dict)
    """The batch stream's position."""
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


LR_BATCH = 1024
"""Tokens per step at which Adam's rule was tuned (the default job's batch)."""

LR_N0 = 6144
"""The dictionary size at which Adam's rule was tuned (the default job's): there it is Gao et al.'s."""

LR_N_EXPONENT = 0.65
"""Adam's rule falls as n^-0.65 from LR_N0 (Gao et al.'s falls as n^-0.5): at n = 49152, batch 4096, one
million tokens, their slope's 1.39e-3 left 7.7% of latents dead on held-out tokens, this slope's 1.01e-3
3.83% at FVU 0.1360 (sparsify: 0.1388), 8e-4 2.58% at 0.1438 (docs/training.md, "The learning rate in n
and B")."""


def adam_lr_in_n(n: int) -> float:
    """Adam's automatic rate before lr_scale and the batch term: Gao et al.'s 2e-4 / sqrt(n / 2^14) at
    n = LR_N0, falling as n^-LR_N_EXPONENT around it."""
    return 2e-4 / math.sqrt(LR_N0 / 2**14) * (n / LR_N0) ** -LR_N_EXPONENT


def auto_lr(cfg: Config, name: str | None = None) -> float:
    """trainer.lr, or the rule of optimizer `name` (default: optimizer_of(cfg)) when it is 0 (config.py's
    TrainerConfig.lr says whose)."""
    if cfg.trainer.lr > 0:
        return cfg.trainer.lr
    n, name = cfg.sae.n_latents, name or optimizer_of(cfg)
    if name == "signum_sf":
        steps = max(1, cfg.trainer.total_tokens // step_tokens(cfg))
        return 5e-3 / math.sqrt(n / 2**14) * math.sqrt(max(1.0, AUTO_ADAM_MIN_STEPS / steps))
    if name == "muon":
        return muon_lr(n, step_tokens(cfg))
    return adam_lr_in_n(n) * cfg.trainer.lr_scale * math.sqrt(step_tokens(cfg) / LR_BATCH)


AUTO_ADAM_MIN_STEPS = 128
"""trainer.optimizer=auto picks Adam for runs of at least this many steps, signum_sf for shorter ones."""


def lazy_rows(cfg: Config) -> bool:
    """trainer.lazy_rows resolved for the torch engine, the only one that reads it: auto is on (for adam
    and signum_sf; config.py's TrainerConfig.lazy_rows)."""
    return cfg.trainer.lazy_rows != "off"


def optimizer_of(cfg: Config) -> str:
    """trainer.optimizer resolved: auto is adam on the DeepSpeed engine (its ZeRO optimizer) and for runs
    of at least AUTO_ADAM_MIN_STEPS steps, signum_sf for shorter ones (docs/training.md: at 64 steps of
    16384 tokens schedule-free sign descent beats Adam at every learning rate tried; at 256 and 1024
    steps Adam wins)."""
    if cfg.trainer.optimizer != "auto":
        return cfg.trainer.optimizer
    from sae_dist.parallel.engine import engine_name  # the engine module imports this one

    if engine_name(cfg) == "deepspeed":
        return "adam"
    steps = cfg.trainer.total_tokens // step_tokens(cfg)
    return "adam" if steps >= AUTO_ADAM_MIN_STEPS else "signum_sf"


def step_tokens(cfg: Config) -> int:
    """Tokens per optimizer step, over every data replica."""
    return cfg.trainer.batch_tokens * cfg.parallel.dp


DEAD_WINDOW_MAX = 10_000_000
"""Gao et al. (2024)'s dead-latent window, in tokens."""
DEAD_WINDOW_FRACTION = 32
"""The automatic window is the run's tokens over this, so AuxK acts over almost all of a short run
(docs/training.md has the measurements behind 32)."""


DEAD_WINDOW_FIRINGS = 128
"""Nor is the automatic window shorter than this many firings of an average latent (n / k tokens
each): at n / k = 1536 the run's 32nd held 21 and AuxK doubled the dead latents (docs/training.md)."""


def dead_window(cfg: Config) -> int:
    """sae.dead_tokens, or when it is 0 min(10M, max(trainer.total_tokens / 32, 128 n / k)): a 32nd of
    the run, but at least 128 expected firings of an average latent (k: the family's latents per token)."""
    if cfg.sae.dead_tokens > 0:
        return cfg.sae.dead_tokens
    firings = DEAD_WINDOW_FIRINGS * cfg.sae.n_latents // max(1, archs.get(cfg.sae.arch).firings_per_token(cfg))
    return max(1, min(DEAD_WINDOW_MAX, max(cfg.trainer.total_tokens // DEAD_WINDOW_FRACTION, firings)))


REVIVE_WINDOW_FRACTION = 64
"""Nor does a latent starve (`revive_window`) before a 64th of the run has gone by without it firing."""


def revive_window(cfg: Config) -> float:
    """Tokens without firing after which a latent starves and revival raises its b_enc: max(sae.revive_after
    x n / k, trainer.total_tokens / 64); 0 when revival is off or the family has no revive_after."""
    after = getattr(cfg.sae, "revive_after", 0.0)
    if not after:
        return 0.0
    firings = max(1, archs.get(cfg.sae.arch).firings_per_token(cfg))
    return max(after * cfg.sae.n_latents / firings, cfg.trainer.total_tokens / REVIVE_WINDOW_FRACTION)


def lr_at(step: int, total_steps: int, base: float, warmup: int, decay_fraction: float) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last `decay_fraction` of steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    decay_start = total_steps * (1 - decay_fraction)
    if step >= decay_start and decay_fraction > 0:
        return base * max(0.0, (total_steps - step) / (total_steps - decay_start))
    return base


def estimate_scale(batches: Iterator[Tensor], d_model: int, tokens: int) -> float:
    """sqrt(d / E||x||^2) over the first `tokens` tokens (and, with several sites per token, over the
    sites: one scale for all, so a transcoder's input and output keep their ratio)."""
    total, count, vectors = 0.0, 0, 0
    for x in batches:
        total += float(x.double().pow(2).sum())
        count += x.shape[0]
        vectors += x[0].numel() // d_model * x.shape[0]
        if count >= tokens:
            break
    if count == 0:
        raise RuntimeError("no activations to estimate the scale from: the data source is empty")
    return math.sqrt(d_model / (total / vectors))


def sharded_params(sae: SparseAutoencoder) -> tuple[list[Tensor], list[Tensor]]:
    """(parameters split across feature shards, parameters replicated on every shard)."""
    sharded, replicated = [], []
    names = sae.replicated_names()
    for name, p in sae.named_parameters():
        (replicated if name in names else sharded).append(p)
    return sharded, replicated


def clip_grad_norm(sae: SparseAutoencoder, max_norm: float) -> Tensor:
    """Global gradient norm over all shards (b_dec counted once), then clip in place."""
    sharded, replicated = sharded_params(sae)
    zero = torch.zeros((), device=sae.b_dec.device)
    sq = sum((p.grad.pow(2).sum() for p in sharded if p.grad is not None), zero)
    sq = sae.comm.sum_scalar(sq) + sum((p.grad.pow(2).sum() for p in replicated if p.grad is not None), zero)
    norm = sq.sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in sharded + replicated:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


class TorchEngine:
    """trainer.optimizer (`kind`: adam, signum_sf or muon, sae_dist/optim.py) on this rank's parameters. With
    data replicas, `data.reduce(params, fired)` averages the gradients and ORs the fired masks over them (a
    fixed few collectives) before clipping. muon sums over feature shards through `sae.comm`."""

    def __init__(
        self, sae: SparseAutoencoder, lr: float, optimizer: torch.optim.Optimizer | None = None, data: Any = None,
        kind: str = "adam", lazy: bool = False,
    ) -> None:
        self.sae, self.data, self.lazy = sae, data, lazy
        self.optimizer = optimizer or self.build(kind, lr)
        self.data_replicas = data.size if data is not None else 1

    def build(self, kind: str, lr: float) -> torch.optim.Optimizer:
        """A fresh optimizer of `kind` over the SAE's parameters."""
        sae = self.sae
        unit_rows = (sae.W_dec,) if sae.unit_norm_decoder else ()
        sharded, _ = sharded_params(sae)
        return build_optimizer(kind, list(sae.parameters()), lr, unit_rows, comm=sae.comm, sharded=tuple(sharded),
                               lazy=self.lazy)

    def before_forward(self) -> None:
        """Schedule-free: the weights move from the average to the point the gradient is taken at."""
        if isinstance(self.optimizer, SignumScheduleFree):
            self.optimizer.gradient_point()

    def step(self, loss: Tensor, fired: Tensor | None, grad_clip: float) -> tuple[Tensor, Tensor | None]:
        """Backward, gradient reduction, clipping, update, decoder renormalisation -> (grad norm, fired
        mask over every replica)."""
        loss.backward()  # onto no gradients: the previous step freed them after its update
        if self.data is not None:
            fired = self.data.reduce(list(self.sae.parameters()), fired)
        self.sae.project_decoder_grad()
        norm = clip_grad_norm(self.sae, grad_clip)
        self.optimizer.step()
        # applied, the gradients are dead: freed here, they are not held through the next forward or a
        # checkpoint's host copy (a third of the state's bytes; docs/memory.md)
        self.optimizer.zero_grad(set_to_none=True)
        self.sae.normalize_decoder()
        return norm, fired

    def params_changed(self) -> None:
        """The weights were written outside the optimizer (nothing to do: every optimizer updates them in
        place, and signum_sf starts its state from them at its first step)."""

    @torch.no_grad()
    def shift(self, p: Tensor, delta: Tensor) -> None:
        """Adds `delta` to the weights `p` outside the optimizer; signum_sf's base iterate z moves with
        them, so its average and its iterate keep their distance (Adam's and muon's state is unchanged)."""
        p.add_(delta)
        z = self.optimizer.state.get(p, {}).get("z")
        if z is not None:
            z.add_(delta)

    def weight_tensors(self) -> dict[str, Tensor]:
        """The module's state (live references)."""
        return self.sae.state_dict()

    def load_weights(self, tensors: dict[str, Tensor]) -> None:
        self.sae.load_state_dict(tensors)

    def state_tensors(self) -> dict[str, Tensor]:
        """The optimizer's state of this rank's parameters as `<param>.<key>` -> tensor (live references)."""
        return optimizer_tensors(self.sae, self.optimizer)

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        check_state_keys(optimizer_name(self.optimizer), tensors)
        load_optimizer_tensors(self.sae, self.optimizer, tensors)


class Trainer:
    """Owns the SAE, its optimizer engine and the per-latent firing statistics."""

    def __init__(
        self,
        cfg: Config,
        sae: SparseAutoencoder,
        state: TrainState,
        tracker: Tracker | None = None,
        checkpointer: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        engine: Any = None,
    ) -> None:
        self.cfg, self.sae, self.state = cfg, sae, state
        self.tracker = tracker or NullTracker()
        self.checkpointer = checkpointer
        self.base_lr = auto_lr(cfg)
        self.optimizer_name = optimizer_of(cfg)
        self.engine = engine or TorchEngine(sae, self.base_lr, optimizer, kind=self.optimizer_name, lazy=lazy_rows(cfg))
        self.optimizer = self.engine.optimizer
        self.data_replicas: int = self.engine.data_replicas
        """Each step trains on batch_tokens from every data replica."""
        per_step = cfg.trainer.batch_tokens * self.data_replicas
        self.total_steps = max(1, cfg.trainer.total_tokens // per_step)
        self.warmup_steps = -(-cfg.trainer.warmup_tokens // per_step)
        self.device = sae.b_dec.device
        """Where the SAE lives; batches are moved here and the firing counters live here."""
        self.dead_tokens = dead_window(cfg)
        """Tokens without firing after which a latent counts as dead."""
        self.revive_tokens = revive_window(cfg)
        """Tokens without firing after which a latent starves (`revive`); 0: no revival."""
        self.tokens_since_fired = torch.zeros(sae.n_local, dtype=torch.long, device=self.device)
        self.extra_metrics: Any = None
        """Optional callable returning more metrics to log with the trainer's (e.g. the pipeline's)."""
        self.logged: list[dict[str, Any]] = []
        """Every metrics row sent to the tracker (for the training-curve plot)."""
        self.history: list[float] = []
        """Loss at every step of this process, for tests and resume checks."""
        self.stopped = False
        """fit() ended early because should_stop() said so."""

    def load_optimizer_state(self, tensors: dict[str, Tensor]) -> None:
        """A checkpoint's optimizer state. Under trainer.optimizer=auto a run continues with the optimizer
        its checkpoint holds, whatever the new layout would pick (a ZeRO run's Adam resumed on fewer ranks
        of the torch engine stays Adam)."""
        saved = saved_optimizer({k.rsplit(".", 1)[1] for k in tensors})
        if (self.cfg.trainer.optimizer == "auto" and saved and saved != self.optimizer_name
                and isinstance(self.engine, TorchEngine)):
            log.info("trainer.optimizer=auto: the checkpoint holds %s state, so the run continues with %s", saved, saved)
            self.optimizer_name, self.base_lr = saved, auto_lr(self.cfg, saved)
            self.engine.optimizer = self.optimizer = self.engine.build(saved, self.base_lr)
        self.engine.load_state_tensors(tensors)

    @property
    def decay_fraction(self) -> float:
        """trainer.decay_fraction; 0 for signum_sf, whose schedule-free averaging takes the place of a decay."""
        return 0.0 if self.optimizer_name == "signum_sf" else self.cfg.trainer.decay_fraction

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_tokens

    def train_step(self, x: Tensor) -> SaeOutput:
        """One optimizer step on a batch of scaled activations (B, d), on any device."""
        x = x.to(self.device, non_blocking=True)
        self.sae.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(
                self.state.step, self.total_steps, self.base_lr, self.warmup_steps, self.decay_fraction
            )
        if self.state.step == 0:
            self.sae.init_from_batch(x)
            self.engine.params_changed()
        self.engine.before_forward()
        out = self.sae(x, self.dead_mask())
        if not torch.isfinite(out.loss):
            raise NonFiniteError(
                f"loss is {out.loss.item()} at step {self.state.step} (activations finite: "
                f"{bool(torch.isfinite(x).all())}); last good checkpoint: "
                f"{getattr(self.checkpointer, 'last_saved', None) or 'none'}"
            )
        norm, fired = self.engine.step(out.loss, out.fired, self.cfg.trainer.grad_clip)
        out.terms["grad_norm"] = norm.detach()
        tokens = x.shape[0] * self.data_replicas
        self.tokens_since_fired += tokens
        if fired is not None:
            self.tokens_since_fired[fired] = 0
        self.revive(out)
        self.state.step += 1
        self.state.tokens += tokens
        every = self.sae.arch.resample_every
        if every and self.state.step % every == 0:
            self.resample_dead(x)
        self.history.append(float(out.loss.detach()))
        return out

    @torch.no_grad()
    def revive(self, out: SaeOutput) -> None:
        """Raises b_enc of the latents that have not fired for `revive_window` tokens by sae.revive_step
        x the batch's mean k-th activation, up to sae.revive_cap x it (TopKConfig has why). Elementwise
        on this shard's latents, with the k-th activation averaged over data replicas, so every replica
        and every feature layout applies the same change."""
        if not self.revive_tokens or out.kth is None:
            return
        rows = self.tokens_since_fired >= self.revive_tokens
        theta = float(self.sae.comm.mean_over_data(out.kth.mean()))
        if not bool(rows.any()):  # the same on every data replica: they share tokens_since_fired
            return
        b = self.sae.b_enc.detach()
        raised = torch.minimum(b + self.cfg.sae.revive_step * theta, b.clamp_min(self.cfg.sae.revive_cap * theta))
        self.engine.shift(self.sae.b_enc, torch.where(rows, raised - b, torch.zeros_like(b)))

    @torch.no_grad()
    def resample_dead(self, x: Tensor) -> int:
        """Anthropic (2023): dead latents get an input with high reconstruction error as their
        decoder direction, and a scaled copy as their encoder row; their optimizer state is reset."""
        dead = self.dead_mask().nonzero().squeeze(1)
        if not float(self.sae.comm.sum_scalar(torch.tensor(float(dead.numel()), device=x.device))):
            return 0  # every shard agrees, so the forward below runs on all of them or none
        sae = self.sae
        err = (x - sae(x).x_hat).pow(2).sum(1)
        if dead.numel() == 0:
            return 0
        g = torch.Generator().manual_seed(self.cfg.trainer.seed * 7919 + self.state.step)
        # drawn on the host with a host generator, so resampling picks the same rows on every device
        pick = torch.multinomial((err / err.sum()).cpu(), dead.numel(), replacement=True, generator=g)
        v = x[pick.to(x.device)] - sae.b_dec
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        alive = ~self.dead_mask()
        enc_norm = sae.W_enc[alive].norm(dim=1).mean() if alive.any() else x.new_tensor(1.0)
        sae.W_dec[dead] = v * 0.1
        sae.W_enc[dead] = v * enc_norm * 0.2
        sae.b_enc[dead] = 0.0
        for p in (sae.W_dec, sae.W_enc, sae.b_enc):
            reset_rows(self.optimizer, p, dead)
        self.tokens_since_fired[dead] = 0
        return int(dead.numel())

    def dead_fraction(self) -> float:
        dead = self.sae.comm.sum_scalar(self.dead_mask().sum().float())
        return float(dead) / self.sae.n_latents

    def fit(
        self, batches: Iterator[Tensor], stream_state: Any = None, should_stop: Callable[[], bool] | None = None
    ) -> TrainState:
        """Trains until trainer.total_tokens; checkpoints and logs along the way. `should_stop()` is asked
        after every step (the same answer on every rank: a preemption); True ends the loop there with
        `self.stopped` set."""
        cfg = self.cfg.trainer
        ckpt_every = self.cfg.checkpoint.every_steps
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step", disable=None)
        sums: dict[str, float] = {}
        t0, tok0, n = time.perf_counter(), self.state.tokens, 0
        for batch in batches:
            if self.state.step >= self.total_steps:
                break
            out = self.train_step(batch * self.state.scale)
            n += 1
            for key, value in out.terms.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach())
            bar.update(1)
            if self.state.step % cfg.log_every == 0 or self.state.step == self.total_steps:
                dt = time.perf_counter() - t0
                metrics = {f"train/{k}": v / n for k, v in sums.items()}
                metrics["train/dead_fraction"] = self.dead_fraction()
                metrics["train/tokens_per_s"] = (self.state.tokens - tok0) / max(dt, 1e-9)
                metrics["train/lr"] = self.optimizer.param_groups[0]["lr"]
                if self.extra_metrics is not None:
                    metrics.update(self.extra_metrics())
                self.tracker.log_metrics(metrics, self.state.step)
                self.logged.append({"step": self.state.step, **metrics})
                bar.set_postfix(fvu=f"{metrics.get('train/fvu', 0):.3f}", l0=f"{metrics.get('train/l0', 0):.1f}")
                sums, t0, tok0, n = {}, time.perf_counter(), self.state.tokens, 0
            if stream_state is not None:
                self.state.data = stream_state()
            if self.checkpointer is not None and (
                (ckpt_every and self.state.step % ckpt_every == 0) or self.state.step == self.total_steps
            ):
                self.checkpointer.save(self)
            if should_stop is not None and should_stop():
                self.stopped = True
                break
        bar.close()
        return self.state
