"""The optimizers the torch engine runs, chosen by `trainer.optimizer` (config.py says where each comes
from): `adam` (`ChunkedAdam`: torch's Adam bit for bit, with one bounded temporary), `signum_sf`
(`SignumScheduleFree`) and `muon` (`Muon`), all below. Each
keeps its state per parameter element, so a feature shard's rows carry their own state and checkpoints
reshard it with the weights (`snapshot.optimizer_tensors`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from sae_dist.errors import ConfigError

OPTIMIZERS = ("adam", "signum_sf", "muon")
ADAM_CHUNK = 1 << 22
"""Elements per slice of ChunkedAdam's update: its one temporary is this many (16 MiB in fp32)."""
STATE_KEYS = {
    "adam": {"step", "exp_avg", "exp_avg_sq"},
    "signum_sf": {"step", "z", "lr_max", "weight_sum"},
    "muon": {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"},
}
"""What each optimizer keeps per parameter (a checkpoint's `<param>.<key>` names). muon's include Adam's
(its vectors train with Adam), so a checkpoint is told apart by the smallest set that holds its keys."""


class WithoutDynamo:
    """torch.optim.Optimizer's add_param_group, zero_grad, state_dict and load_state_dict, without the
    wrapper that imports the compiler stack on their first call.

    torch marks those four "not for dynamo to trace" with a decorator that imports torch._dynamo (and
    sympy and triton with it) the first time one runs: about 145 MB of resident memory in every process
    that builds any torch optimizer, a third of a trainer rank's runtime on CPU (docs/memory.md), for a
    compiler this project never calls. The methods themselves are torch's (`__wrapped__`, which
    functools.wraps keeps), so the optimizers behave as before; only tracing them with torch.compile
    would differ, and nothing here compiles an optimizer. First in the bases of each optimizer below."""

    def add_param_group(self, param_group: dict) -> None:
        torch.optim.Optimizer.add_param_group.__wrapped__(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        torch.optim.Optimizer.zero_grad.__wrapped__(self, set_to_none)

    def state_dict(self) -> dict:
        return torch.optim.Optimizer.state_dict.__wrapped__(self)

    def load_state_dict(self, state_dict: dict) -> None:
        torch.optim.Optimizer.load_state_dict.__wrapped__(self, state_dict)


class SignumScheduleFree(WithoutDynamo, torch.optim.Optimizer):
    """Sign descent (steepest descent in the max-norm: Bernstein et al. 2018, signSGD) under schedule-free
    averaging (Defazio et al. 2024, "The Road Less Scheduled"), the update EleutherAI's sparsify trains
    SAEs with by default (its SignSGD inside the schedulefree package's wrapper, momentum 0.95). Per
    parameter, three sequences:

        y_t     = (1 - beta) z_t + beta x_t          where the gradient g_t is taken
        z_{t+1} = z_t - lr_t sign(g_t)                the base iterate
        x_{t+1} = (1 - c) x_t + c z_{t+1}             the average: what is evaluated, exported, saved
        c       = w_{t+1} / (w_1 + ... + w_{t+1}),    w_t = max(lr_1 .. lr_t)^2

    beta (`momentum`) interpolates between the average and the base iterate; Defazio et al. show it acts
    as momentum. Once warm-up ends w is constant and x is the uniform average of the z's, which takes
    the place of a learning-rate decay (the trainer applies warm-up only); warm-up iterates weigh less.

    Between steps every parameter holds x. `gradient_point()` moves it to y for a step's forward and
    backward; `step()` updates z and x and leaves x in the parameter again (x waits in a scratch copy
    meanwhile, so it is never recovered from y with rounding). Saved state per parameter: z and the
    counters step, lr_max, weight_sum (float64, so a resume continues bit-exactly). Everything is
    elementwise: a feature shard's rows update as the same rows of the whole SAE, and a replicated
    parameter stays identical on every shard given the same gradient.

    `unit_rows`: parameters whose rows stay unit-norm (a unit-norm decoder). z's rows are renormalised
    after each update here, x's (the parameter) by the engine after the step, as with Adam.

    `lazy` (trainer.lazy_rows): a row (along the first dim) whose gradient is all zero keeps its x as
    well as its z. Without it, such a row's average still moves toward its z, which holds the sign steps
    of the row's last gradients: for a latent that has dropped out of the top k, the steps that pushed
    it out. With it, a row's x averages the z's of the steps it had a gradient in, each weighted by the
    global c, as lazy Adam keeps the global step's bias corrections (docs/training.md measures it).
    """

    def __init__(self, params, lr: float, momentum: float = 0.95, unit_rows: tuple[Tensor, ...] = (),
                 lazy: bool = False) -> None:
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum ({momentum}) must be in (0, 1)")
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self.unit_rows = {id(p) for p in unit_rows}
        self.lazy = lazy
        self._x: dict[int, Tensor] = {}
        """Parameter id -> x while the parameter holds y (between gradient_point() and step())."""

    @torch.no_grad()
    def gradient_point(self) -> None:
        """Every parameter from x to y; the first call starts z at x (so y = x)."""
        if self._x:
            raise RuntimeError("gradient_point() called twice without a step() in between")
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    f64 = {"dtype": torch.float64}
                    st.update(z=p.detach().clone(), step=torch.zeros((), **f64), lr_max=torch.zeros((), **f64),
                              weight_sum=torch.zeros((), **f64))
                self._x[id(p)] = p.detach().clone()
                p.lerp_(st["z"], 1 - group["momentum"])

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("SignumScheduleFree takes no closure")
        if not self._x:
            raise RuntimeError("call gradient_point() before the forward of a step: the gradient belongs at y")
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                x = self._x.pop(id(p))
                if p.grad is None:  # no gradient: nothing moves, the parameter goes back to x
                    p.copy_(x)
                    continue
                st = self.state[p]
                z = st["z"]
                z.add_(p.grad.sign(), alpha=-lr)
                if id(p) in self.unit_rows:
                    z /= z.norm(dim=1, keepdim=True).clamp_min(1e-12)
                lr_max = max(float(st["lr_max"]), lr)
                weight_sum = float(st["weight_sum"]) + lr_max**2
                st["step"] += 1
                st["lr_max"].fill_(lr_max)
                st["weight_sum"].fill_(weight_sum)
                c = lr_max**2 / weight_sum if weight_sum > 0 else 1.0
                if self.lazy and p.dim():
                    rows = p.shape[0]
                    x.view(rows, -1).lerp_(z.view(rows, -1), active_rows(p.grad.reshape(rows, -1)) * c)
                    p.copy_(x)
                else:
                    p.copy_(x.lerp_(z, c))

    @torch.no_grad()
    def reset_rows(self, p: Tensor, rows: Tensor) -> None:
        """Rows of `p` written outside the optimizer (resampled latents) restart there: z = x."""
        st = self.state.get(p)
        if st:
            st["z"][rows] = p[rows]


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic: the largest slope at zero for which the iteration still settles the singular
values in a band around 1 (about [0.7, 1.2]) within 5 steps, rather than converging to exactly 1."""


class Scratch:
    """One reused buffer for slice-wise updates of at most `chunk` elements (more only for a lazy Adam
    row longer than that)."""

    def __init__(self, chunk: int = ADAM_CHUNK) -> None:
        self.chunk = chunk
        self._buf: Tensor | None = None

    def __call__(self, n: int, like: Tensor) -> Tensor:
        buf = self._buf
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buf = torch.empty(max(n, 1), dtype=like.dtype, device=like.device)
        return buf[:n]


def adam_update(
    p: Tensor, state: dict, lr: float, betas: tuple[float, float], eps: float, scratch: Scratch, lazy: bool = False
) -> None:
    """torch Adam's update of one dense, contiguous parameter (no weight decay), bit for bit, in flat
    slices of `scratch.chunk` elements: lerp into m, v * beta2 + (1 - beta2) g^2, sqrt(v) / sqrt(c2) + eps
    into the scratch buffer, p + (-lr / c1) m / denom. Starts the state (step, exp_avg, exp_avg_sq:
    torch's names and dtypes) on the first call.

    `lazy`: rows (along the first dim) whose gradient is all zero keep their weights and both moments;
    the other rows get the update above (`lazy_adam_update`)."""
    beta1, beta2 = betas
    if p.grad.is_sparse or torch.is_complex(p) or not (p.is_contiguous() and p.grad.is_contiguous()):
        raise ValueError("adam_update takes dense, real, contiguous parameters and gradients")
    if not state:
        state["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    step = state["step"].item()
    step_size = lr / (1 - beta1**step)
    c2_sqrt = (1 - beta2**step) ** 0.5
    if lazy:
        lazy_adam_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step_size, c2_sqrt, betas, eps, scratch)
        return
    x, g = p.view(-1), p.grad.view(-1)
    m, v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
    for s in range(0, x.numel(), scratch.chunk):
        e = min(s + scratch.chunk, x.numel())
        gs, ms, vs = g[s:e], m[s:e], v[s:e]
        ms.lerp_(gs, 1 - beta1)
        vs.mul_(beta2).addcmul_(gs, gs, value=1 - beta2)
        denom = torch.sqrt(vs, out=scratch(e - s, vs))
        denom.div_(c2_sqrt).add_(eps)
        x[s:e].addcdiv_(ms, denom, value=-step_size)


def active_rows(g: Tensor) -> Tensor:
    """(rows, 1) True where a row of g (rows, cols) is not all zero: its max or its min is nonzero (two
    reductions, a fraction of a pass over g; a NaN row counts as active)."""
    return g.amax(dim=1, keepdim=True).ne(0) | g.amin(dim=1, keepdim=True).ne(0)


def lazy_adam_update(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, step_size: float, c2_sqrt: float, betas: tuple[float, float],
    eps: float, scratch: Scratch,
) -> None:
    """"Lazy" Adam of one parameter: Adam's update of its rows with a nonzero gradient; a row whose
    gradient is all zero keeps its weights, m and v as they are. Sparse Adam does this with the rows a
    sparse gradient holds (torch.optim.SparseAdam, TensorFlow Addons' LazyAdam), with the bias
    corrections of the global step; this is the same rule on dense tensors. Every per-latent parameter
    here has a row per latent (W_enc, W_dec (n, d); b_enc (n,)), and in a TopK SAE a latent that did
    not fire in the step (and that AuxK did not pick) has exactly zero gradient. Dense Adam keeps moving
    such a latent for about ten steps on its momentum (m shrinks by beta1 a step, v barely), along its
    last gradients: those that pushed it out of the top k (docs/training.md measures what that does to
    dead latents). Idle rows' weights stay because their denominator is made infinite: x - s m / inf
    = x. Slices of whole rows, at most `scratch.chunk` elements (one row if a row is longer); the
    temporaries are the scratch buffer and a few values per row."""
    beta1, beta2 = betas
    rows = p.shape[0] if p.dim() else 1
    x, g, m, v = (t.view(rows, -1) for t in (p, g, m, v))
    per = max(1, scratch.chunk // x.shape[1])
    for s in range(0, rows, per):
        e = min(s + per, rows)
        gs, ms, vs = g[s:e], m[s:e], v[s:e]
        active = active_rows(gs)
        ms.lerp_(gs, active * (1 - beta1))  # m + 0 (g - m) = m in an idle row
        vs.mul_(torch.where(active, beta2, 1.0)).addcmul_(gs, gs, value=1 - beta2)
        denom = torch.sqrt(vs, out=scratch(vs.numel(), vs).view_as(vs))
        denom.div_(c2_sqrt).add_(torch.where(active, eps, math.inf))
        x[s:e].addcdiv_(ms, denom, value=-step_size)


class ChunkedAdam(WithoutDynamo, torch.optim.Adam):
    """torch's Adam (no weight decay, no AMSGrad), the same update bit for bit, with its temporaries
    bounded by `chunk` elements instead of the parameter's size.

    torch's Adam on CPU runs one parameter at a time and forms sqrt(v), then sqrt(v) / c, as new tensors
    of the parameter's size while it still holds the previous parameter's quotient: at its peak three
    copies of the largest parameter above the weights, gradients and moments (a million-latent shard's
    decoder: 3 x 1.6 GB; a 6-layer CLT's (n, L d) decoder: 3 x 453 MiB, the 1.3x bound missed by that
    alone). Here each parameter is updated in flat slices of `chunk` elements with the same elementwise
    operations in the same order (lerp into m, v * beta2 + (1 - beta2) g^2, sqrt(v) / sqrt(c2) + eps into
    one reused buffer, p + (-lr / c1) m / denom), so the values, the state and its checkpoint layout are
    torch Adam's. Anything else (weight decay, amsgrad, maximize, capturable, differentiable, fused) is
    torch's own step."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 chunk: int = ADAM_CHUNK, lazy: bool = False) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=False)
        self.chunk = chunk
        """Elements per slice: the update's one temporary (memory_plan counts it)."""
        self.scratch = Scratch(chunk)
        self.lazy = lazy
        """Leave rows with a zero gradient alone, weights and moments (`lazy_adam_update`): trainer.lazy_rows.
        The state is Adam's either way, so a checkpoint resumes under either setting."""

    def _plain(self, group: dict) -> bool:
        return not (group["weight_decay"] or group["amsgrad"] or group["maximize"] or group["capturable"]
                    or group["differentiable"] or group["fused"] or torch.is_tensor(group["lr"]))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if not all(self._plain(g) for g in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    adam_update(p, self.state[p], group["lr"], group["betas"], group["eps"], self.scratch,
                                self.lazy)
        return loss


def newton_schulz(
    G: Tensor, steps: int = 5, sum_over_shards: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """G (..., rows, d) with its singular values pushed into NS_COEFFICIENTS' band around 1: close to
    U V^T for G = U S V^T. Written on the (d, d) Gram matrix A = X^T X:

        X <- X / ||X||_F,    then `steps` times    X <- a X + X (b A + c A A)

    A is a sum over row blocks, so with the rows split over shards `sum_over_shards` (the SAE comm's)
    all-reduces it and the rest is local to the shard: `steps` collectives of (..., d, d), the first
    of which also gives the Frobenius norm (its trace). Without it the rows are all here."""
    total = sum_over_shards or (lambda t: t)
    a, b, c = NS_COEFFICIENTS
    X = G
    A = total(X.mT @ X)  # (..., d, d)
    inv_norm = 1 / (A.diagonal(dim1=-2, dim2=-1).sum(-1).sqrt() + 1e-7)  # (...,)
    X = X * inv_norm[..., None, None]
    A = A * inv_norm[..., None, None].square()
    for i in range(steps):
        if i:
            A = total(X.mT @ X)
        X = a * X + X @ (b * A + c * A @ A)
    return X


class ShardComm(Protocol):
    """What Muon needs of the SAE's comm (sae.LocalComm, or parallel.fp's FeatureParallelComm)."""

    n_shards: int

    def sum_over_shards(self, t: Tensor) -> Tensor: ...


class Muon(WithoutDynamo, torch.optim.Optimizer):
    """Muon (Keller Jordan et al. 2024, "Muon: an optimizer for hidden layers"): momentum SGD whose update
    for a matrix is orthogonalised by `newton_schulz`; parameters of other shapes (the biases, an
    architecture's per-latent vectors) train with Adam (betas 0.9, 0.999) at the same learning rate.
    Per matrix W (rows, d) with gradient g:

        m <- beta m + (1 - beta) g                    momentum 0.95
        u  = beta m + (1 - beta) g                    Nesterov
        W <- W - lr 0.2 sqrt(max(rows, d)) NS(u)

    NS(u) has min(rows, d) singular values near 1, so its entries have RMS about 1 / sqrt(max(rows, d));
    the factor 0.2 sqrt(max(rows, d)) (Liu et al. 2025, "Muon is Scalable for LLM Training") makes the
    step's RMS 0.2 lr, about Adam's steady-state update RMS, so one lr serves both parts. `rows` is the
    whole matrix's: every shard's step is its rows of the unsharded step.

    Why SAEs: the orthogonalised update moves the weights by about the same amount along every singular
    direction of the gradient, however small its singular value. Latents that rarely fire have small
    gradients, which sit mostly in the small singular directions; an update that follows the raw or
    elementwise-normalised gradient moves them little next to the dominant directions, and in short,
    large-batch runs (few steps) such latents learn too slowly and die. Muon moves them at the rate of
    the rest.

    EleutherAI's sparsify offers it as `--optimizer muon` (sparsify 1.3.3, trainer.py and muon.py): Muon
    on every parameter with two or more dims (encoder and decoder weights), torch Adam on the others,
    both at lr 2e-3 whatever the number of latents; momentum 0.95 with Nesterov, 5 quintic steps with
    the coefficients above in bf16, the same 0.2 sqrt(max(rows, cols)) factor, decoupled weight decay
    0.1 on the matrices; no warm-up for the Muon part, warm-up for Adam, both decaying linearly to zero.
    Under DDP it splits whole matrices across ranks (each orthogonalises some and all-gathers the
    updates) and refuses model parallelism. Here a matrix's rows are split across feature shards
    instead; the iteration runs in the weights' dtype (shards then agree to float rounding), without
    weight decay (as this project's Adam), under the trainer's warm-up and decay for both parts.

    `comm` sums the Gram matrices of the `sharded` matrices over feature shards; a matrix not in
    `sharded` (replicated) is whole on every shard, gets the same gradient there, and so the same update.
    Sharded matrices of one shape are orthogonalised together: `ns_steps` collectives per step in all.
    Saved state: `momentum_buffer` per matrix; Adam's step, exp_avg, exp_avg_sq per other parameter.
    """

    def __init__(
        self,
        params,
        lr: float,
        comm: ShardComm,
        sharded: tuple[Tensor, ...] = (),
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum ({momentum}) must be in [0, 1)")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, betas=betas, eps=eps)
        super().__init__(params, defaults)
        self.comm = comm
        self.sharded = {id(p) for p in sharded}
        self.scratch = Scratch()

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("Muon takes no closure")
        for group in self.param_groups:
            batches: dict[tuple[torch.Size, bool], list[tuple[Tensor, Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim != 2:
                    self._adam(p, group)
                    continue
                st = self.state[p]
                if not st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                m = st["momentum_buffer"].lerp_(p.grad, 1 - group["momentum"])
                u = p.grad.lerp(m, group["momentum"]) if group["nesterov"] else m
                batches.setdefault((p.shape, id(p) in self.sharded), []).append((p, u))
            for (shape, sharded), pairs in batches.items():
                reduce = self.comm.sum_over_shards if sharded else None
                update = newton_schulz(torch.stack([u for _, u in pairs]), group["ns_steps"], reduce)
                rows = shape[0] * (self.comm.n_shards if sharded else 1)
                scale = 0.2 * math.sqrt(max(rows, shape[1]))
                for (p, _), o in zip(pairs, update):
                    p.add_(o, alpha=-group["lr"] * scale)

    def _adam(self, p: Tensor, group: dict) -> None:
        """torch Adam's update (no weight decay) of one parameter: ChunkedAdam's, bit for bit."""
        adam_update(p, self.state[p], group["lr"], group["betas"], group["eps"], self.scratch)


def muon_lr(n_latents: int, batch_tokens: int) -> float:
    """trainer.lr=0 for muon: 2e-2 for both parts, whatever n_latents and batch_tokens.

    Flat in n_latents as sparsify's rule is: Muon's 0.2 sqrt(max(rows, d)) factor already sizes the step
    to the matrix. Ten times sparsify's 2e-3: that value assumes Adam's steady-state update RMS (about 0.2
    lr), but early in a run Adam's updates are nearly sign steps (RMS about lr), and the short runs this
    project's defaults make are mostly early; on MiniLM layer 3 (n 6144, 64 steps of 4096 tokens) a sweep
    over 2e-3, 6e-3, 2e-2 and 6e-2 was best at 2e-2, with 2e-3 well behind Adam's automatic rate.
    batch_tokens does not change it yet: that sweep tried one batch size."""
    return 2e-2


def build_optimizer(
    name: str,
    params: list[Tensor],
    lr: float,
    unit_rows: tuple[Tensor, ...] = (),
    comm: ShardComm | None = None,
    sharded: tuple[Tensor, ...] = (),
    lazy: bool = False,
) -> torch.optim.Optimizer:
    """`trainer.optimizer` over `params`; `unit_rows` as for SignumScheduleFree (Adam's engine renormalises
    the parameter alone: its update has no second iterate, nor has Muon's); `comm` and `sharded` as for
    Muon (the SAE's comm and its parameters split across feature shards); `lazy` as for ChunkedAdam and
    SignumScheduleFree (muon has no lazy form: Newton-Schulz mixes the rows)."""
    if name == "adam":
        return ChunkedAdam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, lazy=lazy)
    if name == "signum_sf":
        return SignumScheduleFree(params, lr=lr, momentum=0.95, unit_rows=unit_rows, lazy=lazy)
    if name == "muon":
        if comm is None:
            raise ValueError("muon needs the SAE's comm (sae.comm): Newton-Schulz sums over feature shards")
        return Muon(params, lr=lr, comm=comm, sharded=sharded)
    raise ValueError(f"trainer.optimizer ({name!r}) must be one of {', '.join(OPTIMIZERS)}")


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    if isinstance(optimizer, SignumScheduleFree):
        return "signum_sf"
    return "muon" if isinstance(optimizer, Muon) else "adam"


def reset_rows(optimizer: torch.optim.Optimizer, p: Tensor, rows: Tensor) -> None:
    """Forget the optimizer's history of `rows` of `p` (Adam, and muon: zero moments; signum_sf: z = x)."""
    if isinstance(optimizer, SignumScheduleFree):
        optimizer.reset_rows(p, rows)
        return
    st = optimizer.state.get(p, {})
    for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
        if key in st:
            st[key][rows] = 0.0


def saved_optimizer(keys: set[str]) -> str | None:
    """The optimizer whose state a checkpoint's keys are: the one with the fewest keys that holds them."""
    fits = [name for name, want in STATE_KEYS.items() if keys <= want]
    return min(fits, key=lambda name: len(STATE_KEYS[name]), default=None)


def check_state_keys(name: str, tensors: dict[str, Tensor]) -> None:
    """A checkpoint's optimizer state must be the configured optimizer's: Adam moments cannot seed
    signum_sf's z or muon's momentum, nor the reverse."""
    keys = {k.rsplit(".", 1)[1] for k in tensors}
    saved = saved_optimizer(keys)
    if keys and saved != name:
        saved = saved or "another optimizer"
        raise ConfigError(
            f"the checkpoint holds {saved} state ({', '.join(sorted(keys))}) but trainer.optimizer is {name}; "
            f"resume with trainer.optimizer={saved}, or start a fresh run"
        )
