"""Compile the cascaded-attention kernel for sm_90 (H100/H200) with Triton's compiler and ptxas, no GPU
needed, exactly as ``cascaded_attention`` launches it: the call runs up to the launch, which is caught,
and the caught arguments become the compiler's signature. Prints the registers per thread of the cubin.
Triton's interpreter kernels cannot be compiled, so run it without TRITON_INTERPRET:

    TRITON_INTERPRET=0 python tests/_compile_for_hopper.py efficientvit_m0 2 fp16   # variant, stage, dtype
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import effvit
from effvit.kernels import cascaded_attention as ca
from effvit.models.efficientvit import VARIANTS

SIDES_AT_224 = (14, 7, 4)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRITON_TYPES = {dtype: name for name, dtype in DTYPES.items()}


class CaughtLaunch:
    """Stands in for the kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of running it."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.args, self.kwargs = args, kwargs
        return launch


def compile_stage(variant: str, stage: int, dtype: torch.dtype, arch: int = 90):
    attn = effvit.create_model(variant).eval().stages[stage].blocks[0].mixer.m.attn
    side = SIDES_AT_224[stage]
    x = torch.randn(1, side, side, VARIANTS[variant].widths[stage], dtype=dtype)
    jit_kernel, caught = ca._cga_kernel, CaughtLaunch()
    ca._cga_kernel, ca.available = caught, lambda device: True
    with torch.no_grad():
        ca.cascaded_attention(x, *ca.operands(attn, side, side))
    names = list(jit_kernel.arg_names)
    signature = {n: f"*{TRITON_TYPES[a.dtype]}" if torch.is_tensor(a) else "i32" for n, a in zip(names, caught.args)}
    constexprs = {n: caught.kwargs[n] for n in names[len(caught.args):]}
    signature |= dict.fromkeys(constexprs, "constexpr")
    options = {k: caught.kwargs[k] for k in ("num_warps", "maxnreg") if k in caught.kwargs}
    return triton.compile(ASTSource(jit_kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                          options=options)


def registers(kernel) -> int:
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1))


if __name__ == "__main__":
    variant, stage, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(f"{variant} stage {stage + 1} {dtype} sm_90: {registers(compile_stage(variant, stage, DTYPES[dtype]))} "
          "registers")
