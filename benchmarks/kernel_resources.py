"""Registers, spills and shared memory of every Triton kernel configuration on an H100.

    .venv/bin/python benchmarks/kernel_resources.py

Compiles each kernel for sm_90a without a GPU (serq_ao.kernels.gpu_compile) and runs the
ptxas triton bundles; writes benchmarks/results/kernel_resources.json and prints a table.
The tests (tests/kernels/test_gpu_compile.py) fail on any spill; this records the figures.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serq_ao  # noqa: E402
from serq_ao.bench import write_json  # noqa: E402
from serq_ao.kernels import triton_gemm, triton_quantize  # noqa: E402
from serq_ao.kernels.gpu_compile import compile_for_gpu  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "kernel_resources.json"


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: compiling for a GPU needs the real triton.jit")
    rows = []
    for config in triton_quantize.CONFIGS:
        for x_dtype in (torch.bfloat16, torch.float32):
            spec = triton_quantize.compile_spec(config, x_dtype, "floor", has_scale=True, perm_dtype=torch.int16)
            rows.append(compile_for_gpu(spec, "quantize_activation_mxfp4", f"{tuple(config)} x={x_dtype}, pre-op"))
            for rotation in (32, 128):
                spec = triton_quantize.compile_spec(config, x_dtype, "floor", has_scale=True, perm_dtype=torch.int16,
                                                    rotation=rotation)
                rows.append(compile_for_gpu(spec, "quantize_activation_mxfp4",
                                            f"{tuple(config)} x={x_dtype}, pre-op, rotation {rotation}"))
    for config in triton_gemm.CONFIGS:
        for out_dtype in (torch.bfloat16, torch.float32):
            spec = triton_gemm.compile_spec(config, has_bias=True, out_dtype=out_dtype)
            rows.append(compile_for_gpu(spec, "serq_mxfp4_gemm", f"{tuple(config)} out={out_dtype}, bias"))
    record = {"target": "sm_90a (H100), triton.compile without a device, ptxas -v",
              "kernels": [dataclasses.asdict(r) for r in rows]}
    write_json(OUT, record)

    from rich.console import Console
    from rich.table import Table

    table = Table(title="Triton kernels compiled for sm_90a (H100)")
    for column in ("kernel", "configuration", "warps", "registers", "spills (B)", "shared (KiB)", "wgmma", "FFMA"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r.kernel, r.variant, str(r.num_warps), str(r.registers), str(r.spill_stores + r.spill_loads),
                      f"{r.shared_bytes / 1024:.1f}", "yes" if r.uses_wgmma else "no", str(r.fused_multiply_adds))
    Console(width=200).print(table)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
