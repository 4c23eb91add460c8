"""parallel.engine=deepspeed: DeepSpeed ZeRO stage 1/2 shards Adam's state (and, at stage 2, the
gradients) over the dp axis; the fp axis is DeepSpeed's model-parallel group, so its gradient clipping
sums the sharded parameters' norms over fp and counts the replicated b_dec once.

    torchrun --nproc-per-node 4 -m sae_dist parallel.dp=2 parallel.fp=2 parallel.engine=deepspeed \\
        parallel.zero_stage=2 parallel.offload_optimizer=true

Runs on CPU (gloo) and GPUs (nccl). The decoder-gradient projection is a hook on W_dec's gradient (ZeRO
reduces gradients into its own buffers during backward, so p.grad is gone by the time the step runs).
The decoder renormalisation runs on ZeRO's fp32 master partitions, right after Adam updates them and
before ZeRO copies them into the model's weights and all-gathers those: each dp rank holds a flat slice
of W_dec, cut anywhere inside a row, so the row norms are its partial sums of squares summed over dp (one
all-reduce of n_local floats). With trainer.param_dtype=bf16 the model's weights and gradients are bf16
and only the masters are fp32, so the renormalised rows are never rounded into the next update.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor

from sae_dist.config import Config, ConfigError
from sae_dist.optim import ChunkedAdam, check_state_keys
from sae_dist.parallel.dims import Mesh
from sae_dist.parallel.dp import DataParallel
from sae_dist.sae import SparseAutoencoder

log = logging.getLogger(__name__)


class MeshMpu:
    """The model-parallel-unit interface DeepSpeed reads groups from: model parallel = fp, data = dp."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    def _group(self, axis: str) -> Any:
        if self.mesh.device_mesh is None:
            raise ConfigError("parallel.engine=deepspeed needs torch.distributed: launch with torchrun")
        return self.mesh.device_mesh[axis].get_group()

    def get_model_parallel_rank(self) -> int:
        return self.mesh.fp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.mesh.fp

    def get_model_parallel_group(self) -> Any:
        return self._group("fp")

    def get_data_parallel_rank(self) -> int:
        return self.mesh.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.dp

    def get_data_parallel_group(self) -> Any:
        return self._group("dp")


def ds_config(cfg: Config) -> dict[str, Any]:
    p = cfg.parallel
    zero: dict[str, Any] = {
        "stage": p.zero_stage, "overlap_comm": False, "contiguous_gradients": True,
        "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7,  # 200 MB fp32 each (docs/memory.md)
    }
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    mixed = {"bf16": {"enabled": True}} if cfg.trainer.param_dtype == "bf16" else {}
    return mixed | {
        "train_micro_batch_size_per_gpu": 1,  # batches are fed by the trainer; DeepSpeed only counts them
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.trainer.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # ChunkedAdam: the same update as the torch engine
        "zero_force_ds_cpu_optimizer": False,  # offload with ChunkedAdam (DeepSpeedCPUAdam needs built ops)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """Same interface as trainer.TorchEngine: `optimizer`, `data_replicas` and `step(loss, fired, clip)`."""

    def __init__(self, sae: SparseAutoencoder, lr: float, cfg: Config, mesh: Mesh) -> None:
        try:
            import deepspeed
        except ImportError as err:
            raise ConfigError(
                "parallel.engine=deepspeed but DeepSpeed is not installed; "
                "DS_BUILD_OPS=0 pip install deepspeed, or use parallel.engine=torch"
            ) from err
        self.sae = sae
        for name, p in sae.named_parameters():
            p.model_parallel = name in sae.sharded_names() and mesh.fp > 1  # type: ignore[attr-defined]
        if sae.unit_norm_decoder:
            sae.W_dec.register_hook(self._project)
        # DeepSpeed reads torchrun's variables; Ray trainer actors join the group without them
        os.environ.setdefault("RANK", str(mesh.rank))
        os.environ.setdefault("WORLD_SIZE", str(mesh.dims.world_size))
        os.environ.setdefault("LOCAL_RANK", "0")  # a Ray actor sees only its own device
        deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False)
        optimizer = ChunkedAdam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=sae, optimizer=optimizer, config=ds_config(cfg), mpu=MeshMpu(mesh), dist_init_required=False
        )
        self.mixed = cfg.trainer.param_dtype != "fp32"
        self.dp_group = mesh.group("dp")
        if sae.unit_norm_decoder:  # Adam's step on the masters, then this, then ZeRO's copy to the model
            self.optimizer.optimizer.register_step_post_hook(lambda *_: self._normalize_master_decoder())
        self.data = DataParallel(mesh)
        self.data_replicas = mesh.dp

    def _project(self, grad: Tensor, rows: int = 65536) -> Tensor:
        """sae.project_decoder_grad as a gradient hook: linear in the gradient, so projecting each
        contribution equals projecting their sum. A block of rows at a time (row dot products summed in
        fp32 for bf16 gradients), so the only temporary as large as W_dec is the returned gradient."""
        W = self.sae.W_dec.detach()
        out = torch.empty_like(grad)
        for s in range(0, grad.shape[0], rows):
            g, w = grad[s : s + rows], W[s : s + rows]
            out[s : s + rows] = g - (g * w).sum(dim=1, keepdim=True, dtype=torch.float32).to(g.dtype) * w
        return out

    @torch.no_grad()
    def _normalize_master_decoder(self) -> None:
        """Unit-norm decoder rows on the fp32 masters: this rank's slice of W_dec's rows (whole rows in
        the middle, parts of rows at its two ends), row norms from partial sums over dp."""
        W = self.sae.W_dec
        n, d = W.shape
        pieces = []  # (first row, (rows, width) view of the master slice)
        frag = getattr(W, "_hp_mapping", None)  # None: this dp rank's partition holds none of W_dec
        if frag is not None:
            hp, start, numel = frag.hp_fragment, frag.lp_fragment_address.start, frag.lp_fragment_address.numel
            pos, end = start, start + numel
            while pos < end:
                row, col = divmod(pos, d)
                if col or end - pos < d:  # a part of one row
                    width = min(d - col, end - pos)
                    pieces.append((row, hp[pos - start : pos - start + width].view(1, width)))
                    pos += width
                else:  # whole rows
                    rows = (end - pos) // d
                    pieces.append((row, hp[pos - start : pos - start + rows * d].view(rows, d)))
                    pos += rows * d
        sq = torch.zeros(n, dtype=torch.float32, device=W.device)
        for row, view in pieces:
            sq[row : row + view.shape[0]] += torch.linalg.vector_norm(view, dim=1).square().to(sq.device)
        if self.dp_group is not None:
            torch.distributed.all_reduce(sq, group=self.dp_group)
        norm = sq.sqrt_().clamp_min_(1e-12)
        for row, view in pieces:
            view.div_(norm[row : row + view.shape[0], None].to(view.device))

    def before_forward(self) -> None:
        """Nothing to move: Adam takes its gradient at the weights it updates."""

    def params_changed(self) -> None:
        """Weights written outside the optimizer (b_dec's initialisation) are copied into ZeRO's fp32
        master partitions, which the next step would otherwise restore."""
        self.optimizer.refresh_fp32_params()

    @torch.no_grad()
    def shift(self, p: Tensor, delta: Tensor) -> None:
        """Adds `delta` to the weights `p` outside the optimizer: to its fp32 master (assembled from and
        written back to the dp partitions: a collective over dp) and to the model's copy, rounded to its
        dtype."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        master = safe_get_full_fp32_param(p) + delta.to(torch.float32)
        safe_set_full_fp32_param(p, master)
        p.copy_(master.to(p.dtype))

    def weight_tensors(self) -> dict[str, Tensor]:
        """The module's state with every parameter as its fp32 master (for bf16 weights, assembled from
        the dp partitions: a collective over dp, every replica calls it)."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = self.sae.state_dict()
        if self.mixed:
            for name, p in self.sae.named_parameters():
                state[name] = safe_get_full_fp32_param(p)
        return state

    def load_weights(self, tensors: dict[str, Tensor]) -> None:
        """Model weights (rounded to their dtype) and fp32 masters (exact) from fp32 tensors."""
        from deepspeed.utils import safe_set_full_fp32_param

        self.sae.load_state_dict(tensors)
        for name, p in self.sae.named_parameters():
            safe_set_full_fp32_param(p, tensors[name].to(device=p.device, dtype=torch.float32))

    ADAM_KEYS = ("exp_avg", "exp_avg_sq")

    def state_tensors(self) -> dict[str, Tensor]:
        """Adam's state of this fp shard's parameters, assembled from the dp partitions, in the torch
        engine's layout (`<param>.step|exp_avg|exp_avg_sq`): checkpoints move between engines, dp and fp
        sizes. A collective over dp: every replica calls it; dp rank 0 writes the file."""
        from deepspeed.utils import safe_get_full_optimizer_state

        base = self.optimizer.optimizer  # ChunkedAdam over ZeRO's flat fp32 partitions
        if not any(base.state.get(hp) for hp in self.optimizer.single_partition_of_fp32_groups):
            return {}  # no step yet: Adam's state does not exist
        step = next(st["step"] for st in base.state.values() if "step" in st)
        out: dict[str, Tensor] = {}
        for name, p in self.sae.named_parameters():
            for key in self.ADAM_KEYS:
                out[f"{name}.{key}"] = safe_get_full_optimizer_state(p, key).float()  # fp32 as kept
            out[f"{name}.step"] = torch.as_tensor(step, dtype=torch.float32).clone()
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """The inverse of `state_tensors`: each rank keeps its dp partition of the full state."""
        from deepspeed.utils import safe_set_full_optimizer_state

        if not tensors:
            return
        check_state_keys("adam", tensors)  # a signum_sf checkpoint cannot seed ZeRO's Adam
        zero, base = self.optimizer, self.optimizer.optimizer
        step = next(v for k, v in tensors.items() if k.endswith(".step"))
        for hp in zero.single_partition_of_fp32_groups:  # create the state the first step would create
            base.state[hp] = {"step": step.clone().to(torch.float32),
                              **{key: torch.zeros_like(hp) for key in self.ADAM_KEYS}}
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()  # link each parameter to its slice of that state
        for name, p in self.sae.named_parameters():
            for key in self.ADAM_KEYS:
                safe_set_full_optimizer_state(p, tensors[f"{name}.{key}"].to(torch.float32), key)

    def step(self, loss: Tensor, fired: Tensor | None, grad_clip: float) -> tuple[Tensor, Tensor | None]:
        self.engine.backward(loss)
        fired = self.data.any(fired)
        self.engine.step()  # Adam, the decoder renormalisation on the masters, masters -> model weights
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float(norm) if norm is not None else float("nan")), fired
