"""Every Triton kernel configuration compiles for an H100 (sm_90a) here, without a GPU, and
does not spill registers (ptxas -v). Runs in the main test process: triton.compile needs
TRITON_INTERPRET unset."""

import os

import pytest
import torch

from serq_ao.kernels import triton_gemm, triton_quantize
from serq_ao.kernels.gpu_compile import compile_for_gpu

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiling for a GPU needs TRITON_INTERPRET unset", allow_module_level=True)


@pytest.mark.parametrize("config", triton_quantize.CONFIGS, ids=str)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale_mode", ["floor", "rceil"])
@pytest.mark.parametrize("pre_op", ["none", "scale+int16", "int32"])
def test_activation_quantization_compiles_for_h100_without_spills(config, x_dtype, scale_mode, pre_op):
    perm_dtype = {"none": None, "scale+int16": torch.int16, "int32": torch.int32}[pre_op]
    spec = triton_quantize.compile_spec(config, x_dtype, scale_mode, has_scale=pre_op.startswith("scale"), perm_dtype=perm_dtype)
    resources = compile_for_gpu(spec, "quantize_activation_mxfp4", str(config))
    assert resources.spill_stores == 0 and resources.spill_loads == 0, resources
    assert resources.registers <= 255


@pytest.mark.parametrize("config", triton_quantize.CONFIGS, ids=str)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rotation", [32, 64, 128])
@pytest.mark.parametrize("has_scale", [False, True])
def test_rotated_activation_quantization_compiles_for_h100_without_spills(config, x_dtype, rotation, has_scale):
    spec = triton_quantize.compile_spec(config, x_dtype, "floor", has_scale=has_scale,
                                        perm_dtype=torch.int16 if has_scale else None, rotation=rotation)
    resources = compile_for_gpu(spec, "quantize_activation_mxfp4", f"{config} rotation {rotation}")
    assert resources.spill_stores == 0 and resources.spill_loads == 0, resources
    assert resources.registers <= 255
    # the butterfly's adds (and the pre-op's products before them) round as the float32
    # reference does only if ptxas fuses none of them into an FMA
    assert resources.fused_multiply_adds == 0, resources


@pytest.mark.parametrize("config", triton_gemm.CONFIGS, ids=str)
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_compiles_for_h100_without_spills(config, has_bias, out_dtype):
    spec = triton_gemm.compile_spec(config, has_bias=has_bias, out_dtype=out_dtype)
    resources = compile_for_gpu(spec, "serq_mxfp4_gemm", str(config))
    assert resources.spill_stores == 0 and resources.spill_loads == 0, resources
    assert resources.shared_bytes <= 227 * 1024  # an H100 SM's shared memory
    if config.block_m >= 64:  # prefill tiles must use Hopper's warpgroup MMA
        assert resources.uses_wgmma, resources
