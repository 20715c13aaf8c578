"""The ops' Triton path (what they run on CUDA) against their plain-PyTorch reference path
(what they run on the CPU); and a tiny quantized model end to end.

Two ways to run it (inputs are made on the CPU either way; the references run on the CPU):

- under the Triton interpreter, the Triton path on CPU tensors, in its own process
  (TRITON_INTERPRET must be set before triton is imported):
  ``TRITON_INTERPRET=1 python -m pytest -p no:logging tests/kernels_interpret/test_linear_op.py``;
- on a CUDA machine, against the real Triton backend (inputs moved to the GPU):
  ``python -m pytest tests/kernels_interpret``.

Skipped otherwise.
"""

import copy

import pytest

from tests.kernels_interpret.device import DEVICE, INTERPRETED, on_device, skip_unless_runnable

skip_unless_runnable()

import torch  # noqa: E402

import serq_ao  # noqa: E402
from serq_ao.quant.config import SERQConfig  # noqa: E402
from serq_ao.kernels import ops  # noqa: E402
from serq_ao.formats import MXFP4Format  # noqa: E402
from serq_ao.quant.reconstruct import serq_reconstruct  # noqa: E402
from serq_ao.tensor_subclass import pack_weight, serq_mxfp4_tensor  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402


def packed(d_in, d_out, rank, preop, seed=0, rotation=0):
    g = torch.Generator().manual_seed(seed)
    main, correction = serq_reconstruct(torch.randn(d_out, d_in, generator=g) * 0.1, rank, MXFP4Format())
    scale_inv = torch.rand(d_in, generator=g) + 0.5 if preop else None
    perm = torch.randperm(d_in, generator=g) if preop else None
    return pack_weight(MXFP4Format(), main, correction, input_scale_inv=scale_inv, input_perm=perm, dtype=torch.float32,
                              rotation=rotation)


@pytest.mark.parametrize("shape", [(1, 96), (3, 7, 96), (70, 200)])
@pytest.mark.parametrize("rank, preop", [(0, False), (32, True), (64, False)])
@pytest.mark.parametrize("scale_mode", ["floor", "rceil"])
def test_triton_linear_matches_the_reference_op(shape, rank, preop, scale_mode):
    d_in = shape[-1]
    weight = packed(d_in, 48, rank, preop)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(d_in, generator=g))
    bias = torch.randn(48, generator=g)
    args = (x, weight.qdata, weight.scale, d_in, rank, scale_mode, weight.input_scale_inv, weight.input_perm, bias)
    expected = torch.ops.serq.linear_mxfp4(*args)  # CPU: the reference
    got = ops.triton_linear_mxfp4(*map(on_device, args)).cpu()
    assert got.shape == expected.shape == (*shape[:-1], 48)
    scale = (x.abs().amax() * weight.dequantize().abs().amax() * (d_in + rank)).item()
    assert (got - expected).abs().max().item() <= 1e-6 * scale


@pytest.mark.parametrize("shape", [(1, 576), (70, 200)])
@pytest.mark.parametrize("rotation", [32, 128])
def test_rotated_triton_linear_matches_the_reference_op(shape, rotation):
    d_in = shape[-1]
    weight = packed(d_in, 48, 64, True, rotation=rotation)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    args = (x, weight.qdata, weight.scale, d_in, 64, "floor", weight.input_scale_inv, weight.input_perm, None)
    expected = torch.ops.serq.linear_mxfp4(*args, rotation=rotation)  # CPU: the reference
    got = ops.triton_linear_mxfp4(*map(on_device, args), rotation=rotation).cpu()
    scale = (x.abs().amax() * weight.dequantize().abs().amax() * (d_in + 64)).item()
    assert (got - expected).abs().max().item() <= 1e-6 * scale
    unrotated = torch.ops.serq.linear_mxfp4(*args)
    assert (unrotated - expected).abs().max().item() > 1e-3 * scale  # the rotation is not a no-op


def test_standalone_ops_triton_paths_match_their_references():
    weight = packed(200, 40, 32, preop=True)
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(2))
    codes, scales = ops.triton_quantize_activation_mxfp4(
        *map(on_device, (x, "floor", weight.input_scale_inv, weight.input_perm)))  # on DEVICE
    ref_codes, ref_scales = torch.ops.serq.quantize_activation_mxfp4(x, "floor", weight.input_scale_inv, weight.input_perm)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scales.cpu(), ref_scales)
    kp = ops.padded_in_features(200)
    got = ops.triton_mxfp4_gemm(codes, scales, *map(on_device, (weight.qdata, weight.scale)), kp, 32, None,
                                torch.float32).cpu()
    expected = torch.ops.serq.mxfp4_gemm(ref_codes, ref_scales, weight.qdata, weight.scale, kp, 32, None, torch.float32)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotation", [0, 32])
def test_tiny_model_end_to_end_through_the_kernels(monkeypatch, rotation):
    model = make_tiny_llama()
    serq_ao.quantize_(model, SERQConfig(rank=32, rotation=rotation),
                      torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0)))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits  # on the CPU: the native kernels (or the reference)
        if INTERPRETED:
            # CPU tensors take the CPU kernels: force the Triton path (interpreted)
            monkeypatch.setattr(serq_mxfp4_tensor, "linear_mxfp4", ops.triton_linear_mxfp4)
        # on CUDA the op itself takes its Triton path (the real backend)
        got = copy.deepcopy(model).to(DEVICE)(on_device(ids), use_cache=False).logits.cpu()
    # fp32 sums in another order can move a later activation across a 4-bit rounding
    # boundary: the logits agree closely, not bit for bit
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < 1e-3
