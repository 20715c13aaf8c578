"""The Triton SERQ MXFP4 GEMM against a float64 reference and the plain-PyTorch op.

Two ways to run it (inputs are made on the CPU either way; references stay on the CPU):

- under the Triton interpreter, on CPU tensors, in its own process (TRITON_INTERPRET must be
  set before triton is imported):
  ``TRITON_INTERPRET=1 python -m pytest -p no:logging tests/kernels_interpret/test_gemm.py``;
- on a CUDA machine, against the real Triton backend (inputs moved to the GPU):
  ``python -m pytest tests/kernels_interpret``.

Skipped otherwise.
"""

import pytest

from tests.kernels_interpret.device import DEVICE, on_device, skip_unless_runnable

skip_unless_runnable()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from serq_ao.formats import MXFP4Format  # noqa: E402
from serq_ao.formats.mxfp4 import dequantize_mxfp4, quantize_mxfp4  # noqa: E402
from serq_ao.kernels.ops import padded_in_features, serq_linear_mxfp4, split_mxfp4_weight  # noqa: E402
from serq_ao.kernels.triton_gemm import (  # noqa: E402
    CONFIGS,
    GemmConfig,
    launch_serq_mxfp4_gemm,
    pick_config,
    serq_mxfp4_gemm,
)
from serq_ao.quant.reconstruct import serq_reconstruct  # noqa: E402
from serq_ao.tensor_subclass.serq_mxfp4_tensor import SERQMXFP4Tensor  # noqa: E402

RTOL = 1e-5  # relative to sum |a w|: fp32 accumulation in a different order than float64
TINY_CONFIG = GemmConfig(block_m=16, block_n=16, block_k=32, num_warps=1, num_stages=1)  # many tiles


def random_activations(m, d_in, seed, outliers=False):
    """Normal data with a per-row magnitude spread; optionally outlier channels (x 1e3) and an
    all-zero block (E8M0 byte 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d_in, generator=g) * torch.exp(torch.randn(m, 1, generator=g))
    if outliers:
        x[:, torch.randperm(d_in, generator=g)[: max(1, d_in // 32)]] *= 1e3
        x[0, :32] = 0.0
    return x


def packed_weight(n, d_in, rank, seed):
    """SERQ's ``[W^q | R]`` packed as the tensor subclass does: (qdata, scale)."""
    g = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(n, d_in, generator=g) * torch.exp(torch.randn(1, d_in, generator=g))
    main, correction = serq_reconstruct(weight, rank, MXFP4Format())
    packed = SERQMXFP4Tensor.from_quantized(main, correction)
    return packed.qdata, packed.scale


def random_bias(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed + 2))


def float64_reference(a_codes, a_scales, w_codes, w_scales, kp, rank, bias):
    """(A W_main^T + A[:, :r] R^T + bias, sum of |terms|), float64."""
    a = dequantize_mxfp4(a_codes, a_scales, dtype=torch.float64)  # (M, Kp)
    w = dequantize_mxfp4(w_codes, w_scales, dtype=torch.float64)  # (N, Kp + r)
    out = a @ w[:, :kp].T + a[:, :rank] @ w[:, kp:].T
    magnitude = a.abs() @ w[:, :kp].abs().T + a[:, :rank].abs() @ w[:, kp:].abs().T
    if bias is not None:
        out, magnitude = out + bias.double(), magnitude + bias.double().abs()
    return out, magnitude


def plain_fp32_reference(a_codes, a_scales, w_codes, w_scales, d_in, rank, bias):
    """What serq::linear_mxfp4's PyTorch body computes from the same codes."""
    main, correction = split_mxfp4_weight(w_codes, w_scales, d_in, rank)
    x_q = dequantize_mxfp4(a_codes, a_scales, k=d_in)
    y = F.linear(x_q, main)
    if correction is not None:
        y = y + F.linear(x_q[:, :rank], correction)
    return y if bias is None else y + bias


def assert_close_to(out, expected, magnitude, rtol=RTOL, bf16=False):
    expected, magnitude = expected.double(), magnitude.double()
    tolerance = rtol * magnitude
    if bf16:
        # One bf16 ulp (at most 2**-7 relative): the interpreter's fp32 -> bf16 cast truncates
        # (an error of up to one ulp) instead of rounding to nearest even as the GPU does (up to
        # half an ulp), so the bound holds on both backends.
        tolerance = tolerance + 2.0**-7 * expected.abs()
    error = (out.double() - expected).abs()
    assert not out.isnan().any()
    assert (error <= tolerance).all(), f"max error {error.max():.3g}, max tolerance {tolerance.max():.3g}"


def run_case(m, n, d_in, rank, with_bias, out_dtype, config=None, outliers=False, seed=0):
    kp = padded_in_features(d_in)
    a_codes, a_scales = quantize_mxfp4(random_activations(m, d_in, seed, outliers))
    w_codes, w_scales = packed_weight(n, d_in, rank, seed)
    bias = random_bias(n, seed) if with_bias else None
    # poisoned: every element must be written
    out = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEVICE)
    launch_serq_mxfp4_gemm(*map(on_device, (a_codes, a_scales, w_codes, w_scales)), kp, rank, on_device(bias),
                           out, config)
    out = out.cpu()
    expected, magnitude = float64_reference(a_codes, a_scales, w_codes, w_scales, kp, rank, bias)
    assert_close_to(out, expected, magnitude, bf16=out_dtype == torch.bfloat16)
    plain = plain_fp32_reference(a_codes, a_scales, w_codes, w_scales, d_in, rank, bias)
    assert_close_to(out, plain, magnitude, bf16=out_dtype == torch.bfloat16)


@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("n", [16, 100])
@pytest.mark.parametrize("d_in, rank", [(64, 0), (96, 32), (200, 32), (64, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_output_matches_references(m, n, d_in, rank, with_bias):
    run_case(m, n, d_in, rank, with_bias, torch.float32)


@pytest.mark.parametrize("m", [1, 70])
@pytest.mark.parametrize("d_in, rank", [(200, 0), (200, 32), (64, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_output_matches_references(m, d_in, rank, with_bias):
    run_case(m, 100, d_in, rank, with_bias, torch.bfloat16)


@pytest.mark.parametrize("config", CONFIGS + [TINY_CONFIG], ids=str)
@pytest.mark.parametrize("d_in, rank", [(200, 32), (480, 96)])
def test_every_config(config, d_in, rank):
    """Each config on shapes that leave tails in M, N and both K ranges."""
    run_case(70, 100, d_in, rank, True, torch.float32, config=config)


@pytest.mark.parametrize("m", [5, 70])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_outlier_channels_and_zero_block(m, out_dtype):
    run_case(m, 100, 200, 64, True, out_dtype, outliers=True, seed=3)


def test_smallest_scale():
    """Activations near 2**-126 get E8M0 byte 0, which means 2**-127, not zero."""
    x = random_activations(5, 96, seed=8) * 2.0**-128
    a_codes, a_scales = quantize_mxfp4(x)
    assert (a_scales == 0).all()
    w_codes, w_scales = packed_weight(16, 96, 32, seed=8)
    out = serq_mxfp4_gemm(*map(on_device, (a_codes, a_scales, w_codes, w_scales)), 96, 32, None, torch.float32).cpu()
    expected, magnitude = float64_reference(a_codes, a_scales, w_codes, w_scales, 96, 32, None)
    assert (expected != 0).float().mean() > 0.9
    assert_close_to(out, expected, magnitude)


def test_matches_the_custom_op_end_to_end():
    """Kernel on quantize_mxfp4(x) = serq::linear_mxfp4(x) on the same packed weight."""
    m, n, d_in, rank = 5, 100, 200, 32
    x = random_activations(m, d_in, seed=4, outliers=True)
    w_codes, w_scales = packed_weight(n, d_in, rank, seed=4)
    bias = random_bias(n, seed=4)
    a_codes, a_scales = quantize_mxfp4(x)
    out = serq_mxfp4_gemm(*map(on_device, (a_codes, a_scales, w_codes, w_scales)), padded_in_features(d_in), rank,
                          on_device(bias), torch.float32).cpu()
    expected = serq_linear_mxfp4(x, w_codes, w_scales, d_in, rank, "floor", bias=bias)  # CPU: the op's CPU kernels
    _, magnitude = float64_reference(a_codes, a_scales, w_codes, w_scales, padded_in_features(d_in), rank, bias)
    assert_close_to(out, expected, magnitude)


def test_strided_output_leaves_the_rest_untouched():
    """``out`` may be a column slice of a wider buffer (row stride > N)."""
    m, n, d_in, rank = 70, 100, 96, 32
    a_codes, a_scales = quantize_mxfp4(random_activations(m, d_in, seed=5))
    w_codes, w_scales = packed_weight(n, d_in, rank, seed=5)
    buffer = torch.full((m, n + 28), float("nan"), device=DEVICE)
    launch_serq_mxfp4_gemm(*map(on_device, (a_codes, a_scales, w_codes, w_scales)), 96, rank, None,
                           buffer[:, 8 : 8 + n], TINY_CONFIG)
    buffer = buffer.cpu()
    expected, magnitude = float64_reference(a_codes, a_scales, w_codes, w_scales, 96, rank, None)
    assert_close_to(buffer[:, 8 : 8 + n], expected, magnitude)
    assert buffer[:, :8].isnan().all() and buffer[:, 8 + n :].isnan().all()


def test_nan_scale_poisons_only_its_row():
    """An inf in the activations gives E8M0 NaN (255): that row is NaN, the others are not."""
    x = random_activations(5, 64, seed=6)
    x[2, 40] = float("inf")
    a_codes, a_scales = quantize_mxfp4(x)
    w_codes, w_scales = packed_weight(16, 64, 32, seed=6)
    out = serq_mxfp4_gemm(*map(on_device, (a_codes, a_scales, w_codes, w_scales)), 64, 32, None, torch.float32).cpu()
    assert out[2].isnan().all()
    assert not out[[0, 1, 3, 4]].isnan().any()


def test_pick_config():
    assert pick_config(1).block_m <= 16 and pick_config(16).block_m <= 16
    assert pick_config(4096) == GemmConfig(128, 128, 64, 8, 3)
    assert all(c.block_k % 32 == 0 for c in CONFIGS)


def test_bad_inputs_raise():
    a_codes, a_scales = map(on_device, quantize_mxfp4(random_activations(5, 64, seed=7)))
    w_codes, w_scales = map(on_device, packed_weight(16, 64, 32, seed=7))
    ok = dict(in_features_padded=64, rank=32, bias=None, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="rank"):
        serq_mxfp4_gemm(a_codes, a_scales, w_codes, w_scales, **{**ok, "rank": 16})
    with pytest.raises(ValueError, match="w_codes must have shape"):
        serq_mxfp4_gemm(a_codes, a_scales, w_codes, w_scales, **{**ok, "rank": 0})
    with pytest.raises(ValueError, match="a_scales must be a 2-D uint8"):
        serq_mxfp4_gemm(a_codes, a_scales.float(), w_codes, w_scales, **ok)
    with pytest.raises(ValueError, match="bias"):
        serq_mxfp4_gemm(a_codes, a_scales, w_codes, w_scales, **{**ok, "bias": torch.zeros(15, device=DEVICE)})
    with pytest.raises(ValueError, match="out_dtype"):
        serq_mxfp4_gemm(a_codes, a_scales, w_codes, w_scales, **{**ok, "out_dtype": torch.float16})
    with pytest.raises(ValueError, match="out must be"):
        launch_serq_mxfp4_gemm(a_codes, a_scales, w_codes, w_scales, 64, 32, None,
                               torch.empty(5, 15, device=DEVICE))
