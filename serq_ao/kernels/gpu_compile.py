"""Compile the Triton kernels for an H100 on a machine without one, and read their resources.

``triton.compile`` with a ``GPUTarget`` builds PTX and a cubin without a device; the ptxas
that triton bundles then reports registers per thread and spills (``ptxas -v``). Tests use it
to prove that every kernel configuration compiles for sm_90a and does not spill;
``benchmarks/kernel_resources.py`` records the figures. Must run without TRITON_INTERPRET
(under the interpreter ``triton.jit`` gives functions that cannot be compiled).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H100 = GPUTarget("cuda", 90, 32)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
CUOBJDUMP = PTXAS.with_name("cuobjdump")


@dataclasses.dataclass(frozen=True)
class KernelResources:
    kernel: str
    variant: str  # the configuration and options it was compiled with
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared_bytes: int  # dynamic shared memory triton asks for
    num_warps: int
    uses_wgmma: bool  # Hopper's warpgroup MMA (what tl.dot on bf16 should become)
    # float32 fused multiply-adds in the machine code (cuobjdump -sass): a kernel that must
    # round like a plain-PyTorch reference needs none
    fused_multiply_adds: int


def compile_for_gpu(spec, kernel_name: str, variant: str, target: GPUTarget = H100) -> KernelResources:
    """Compile ``spec`` (a kernel module's ``compile_spec(...)``: fn, signature, constexprs,
    attrs, options) for ``target`` and run ``ptxas -v`` on its PTX."""
    source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    compiled = triton.compile(source, target=target, options=dict(spec.options))
    ptx = compiled.asm["ptx"]
    arch = f"sm_{target.arch}a" if target.arch >= 90 else f"sm_{target.arch}"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        cubin = Path(folder) / "kernel.cubin"
        done = subprocess.run([str(PTXAS), "-v", "--gpu-name", arch, str(path), "-o", str(cubin)],
                              capture_output=True, text=True)
        sass = subprocess.run([str(CUOBJDUMP), "-sass", str(cubin)], capture_output=True, text=True).stdout \
            if done.returncode == 0 else ""
    report = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed for {kernel_name} [{variant}]:\n{report}")
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output for {kernel_name} [{variant}]:\n{report}")
    return KernelResources(
        kernel=kernel_name,
        variant=variant,
        registers=int(registers.group(1)),
        spill_stores=int(spills.group(1)),
        spill_loads=int(spills.group(2)),
        shared_bytes=int(compiled.metadata.shared),
        num_warps=int(compiled.metadata.num_warps),
        uses_wgmma="wgmma" in ptx,
        fused_multiply_adds=len(re.findall(r"\bFFMA\b", sass)),
    )
