"""The interface every dictionary family implements, and the fields all of them share.

An architecture is one module in `sae_dist/archs/` defining a `SaeConfig` subclass (its own fields,
validated in `__post_init__`) and an `Arch` subclass registered with `@register`. The SAE module
(`sae_dist.sae.SparseAutoencoder`) owns the parameters every family has (W_enc, b_enc, W_dec, b_dec)
and asks its `Arch` for the rest: extra parameters, the training forward, inference encoding, which
parameters are split across feature shards, what the export holds. Cross-shard steps go through
`sae.comm` only; nothing here knows of torch.distributed. docs/extending.md walks through adding one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from sae_dist import kernels
from sae_dist.errors import require

if TYPE_CHECKING:
    from sae_dist.config import Config
    from sae_dist.sae import SparseAutoencoder


@dataclass
class SaeConfig:
    """Fields of every architecture; each one adds its own in a subclass (`sae=<arch>` picks it)."""

    arch: str = "topk"
    """The dictionary family: a name registered in sae_dist/archs (topk, batchtopk, matryoshka, jumprelu,
    gated, relu)."""
    n_latents: int = 6144
    """Dictionary size."""
    k: int = 32
    """Active latents per token for the top-k families (topk per token, batchtopk and matryoshka on
    average over the batch); the others reach their L0 through a penalty and ignore it."""
    dead_tokens: int = 0
    """A latent counts as dead (AuxK trains it on the residual; resampling families resample it) after
    this many training tokens without firing. 0 = automatic: trainer.total_tokens / 32, but at least 128
    n / k (128 firings of an average latent), at most 10M, Gao et al.'s window, which is meant for runs
    of billions of tokens: under it a run of a million never calls a latent dead, AuxK never acts, and a
    fast learning rate leaves a third of the latents dead; a window of a few expected firings calls
    healthy latents dead and AuxK then doubles the dead fraction (docs/training.md)."""
    fanout_n_latents: list[int] = field(default_factory=list)
    """Train one SAE per size listed here from a single activation stream (the LM forward is paid
    once); empty = one SAE of n_latents."""

    def __post_init__(self) -> None:
        require(self.n_latents >= 1, f"sae.n_latents ({self.n_latents}) must be positive")
        require(
            1 <= self.k < self.n_latents,
            f"sae.k ({self.k}) must be in [1, sae.n_latents ({self.n_latents})); lower k or raise n_latents",
        )
        require(self.dead_tokens >= 0, f"sae.dead_tokens ({self.dead_tokens}) must be >= 0 (0 = automatic)")
        for n in self.fanout_n_latents:
            require(self.k < n, f"sae.fanout_n_latents has {n}, not above sae.k ({self.k}); drop it or lower k")


@dataclass
class SaeOutput:
    x_hat: Tensor
    """(B, d) reconstruction."""
    loss: Tensor
    """Scalar training loss (identical on every feature shard)."""
    terms: dict[str, Tensor] = field(default_factory=dict)
    """Loss terms and batch statistics, detached scalars."""
    fired: Tensor | None = None
    """(n_local,) bool: latents of this shard that fired on the batch."""
    kth: Tensor | None = None
    """(B,) the smallest selected activation of each token (the top-k families): what a latent must beat
    to be selected there (the trainer's revival of starving latents)."""


class Arch:
    """One dictionary family. Class attributes declare its shape; methods compute with the SAE module
    `sae` passed in (its parameters, `sae.comm` for cross-shard steps, `sae.fvu` for the loss)."""

    name: ClassVar[str]
    """`sae.arch` value."""
    config: ClassVar[type[SaeConfig]]
    """Its config dataclass."""
    saelens_architecture: ClassVar[str]
    """`architecture` in the exported cfg.json (SAELens's name of the inference-time form)."""
    sharded: ClassVar[tuple[str, ...]] = ()
    """Its own parameters split by latent rows (W_enc, b_enc, W_dec always are)."""
    replicated: ClassVar[tuple[str, ...]] = ()
    """Its own parameters and buffers held whole on every shard (b_dec always is)."""
    export_per_latent: ClassVar[tuple[str, ...]] = ()
    """Extra (n,) tensors in the export, besides W_enc, b_enc, W_dec, b_dec."""
    unit_norm_decoder: ClassVar[bool] = True
    """Decoder rows are kept at unit norm (gradient projected, rows renormalised after each step)."""
    uses_dead_mask: ClassVar[bool] = False
    """The forward takes the trainer's dead-latent mask (AuxK)."""
    sparse: ClassVar[bool] = True
    """Trains without a (B, n) buffer; only sparse families take bf16 weights."""
    decoder_init_scale: ClassVar[float] = 1.0
    """Initial norm of the decoder rows."""
    export_renames: ClassVar[dict[str, str]] = {}
    """SAELens's name for a shared parameter where it differs (gated: b_enc is b_gate)."""
    export_replicated: ClassVar[tuple[str, ...]] = ()
    """Extra whole tensors in the export (the skip-transcoder's W_skip), written once like b_dec; their
    shapes come from `export_shapes`."""
    sites: ClassVar[int] = 1
    """Activation sites per token the family reads (model.sites): 1 for an SAE, 2 for a transcoder
    (the MLP's input, then its output); 0 for any number from 2 (a crosscoder)."""

    def __init__(self, cfg: SaeConfig) -> None:
        self.cfg = cfg

    def add_parameters(self, sae: SparseAutoencoder, n_local: int) -> None:
        """Registers the family's own parameters and buffers on `sae` (n_local latents)."""

    def init_from_batch(self, sae: SparseAutoencoder, x: Tensor) -> None:
        """Data-dependent initialisation on the first training batch (scaled, after b_dec is set);
        identical on every data replica."""

    @classmethod
    def width(cls, d_model: int, n_sites: int) -> int:
        """The dictionary's vector width for data of n_sites sites of d_model each (0: one site)."""
        return d_model

    @classmethod
    def out_width(cls, d_model: int, n_sites: int) -> int:
        """The decoder's width (the target's): the encoder's, except where the family writes into more
        sites than it reads."""
        return cls.width(d_model, n_sites)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(what the encoder reads, what the decoder reconstructs) of a batch: x and x for an SAE."""
        return x, x

    def decode(self, sae: SparseAutoencoder, x: Tensor, vals: Tensor, idx: Tensor) -> Tensor:
        """The reconstruction of the batch x's target from its codes (vals, idx)."""
        return sae.decode_sparse(vals, idx)

    @classmethod
    def splice_targets(cls, n_sites: int) -> list[tuple[int, int]]:
        """Where the family's reconstruction goes in a replacement model (sae_dist.features.replace):
        (site index whose module output it replaces, block of the reconstruction), one per replaced
        site. None here: an SAE replaces the site it reads (sae_dist.features.splice)."""
        return []

    def export_shapes(self, d_model: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the `export_replicated` tensors."""
        return {}

    def forward(self, sae: SparseAutoencoder, x: Tensor, dead_mask: Tensor | None) -> SaeOutput:
        """Training (and eval-mode) forward on scaled activations x (B, d)."""
        raise NotImplementedError

    def encode_sparse(self, sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, local ids) of the active latents in inference mode, x (B, d)."""
        raise NotImplementedError

    def export_tensors(self, sae: SparseAutoencoder) -> dict[str, Tensor]:
        """The tensors named in `export_per_latent`, (n_local,) each, as SAELens reads them."""
        return {}

    def export_fields(self) -> dict[str, Any]:
        """Extra cfg.json fields."""
        return {}

    def load_exported(self, sae: SparseAutoencoder, tensors: dict[str, Tensor]) -> None:
        """Sets the family's own parameters from exported tensors (scale 1)."""

    @classmethod
    def config_from_export(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """SaeConfig fields recovered from an exported cfg.json."""
        return {}

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Cross-group checks before any work (called by `sae_dist.config.validate`)."""
        src = cfg.data.source
        if src == "lm":
            cls.check_sites(cfg, len(cfg.model.sites), f"model.sites lists {len(cfg.model.sites)} ({list(cfg.model.sites)})")
        elif src == "synthetic":
            cls.check_sites(cfg, cfg.data.synthetic_sites, f"data.synthetic_sites is {cfg.data.synthetic_sites}")
        if cfg.trainer.param_dtype == "bf16":
            require(
                cls.sparse,
                f"trainer.param_dtype (bf16) serves the sparse families, but sae.arch is {cfg.sae.arch} (a dense "
                "encoder); use trainer.param_dtype=fp32 or another sae",
            )

    @classmethod
    def check_sites(cls, cfg: Config, n: int, what: str) -> None:
        """The data's sites per token (0: plain (tokens, d) rows) against the family's: `what` says where
        the number came from (a setting, or the activation cache's index)."""
        if cls.sites == 1:
            require(
                n == 0,
                f"sae.arch={cfg.sae.arch} reads one activation site, but {what}; use model.sites=[] (the one "
                "site model.hook_point), or a family that reads several (sae=transcoder)",
            )
            return
        want = f"exactly {cls.sites}" if cls.sites else "at least 2"
        require(
            n == cls.sites if cls.sites else n >= 2,
            f"sae.arch={cfg.sae.arch} reads {want} activation sites per token, but {what}; set model.sites, "
            "e.g. for MiniLM's layer-3 MLP model.sites=[encoder.layer.3.intermediate:in,"
            "encoder.layer.3.output.dense:out] (data.synthetic_sites for synthetic data)",
        )

    @classmethod
    def check_source(cls, cfg: Config, source: Any) -> None:
        """Checks of the data source itself, once it is built and before the first step (a CLT: the
        order in which the model reaches its sites)."""

    @classmethod
    def firings_per_token(cls, cfg: Config) -> int:
        """Latents of the whole dictionary active on an average token (sae.k for the top-k families):
        an average latent fires once in n_latents / this many tokens (the automatic dead window)."""
        return cfg.sae.k

    @property
    def resample_every(self) -> int:
        """Steps between resamplings of dead latents (0: never)."""
        return 0


def fired_from_sparse(n_local: int, vals: Tensor, idx: Tensor) -> Tensor:
    """(n_local,) bool: latents with a positive value somewhere in (vals, idx)."""
    fired = torch.zeros(n_local, dtype=torch.bool, device=vals.device)
    fired[idx[vals > 0]] = True
    return fired


class ActiveCapError(RuntimeError):
    """A token has more active latents on one shard than the sparse encoder may hold."""


class ThresholdEncoder:
    """The sparse encoder of the threshold families (JumpReLU, gated): per row, the latents whose
    pre-activation exceeds its threshold minus `window`, without a (B, n) buffer. The per-row width
    starts small and doubles when a batch needs more (the kernel reports every row's true count),
    up to `max_active`, past which the run stops with the setting to change."""

    def __init__(self, max_active: int, start: int = 256) -> None:
        self.max_active = max_active
        self.cap = start

    def __call__(
        self, sae: SparseAutoencoder, xc: Tensor, threshold: Tensor, window: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> pre-activations (B, c), local ids (B, c), valid (B, c) bool (False: padding)."""
        cap = min(self.cap, sae.n_local, self.max_active)
        while True:
            pre, idx, count = kernels.threshold_encode(xc, sae.W_enc, sae.b_enc, threshold, window, cap, sae.encoder_chunk)
            most = int(count.max()) if count.numel() else 0
            if most > self.max_active:
                raise ActiveCapError(
                    f"a token has {most} active latents on this shard, above sae.max_active ({self.max_active}); "
                    "raise sae.max_active (memory grows with it), the sparsity coefficient, or sae.init_l0"
                )
            if most <= cap:
                break
            cap = min(sae.n_local, self.max_active, 1 << (most - 1).bit_length())
        self.cap = max(self.cap, cap)
        width = max(most, 1)  # the backward costs B x width: drop the slots no row used
        pre, idx = pre[:, :width], idx[:, :width]
        valid = torch.arange(pre.shape[1], device=pre.device) < count.clamp_max(pre.shape[1]).unsqueeze(1)
        return pre, idx, valid


@torch.no_grad()
def per_latent_quantile(sae: SparseAutoencoder, xc: Tensor, fires: int, block: int = 4096) -> Tensor:
    """(n_local,) for each latent, the value its pre-activation (x - b_dec) W_enc^T + b_enc exceeds on
    `fires` tokens of the batch xc: a threshold there makes every latent fire on that share of tokens.
    Streams over latent blocks: at most (B, block) at a time."""
    fires = max(1, min(fires, xc.shape[0]))
    out = []
    for s in range(0, sae.n_local, block):
        pre = xc @ sae.W_enc[s : s + block].float().t() + sae.b_enc[s : s + block].float()  # (B, block)
        out.append(pre.topk(fires, dim=0).values[-1])
    return torch.cat(out)
