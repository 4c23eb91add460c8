"""The (dp, fp) mesh: validated degrees, process-group start-up, and this rank's place on each axis.

    torchrun --nproc-per-node 4 -m sae_dist parallel.dp=2 parallel.fp=2   # init_from_env
    init_distributed(rank, world, "10.0.0.1", 29500, cfg.parallel, n)      # a Ray trainer actor
    single_process(cfg.parallel, n)                                         # no torch.distributed

Ranks are laid out fp-fastest: rank = dp_rank * fp + fp_rank, so the feature shards of one replica are
neighbours (one node on GPUs, where the per-step fp traffic is). An axis of size 1 has no group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from sae_dist.config import ConfigError, ParallelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    """Data-parallel replicas."""
    fp: int
    """Feature shards per replica."""
    world_size: int
    """Processes in the job."""
    n_latents: int
    """Dictionary size, split evenly over fp."""

    def __post_init__(self) -> None:
        for name, value in (("dp", self.dp), ("fp", self.fp)):
            if value < 1:
                raise ConfigError(f"parallel.{name} ({value}) must be >= 1")
        if self.dp * self.fp != self.world_size:
            raise ConfigError(
                f"parallel.dp ({self.dp}) x parallel.fp ({self.fp}) = {self.dp * self.fp} must equal the world "
                f"size ({self.world_size}); launch dp*fp processes (torchrun --nproc-per-node {self.dp * self.fp})"
            )
        if self.n_latents % self.fp:
            raise ConfigError(
                f"parallel.fp ({self.fp}) must divide sae.n_latents ({self.n_latents}); "
                "pick n_latents a multiple of fp"
            )

    @property
    def n_local(self) -> int:
        return self.n_latents // self.fp


@dataclass
class Mesh:
    """This rank's view of the mesh. Groups are None where the axis has size 1 (or no distributed)."""

    dims: ParallelDims
    rank: int = 0
    device_mesh: Any = None
    """torch DeviceMesh with axes ("dp", "fp"), or None in a single process."""

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def fp(self) -> int:
        return self.dims.fp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.dims.fp

    @property
    def fp_rank(self) -> int:
        return self.rank % self.dims.fp

    @property
    def latent_offset(self) -> int:
        """First latent this rank holds."""
        return self.fp_rank * self.dims.n_local

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.device_mesh is not None

    def group(self, axis: str) -> Any:
        """Process group of `axis` ("dp" or "fp") holding this rank; None when the axis has size 1."""
        if self.device_mesh is None or getattr(self.dims, axis) == 1:
            return None
        return self.device_mesh[axis].get_group()

    @property
    def world_group(self) -> Any:
        return dist.group.WORLD if self.device_mesh is not None and self.dims.world_size > 1 else None

    def barrier(self) -> None:
        if self.world_group is not None:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value of a picklable object, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_union(self, entries: dict[str, Any]) -> dict[str, Any]:
        """The union of every rank's dict, on every rank (picklable values; all_gather_object over the
        world): the checkpointer's `gather`."""
        if not self.distributed:
            return entries
        everyone: list[Any] = [None] * self.dims.world_size
        dist.all_gather_object(everyone, entries)
        return {k: v for part in everyone for k, v in part.items()}

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any (one small all-reduce; no collective alone)."""
        if self.world_group is None:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def describe(self) -> dict[str, int]:
        """What the checkpointer and logs need to know about this rank."""
        return {
            "rank": self.rank, "world": self.dims.world_size, "dp": self.dp, "fp": self.fp,
            "dp_rank": self.dp_rank, "fp_rank": self.fp_rank, "n_latents": self.dims.n_latents,
            "n_local": self.dims.n_local, "latent_offset": self.latent_offset,
        }


def resolve_device(setting: str) -> torch.device:
    """trainer.device for this process: auto is cuda:LOCAL_RANK where torch sees a GPU and cpu elsewhere;
    cuda is cuda:LOCAL_RANK (torchrun starts one process per GPU; LOCAL_RANK is 0 without torchrun)."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.device ({setting!r}) needs CUDA, but torch.cuda.is_available() is False here (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use trainer.device=auto or cpu, "
            "or run on a GPU machine with a CUDA build of torch"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if ":" in setting and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"trainer.device ({setting!r}) puts every process of this node on one GPU; "
            "use trainer.device=cuda (cuda:LOCAL_RANK, one GPU per process)"
        )
    index = int(setting.split(":")[1]) if ":" in setting else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"trainer.device ({setting!r}) resolves to cuda:{index} (LOCAL_RANK={local_rank}), but this process "
            f"sees {count} GPU(s); start at most {count} processes per node (torchrun --nproc-per-node {count}) "
            "or pick an existing cuda:N"
        )
    return torch.device("cuda", index)


def resolve_backend(name: str, device: str | torch.device = "cpu") -> str:
    """parallel.backend for an SAE on `device`: auto is nccl on CUDA and gloo otherwise; nccl on a CPU
    device is refused (NCCL moves CUDA tensors only)."""
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return "nccl" if on_cuda else "gloo"
    if name == "nccl" and not on_cuda:
        raise ConfigError(
            f"parallel.backend (nccl) moves CUDA tensors only, but the SAE trains on {device} (trainer.device); "
            "use parallel.backend=auto or gloo, or trainer.device=cuda on a GPU machine"
        )
    return name


def single_process(p: ParallelConfig, n_latents: int) -> Mesh:
    return Mesh(ParallelDims(p.dp, p.fp, 1, n_latents))


def build_mesh(p: ParallelConfig, n_latents: int) -> Mesh:
    """The mesh over an initialised default group (all ranks must call this together)."""
    from torch.distributed.device_mesh import init_device_mesh

    dims = ParallelDims(p.dp, p.fp, dist.get_world_size(), n_latents)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (dims.dp, dims.fp), mesh_dim_names=("dp", "fp"))
    return Mesh(dims, dist.get_rank(), mesh)


def init_distributed(
    rank: int, world_size: int, master_addr: str, master_port: int, p: ParallelConfig, n_latents: int,
    device: str | torch.device = "cpu", timeout_s: float | None = None,
) -> Mesh:
    """Joins the process group explicitly (Ray actors: the driver hands out ranks and one address).
    `device` is where the SAE trains (it picks the backend when parallel.backend=auto); `timeout_s`
    bounds the rendezvous (default parallel.rendezvous_timeout_s)."""
    ParallelDims(p.dp, p.fp, world_size, n_latents)  # fail before blocking on the rendezvous
    timeout_s = timeout_s or p.rendezvous_timeout_s
    if not dist.is_initialized():
        with _rendezvous(timeout_s, rank, world_size, f"{master_addr}:{master_port}"):
            dist.init_process_group(
                resolve_backend(p.backend, device), init_method=f"tcp://{master_addr}:{master_port}",
                rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
            )
    return build_mesh(p, n_latents)


def init_from_env(
    p: ParallelConfig, n_latents: int, device: str | torch.device = "cpu", timeout_s: float | None = None,
    group: bool = False,
) -> Mesh:
    """torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, or a single process when they are absent:
    without torch.distributed, or, with `group` (DeepSpeed needs one), in a one-process group on a free
    local port. `device` is where the SAE trains (it picks the backend when parallel.backend=auto);
    `timeout_s` bounds the rendezvous (default parallel.rendezvous_timeout_s)."""
    timeout_s = timeout_s or p.rendezvous_timeout_s
    world = int(os.environ.get("WORLD_SIZE", "1"))
    alone = world == 1 and "MASTER_ADDR" not in os.environ
    if world == 1 and not dist.is_initialized() and not group:
        return single_process(p, n_latents)
    ParallelDims(p.dp, p.fp, world, n_latents)
    if not dist.is_initialized():
        backend = resolve_backend(p.backend, device)
        if backend == "nccl":  # NCCL binds each rank to the current device
            index = torch.device(device).index
            torch.cuda.set_device(index if index is not None else int(os.environ.get("LOCAL_RANK", "0")))
        if alone:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))
        else:
            address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            with _rendezvous(timeout_s, int(os.environ.get("RANK", "0")), world, address):
                dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    mesh = build_mesh(p, n_latents)
    log.info("rank %d of %d: dp_rank %d/%d, fp_rank %d/%d", mesh.rank, world, mesh.dp_rank, mesh.dp,
             mesh.fp_rank, mesh.fp)
    return mesh


class RendezvousTimeoutError(TimeoutError):
    """Not every rank joined the process group in time; says how long, where, and the setting."""


@contextlib.contextmanager
def _rendezvous(timeout_s: float, rank: int, world: int, address: str) -> Iterator[None]:
    try:
        yield
    except dist.DistStoreError as err:  # torch's own says "1/2 clients joined" and nothing of the cause
        raise RendezvousTimeoutError(
            f"rank {rank}: not all {world} ranks joined the process group at {address} within {timeout_s:g} s "
            f"(parallel.rendezvous_timeout_s): a rank never started or cannot reach this address; raise "
            f"parallel.rendezvous_timeout_s for slow starts ({err})"
        ) from err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
