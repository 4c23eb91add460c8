"""Export a checkpoint step to the SAELens layout (`cfg.json` + `sae_weights.safetensors`), e.g. an SAE
of a sweep member that is still training, or one whose run died before its own export.

    python scripts/export_sae.py outputs/<date>/<time>/checkpoints/sae out/sae           # newest complete step
    python scripts/export_sae.py s3://bucket/runs/sae/step-00001000 out/sae --endpoint-url http://127.0.0.1:9000
    python scripts/export_sae.py multirun/dict-size/0_sae.n_latents=16384/checkpoints/sae out/16k

Any fsspec URL works; the shards of a feature-parallel (fp > 1) checkpoint are joined into one SAE. Reads
safetensors and JSON only (checksums from the manifest), never pickles. The activation scale is folded
into the exported weights, as in the export at the end of training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any

import torch
from safetensors.torch import load as st_load

from sae_dist.checkpoint import Checkpointer
from sae_dist.config import CheckpointConfig, Config, sae_config
from sae_dist.export import export_saelens
from sae_dist.sae import SparseAutoencoder
from sae_dist.storage import Storage, join


def _read(store: Storage, step_dir: str, name: str, manifest: dict[str, Any]) -> bytes:
    data = store.get(join(step_dir, name))
    if hashlib.sha256(data).hexdigest() != manifest["files"][name]["sha256"]:
        raise SystemExit(f"{step_dir}/{name} does not match its manifest checksum")
    return data


def export_checkpoint(url: str, out_dir: str, endpoint_url: str = "") -> dict[str, Any]:
    """Exports the step at `url` (a step folder, or a run folder: its newest complete step)."""
    cfg = Config(checkpoint=CheckpointConfig(url=url, endpoint_url=endpoint_url), output_dir=".")
    step_dir = Checkpointer(cfg).resolve(url)
    if step_dir is None:
        raise SystemExit(f"{url} holds no complete checkpoint step")
    store = Storage(step_dir, endpoint_url=endpoint_url)
    root = store.root.rstrip("/")
    manifest = json.loads(store.get(join(root, "manifest.json")))
    state = json.loads(_read(store, root, "trainer_state.json", manifest))
    layout = manifest["layout"]
    pieces: dict[str, list[torch.Tensor]] = {}
    for shard in sorted(layout["shards"], key=lambda s: s["latents"][0]):
        for name, t in st_load(_read(store, root, shard["model"], manifest)).items():
            if name in layout["sharded"]["model"] or name not in pieces:
                pieces.setdefault(name, []).append(t)
    tensors = {name: torch.cat(ts) if name in layout["sharded"]["model"] else ts[0] for name, ts in pieces.items()}
    tensors.pop("tokens_since_fired", None)
    record = state["config"]
    sae_fields = {k[4:]: v for k, v in record.items() if k.startswith("sae.")}
    sae = SparseAutoencoder(sae_config(**sae_fields), tensors["W_dec"].shape[1])
    sae.load_state_dict(tensors)
    meta = {"hook_name": record.get("model.hook_point"), "model_name": record.get("model.name"),
            "context_size": record.get("model.context_size"), "sae_dist_step": state["step"],
            "sae_dist_checkpoint": store.unstrip(root)}
    return export_saelens(sae, state["scale"], out_dir, meta)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a run folder (newest complete step) or a step folder; any fsspec URL")
    ap.add_argument("out_dir")
    ap.add_argument("--endpoint-url", default="", help="S3-compatible endpoint for s3:// URLs (else AWS_ENDPOINT_URL)")
    args = ap.parse_args()
    cfg = export_checkpoint(args.checkpoint, args.out_dir, args.endpoint_url)
    print(f"step {cfg['sae_dist_step']}: {cfg['d_sae']} latents x d_in {cfg['d_in']} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
