"""Runs in the peer venv (scripts/peer_venv.sh), not in ours: circuit-tracer's own `load_clt` reads a CLT
that `sae-dist convert --to circuit-tracer` wrote, and its own encode and decode give the reconstruction
of inputs that tests/test_peer_metrics.py gives it.

    <peer python> tests/peer_clt.py <circuit-tracer folder> <inputs.safetensors> <out.safetensors>

inputs: `x` (L, B, d), each layer's MLP input. out: `pre` (L, B, m), circuit-tracer's per-layer
pre-activations (`encode_layer` without its activation); `recon` (L, B, d), its `decode` of those kept
at the k largest per layer and token (clt_config.json's k, our TopK; its own activation is a ReLU over
every latent). Prints the sizes circuit-tracer inferred from the files.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    folder, inputs, out = sys.argv[1:4]
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    clt = load_clt(folder, device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    k = json.load(open(os.path.join(folder, "clt_config.json")))["k"]
    x = load_file(inputs)["x"]
    with torch.no_grad():
        pre = torch.stack([clt.encode_layer(x[layer], layer, apply_activation_function=False)
                           for layer in range(clt.n_layers)])
        top = pre.topk(k, dim=2)
        codes = torch.zeros_like(pre).scatter(2, top.indices, top.values.relu())
        recon = clt.decode(codes)
    save_file({"pre": pre.contiguous(), "recon": recon.contiguous()}, out)
    act = clt.activation_function
    print(json.dumps({"n_layers": clt.n_layers, "d_transcoder": clt.d_transcoder, "d_model": clt.d_model,
                      "activation": getattr(act, "__name__", type(act).__name__)}))


if __name__ == "__main__":
    main()
