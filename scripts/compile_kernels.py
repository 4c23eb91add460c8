"""Compiles the Triton kernels ahead of time for NVIDIA GPUs, on a machine without one, and reports
what ptxas says of each: registers per thread, spills to local memory, shared memory.

    python scripts/compile_kernels.py                         # sm_80 and sm_90, d=768 k=32, AuxK d/2
    python scripts/compile_kernels.py --arch 90 --k 32 --k-aux 64 --dtype bf16

Triton lowers each kernel to PTX and its bundled ptxas assembles the PTX to a cubin, exactly as at the
first launch on a GPU, with the constexprs the launchers in `kernels/` pass (the same block sizes and
padding; an AuxK wider than `FUSED_AUX_MAX` is a torch pass, not a kernel). This checks that the compiled path compiles (the CPU tests run Triton's interpreter, which
accepts some programs the compiler rejects) and shows register pressure; it runs nothing. Run it
without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import triton
from sae_dist.kernels import triton_decoder as dec
from sae_dist.kernels import triton_encoder as enc
from sae_dist.kernels import triton_threshold as thr
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

PTR = {"fp32": "*fp32", "bf16": "*bf16"}


@dataclass
class Case:
    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]


def cases(d: int, k: int, k_auxes: list[int], dtype: str) -> list[Case]:
    """Every kernel with the launchers' constexprs for inputs of `dtype` (weights and activations): the
    top-k encoder alone and with each AuxK width the launcher fuses (a wider one is a torch pass, no
    kernel), the threshold encoder (no k: cap is a runtime argument), the sparse gathers and scatters."""
    t = PTR[dtype]
    i32 = "i32"
    out = []
    for ka in [0] + [a for a in k_auxes if enc._pad(a) <= enc.FUSED_AUX_MAX]:
        has_aux = ka > 0
        sig = {"x_ptr": t, "w_ptr": t, "b_ptr": t, "mask_ptr": "*i8", "vals_ptr": "*fp32", "idx_ptr": "*i64",
               "aux_vals_ptr": "*fp32", "aux_idx_ptr": "*i64", "B": i32, "D": i32, "N": i32, "n_per_split": i32,
               "stride_xb": i32, "stride_wn": i32}
        const = {"K": k, "K_PAD": enc._pad(k), "K_AUX": ka, "K_AUX_PAD": enc._pad(ka), "HAS_AUX": has_aux,
                 "PRECISION": "tf32" if dtype == "fp32" else "ieee", "DOT_FP32": False,
                 "BLOCK_B": enc._block_b(k, ka), "BLOCK_N": 64, "BLOCK_D": 32}
        name = f"topk_encode k={k}" + (f" + AuxK k_aux={ka}" if has_aux else "")
        out.append(Case(name + f" (BLOCK_B {const['BLOCK_B']})", enc._topk_encode_kernel, sig, const))
    out.append(Case(f"threshold_encode (BLOCK_B {thr.BLOCK_B})", thr._threshold_encode_kernel,
                    {"x_ptr": t, "w_ptr": t, "b_ptr": t, "thr_ptr": t, "pre_ptr": "*fp32", "idx_ptr": "*i64",
                     "count_ptr": "*i64", "B": i32, "D": i32, "N": i32, "n_per_split": i32, "cap": i32,
                     "window": "fp32", "stride_xb": i32, "stride_wn": i32},
                    {"PRECISION": "tf32" if dtype == "fp32" else "ieee", "DOT_FP32": False,
                     "BLOCK_B": thr.BLOCK_B, "BLOCK_N": 64, "BLOCK_D": 32}))
    bd = dec._block_d(d)
    gather = {"B": i32, "D": i32, "K": i32, "stride_t": i32}
    out.append(Case("gather_sum (decode, grad of x)", dec._gather_sum_kernel,
                    {"w_ptr": "*fp32", "idx_ptr": "*i64", "table_ptr": t, "out_ptr": "*fp32", **gather},
                    {"BLOCK_B": 16, "BLOCK_D": bd}))
    out.append(Case("gather_dot (grad of values)", dec._gather_dot_kernel,
                    {"g_ptr": "*fp32", "idx_ptr": "*i64", "table_ptr": t, "out_ptr": "*fp32", **gather},
                    {"BLOCK_B": 32, "BLOCK_D": bd}))
    out.append(Case("segment_sum (weight grad, deterministic)", dec._segment_sum_kernel,
                    {"offsets_ptr": "*i64", "src_ptr": "*i64", "w_ptr": "*fp32", "x_ptr": "*fp32", "out_ptr": t,
                     "bias_ptr": "*fp32", "D": i32},
                    {"HAS_BIAS": True, "BLOCK_E": 16, "BLOCK_D": bd}))
    out.append(Case("scatter_atomic (weight grad, atomic)", dec._scatter_atomic_kernel,
                    {"idx_ptr": "*i64", "w_ptr": "*fp32", "x_ptr": "*fp32", "out_ptr": "*fp32", "bias_ptr": "*fp32",
                     "E": i32, "D": i32, "K": i32},
                    {"HAS_BIAS": True, "BLOCK_E": 32, "BLOCK_D": bd}))
    return out


def compile_case(case: Case, arch: int) -> dict[str, Any]:
    """Compiles one kernel for sm_<arch>; returns ptxas's resource report."""
    sig = dict(case.signature) | {name: "constexpr" for name in case.constexprs}
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(fn=case.fn, signature=sig, constexprs=case.constexprs),
                            target=GPUTarget("cuda", arch, 32))
    seconds = time.perf_counter() - t0
    ptx = kernel.asm["ptx"]
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)  # type: ignore[union-attr]
    ptxas = get_ptxas(arch).path  # the ptxas Triton itself runs for this architecture
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        info = subprocess.run([ptxas, f"-arch={target}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True).stderr

    def num(pattern: str) -> int:
        m = re.search(pattern, info)
        return int(m.group(1)) if m else 0

    return {"kernel": case.name, "target": target, "cubin_bytes": len(kernel.asm["cubin"]),
            "registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "shared": kernel.metadata.shared,
            "warps": kernel.metadata.num_warps, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 = A100, 90 = H100)")
    ap.add_argument("--d", type=int, nargs="+", default=[768], help="d_model (kernels see it only through BLOCK_D, at most 128)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--k-aux", type=int, nargs="+", default=[0], help="AuxK widths (0: the SAE's default, d / 2)")
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(PTR))
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 is set: unset it to compile")
    print(f"triton {triton.__version__}")
    print("| d | dtype | kernel | target | registers | spill stores / loads (bytes) | shared (bytes) | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for d in args.d:
        for dtype in args.dtype:
            for case in cases(d, args.k, [a or d // 2 for a in args.k_aux], dtype):
                for arch in args.arch:
                    r = compile_case(case, arch)
                    print(f"| {d} | {dtype} | {r['kernel']} | {r['target']} | {r['registers']} | "
                          f"{r['spill_stores']} / {r['spill_loads']} | {r['shared']} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
