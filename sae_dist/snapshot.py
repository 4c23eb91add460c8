"""The host copy a checkpoint is made of: tensors copied once, straight into safetensors bytes.

`pack_safetensors` writes the safetensors layout (8-byte header length, JSON header, raw data) into one
bytearray, copying each tensor into its slice with torch (which releases the GIL; from a GPU this is the
device-to-host copy). The upload thread then hashes and sends that buffer as it is: no second copy and
no long GIL hold that would stall the training thread. Any safetensors reader loads the result.
"""

from __future__ import annotations

import json
import math
import struct

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_layout(
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The start of a .safetensors file for tensors of these (dtype, shape): (length + JSON header,
    name -> (begin, end) byte offsets of its data after that start)."""
    # widest elements first, so every tensor starts at a multiple of its element size
    names = sorted(specs, key=lambda k: (-specs[k][0].itemsize, k))
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offsets, offset = {}, 0
    for name in names:
        dtype, shape = specs[name]
        size = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offsets[name] = (offset, offset + size)
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % 8)
    return struct.pack("<Q", len(head)) + head, offsets


def pack_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytearray:
    """`tensors` (on any device) as the bytes of a .safetensors file."""
    start, offsets = safetensors_layout({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, metadata)
    total = max((end for _, end in offsets.values()), default=0)
    out = bytearray(len(start) + total)
    out[: len(start)] = start
    if total:
        data = torch.frombuffer(out, dtype=torch.uint8, offset=len(start))  # shares out's memory
        for name, (begin, end) in offsets.items():
            if end > begin:
                data[begin:end].copy_(tensors[name].detach().reshape(-1).view(torch.uint8))
    return out


def optimizer_tensors(sae: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer state as `<param>.<key>` -> tensor (live references: pack them to copy)."""
    out = {}
    for name, p in sae.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            out[f"{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(float(value))
    return out


def load_optimizer_tensors(sae: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of `optimizer_tensors`: each state tensor lands on its parameter's device, except a
    `step` counter that torch keeps on the host (Adam unless capturable or fused), as torch would place it."""
    on_device = {id(p): bool(g.get("capturable") or g.get("fused")) for g in optimizer.param_groups for p in g["params"]}
    for name, p in sae.named_parameters():
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        if state:
            optimizer.state[p] = {
                k: v if k == "step" and not on_device.get(id(p)) else v.to(p.device) for k, v in state.items()
            }
