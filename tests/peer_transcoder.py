"""Runs in the peer venv (scripts/peer_venv.sh), not in ours: SAELens loads a transcoder export of ours
with its own `SAE.load_from_disk` and encodes and decodes inputs that tests/test_peer_metrics.py gives it.

    <peer python> tests/peer_transcoder.py <export_dir> <inputs.safetensors> <out.safetensors>

inputs: `x` (B, d_in). out: `acts` (B, n), SAELens's encode (a ReLU over every latent); `codes` (B, n),
those kept at the k largest per row (cfg.json's k, our TopK); `recon` (B, d_out), SAELens's forward of
`codes`' decode plus its skip path where the class has one. Prints the class SAELens built.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    export_dir, inputs, out = sys.argv[1:4]
    from sae_lens import SAE

    sae = SAE.load_from_disk(export_dir, device="cpu")
    k = json.load(open(os.path.join(export_dir, "cfg.json")))["k"]
    x = load_file(inputs)["x"]
    with torch.no_grad():
        acts = sae.encode(x)
        top = acts.topk(k, dim=1)
        codes = torch.zeros_like(acts).scatter(1, top.indices, top.values)
        recon = sae.decode(codes)
        if getattr(sae, "W_skip", None) is not None:
            recon = recon + x @ sae.W_skip.T
    save_file({"acts": acts.contiguous(), "codes": codes.contiguous(), "recon": recon.contiguous()}, out)
    print(json.dumps({"class": type(sae).__name__, "d_out": int(sae.cfg.d_out)}))


if __name__ == "__main__":
    main()
