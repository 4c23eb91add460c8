"""The optimizers the torch engine runs, chosen by `trainer.optimizer` (config.py says where each comes
from): `adam` (torch's Adam) and `signum_sf` (`SignumScheduleFree`, below). Both keep their state per
parameter element, so a feature shard's rows carry their own state and checkpoints reshard it with the
weights (`snapshot.optimizer_tensors`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_dist.errors import ConfigError

OPTIMIZERS = ("adam", "signum_sf")
STATE_KEYS = {"adam": {"step", "exp_avg", "exp_avg_sq"}, "signum_sf": {"step", "z", "lr_max", "weight_sum"}}
"""What each optimizer keeps per parameter (a checkpoint's `<param>.<key>` names)."""


class SignumScheduleFree(torch.optim.Optimizer):
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
    """

    def __init__(self, params, lr: float, momentum: float = 0.95, unit_rows: tuple[Tensor, ...] = ()) -> None:
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum ({momentum}) must be in (0, 1)")
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self.unit_rows = {id(p) for p in unit_rows}
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
                p.copy_(x.lerp_(z, lr_max**2 / weight_sum if weight_sum > 0 else 1.0))

    @torch.no_grad()
    def reset_rows(self, p: Tensor, rows: Tensor) -> None:
        """Rows of `p` written outside the optimizer (resampled latents) restart there: z = x."""
        st = self.state.get(p)
        if st:
            st["z"][rows] = p[rows]


def build_optimizer(name: str, params: list[Tensor], lr: float, unit_rows: tuple[Tensor, ...] = ()) -> torch.optim.Optimizer:
    """`trainer.optimizer` over `params`; `unit_rows` as for SignumScheduleFree (Adam's engine renormalises
    the parameter alone: its update has no second iterate)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if name == "signum_sf":
        return SignumScheduleFree(params, lr=lr, momentum=0.95, unit_rows=unit_rows)
    raise ValueError(f"trainer.optimizer ({name!r}) must be one of {', '.join(OPTIMIZERS)}")


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    return "signum_sf" if isinstance(optimizer, SignumScheduleFree) else "adam"


def reset_rows(optimizer: torch.optim.Optimizer, p: Tensor, rows: Tensor) -> None:
    """Forget the optimizer's history of `rows` of `p` (Adam: zero moments; signum_sf: z = x)."""
    if isinstance(optimizer, SignumScheduleFree):
        optimizer.reset_rows(p, rows)
        return
    st = optimizer.state.get(p, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in st:
            st[key][rows] = 0.0


def check_state_keys(name: str, tensors: dict[str, Tensor]) -> None:
    """A checkpoint's optimizer state must be the configured optimizer's: Adam moments cannot seed
    signum_sf's z, nor the reverse."""
    keys = {k.rsplit(".", 1)[1] for k in tensors}
    if keys and not keys <= STATE_KEYS[name]:
        saved = next((other for other, want in STATE_KEYS.items() if keys <= want), "another optimizer")
        raise ConfigError(
            f"the checkpoint holds {saved} state ({', '.join(sorted(keys))}) but trainer.optimizer is {name}; "
            f"resume with trainer.optimizer={saved}, or start a fresh run"
        )
