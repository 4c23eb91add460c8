"""Feature- and data-parallel training (docs/design.md §3): mesh, sharded SAE, collectives.

    torchrun --nproc-per-node 4 -m sae_dist parallel.dp=2 parallel.fp=2 hydra.run.dir=outputs/fp2

`dims` builds the (dp, fp) mesh, `fp` shards the SAE and implements its cross-shard steps, `dp` averages
gradients over replicas and deals them disjoint data, `zero` is the DeepSpeed engine.
"""

from sae_dist.parallel.dims import Mesh, ParallelDims, init_distributed, init_from_env, single_process
from sae_dist.parallel.dp import DataParallel, ReplicaSource
from sae_dist.parallel.fp import FeatureParallelComm, apply_feature_parallel, gather_full_state

__all__ = [
    "DataParallel",
    "FeatureParallelComm",
    "Mesh",
    "ParallelDims",
    "ReplicaSource",
    "apply_feature_parallel",
    "gather_full_state",
    "init_distributed",
    "init_from_env",
    "single_process",
]
