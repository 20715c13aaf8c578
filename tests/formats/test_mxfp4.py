"""MXFP4 against torchao's independent ``to_mx``, a float64 reference, and the edge cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serq_ao.formats import (
    dequantize_mxfp4,
    e8m0_to_float32,
    fake_quantize_mxfp4,
    quantize_mxfp4,
    unpack_uint4,
)

# Imported after serq_ao so that torchao's CPU-only load warnings are silenced.
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.mx_tensor import to_mx  # noqa: E402

TORCHAO_MODE = {"floor": ScaleCalculationMode.FLOOR, "rceil": ScaleCalculationMode.RCEIL}
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def random_with_outliers(shape, dtype, seed):
    """Normal data of varied block magnitude plus a few large outliers (never all zeros)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x *= torch.exp(torch.randn(*shape[:-1], 1, generator=g) * 2)  # per-row magnitude spread
    outliers = torch.rand(shape, generator=g) < 0.01
    x = torch.where(outliers, x * 100, x)
    return x.to(dtype)


def reference_fake_quantize(x: torch.Tensor, scale_mode: str) -> torch.Tensor:
    """Float64, block by block, straight from the definitions (finite, non-tiny input)."""
    x = x.double()
    k = x.shape[-1]
    pad = (-k) % 32
    blocks = torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, 32))
    amax = blocks.abs().amax(-1, keepdim=True)
    if scale_mode == "floor":
        exponent = torch.floor(torch.log2(amax)) - 2
    else:
        exponent = torch.ceil(torch.log2((amax.float() / 6).double()))
    exponent = torch.where(amax == 0, torch.full_like(amax, -127), exponent).clamp(-127, 127)
    scale = torch.exp2(exponent)
    v = (blocks / scale).abs()
    # nearest grid point; ties to the even code (the lower index among equals is not enough)
    dist = (v.unsqueeze(-1) - E2M1).abs()
    best = dist.min(-1, keepdim=True).values
    candidates = (dist == best) * 1.0
    even_tie = candidates * (torch.arange(8) % 2 == 0)
    index = torch.where(even_tie.sum(-1) > 0, even_tie.argmax(-1), candidates.argmax(-1))
    q = E2M1[index] * torch.sign(blocks) * scale
    return q.flatten(-2)[..., :k]


@pytest.mark.parametrize("scale_mode", ["floor", "rceil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256), (3, 5, 96), (1, 32)])
def test_bit_exact_with_torchao(scale_mode, dtype, shape):
    x = random_with_outliers(shape, dtype, seed=hash((scale_mode, str(dtype), shape)) % 2**31)
    codes, scales = quantize_mxfp4(x, scale_mode)
    ref_scales, ref_codes = to_mx(x.contiguous(), torch.float4_e2m1fn_x2, 32, TORCHAO_MODE[scale_mode])
    assert torch.equal(scales, ref_scales.view(torch.uint8))
    assert torch.equal(codes, ref_codes.view(torch.uint8))


@pytest.mark.parametrize("scale_mode", ["floor", "rceil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_float64_reference(scale_mode, dtype):
    x = random_with_outliers((16, 200), dtype, seed=7)  # K = 200: a padded last block
    got = fake_quantize_mxfp4(x, scale_mode)
    assert got.dtype == dtype and got.shape == x.shape
    expected = reference_fake_quantize(x, scale_mode)
    assert torch.equal(got.double(), expected.to(dtype).double())


def test_fp16_matches_fp32_of_same_values():
    x = random_with_outliers((8, 128), torch.float16, seed=3)
    for mode in ("floor", "rceil"):
        assert all(torch.equal(a, b) for a, b in zip(quantize_mxfp4(x, mode), quantize_mxfp4(x.float(), mode)))


def test_layout_nibble_order_and_scale_byte():
    x = torch.zeros(32)
    x[0], x[1], x[2] = 1.0, -6.0, 0.5  # amax 6: floor(log2 6) - 2 = 0 -> scale byte 127
    codes, scales = quantize_mxfp4(x)
    assert scales.tolist() == [127]
    assert codes[0].item() == (0b1111 << 4) | 0b0010  # element 0 low nibble (1.0), 1 high (-6)
    assert codes[1].item() == 0b0001  # 0.5


def test_ties_round_to_even_and_saturate():
    # block amax 4 -> floor rule gives e = 0: values are E2M1 units directly
    v = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 4.0, -0.25, 0.2, 0.3])
    x = torch.zeros(32)
    x[: v.numel()] = v
    out = fake_quantize_mxfp4(x)[: v.numel()]
    assert out.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, 0.0, 0.5]
    # floor rule clips: amax 7.5 -> e = 0, 7.5 saturates to 6; rceil scales to fit instead
    x[0] = 7.5
    assert fake_quantize_mxfp4(x)[0].item() == 6.0
    assert fake_quantize_mxfp4(x, "rceil")[0].item() == 8.0  # e = 1: 7.5 / 2 = 3.75 -> 4 -> 8


def test_all_zero_block_and_negative_zero():
    x = torch.zeros(2, 64)
    x[1, 0] = -0.0
    x[1, 40] = 3.0
    codes, scales = quantize_mxfp4(x)
    assert scales[0].tolist() == [0, 0]
    assert scales[1, 0].item() == 0
    assert torch.equal(dequantize_mxfp4(codes, scales), x)
    assert unpack_uint4(codes)[1, 0].item() == 0b1000  # the sign of -0.0 survives
    assert not torch.isnan(dequantize_mxfp4(codes, scales)).any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_block_becomes_nan_block(bad):
    x = torch.randn(2, 64)
    x[0, 33] = bad
    codes, scales = quantize_mxfp4(x)
    assert scales[0, 1].item() == 255
    out = dequantize_mxfp4(codes, scales)
    assert torch.isnan(out[0, 32:]).all()
    # the other blocks are untouched
    assert torch.equal(out[1], fake_quantize_mxfp4(x[1:])[0])
    assert torch.equal(out[0, :32], fake_quantize_mxfp4(x[:1, :32])[0])


def test_e8m0_range_ends():
    # huge: fp32 max -> floor(log2) = 127 -> e = 125; rceil e = ceil(log2(max/6)) = 126
    big = torch.full((32,), torch.finfo(torch.float32).max)
    assert quantize_mxfp4(big)[1].item() == 125 + 127
    assert quantize_mxfp4(big, "rceil")[1].item() == 126 + 127
    assert torch.isfinite(fake_quantize_mxfp4(big)).all()
    # rceil: max / 2**126 = 3.99999... rounds to 4, and 4 * 2**126 = 2**128 exceeds fp32:
    # exact in fp64, inf in fp32 (documented)
    codes, scales = quantize_mxfp4(big, "rceil")
    assert dequantize_mxfp4(codes, scales, dtype=torch.float64)[0].item() == 2.0**128
    assert dequantize_mxfp4(codes, scales)[0].item() == float("inf")
    # tiny: subnormal inputs clamp the scale to 2**-127 and still round correctly
    tiny = torch.full((32,), 2.0**-127)
    for mode in ("floor", "rceil"):
        codes, scales = quantize_mxfp4(tiny, mode)
        assert scales.item() == 0
        assert torch.equal(dequantize_mxfp4(codes, scales), tiny)  # 2**-127 = 1.0 * 2**-127
    # rceil keeps amax <= 6 * 2**e down in the subnormals: amax = 7 * 2**-127 needs e = -126
    just_above = torch.zeros(32)
    just_above[0] = 7 * 2.0**-127
    assert quantize_mxfp4(just_above, "rceil")[1].item() == 1
    assert quantize_mxfp4(just_above, "floor")[1].item() == 0
    assert e8m0_to_float32(torch.tensor([0, 127, 254, 255], dtype=torch.uint8)).tolist()[:3] == [
        2.0**-127,
        1.0,
        2.0**127,
    ]


@pytest.mark.parametrize("k", [1, 31, 33, 100])
def test_k_not_multiple_of_32_is_padded(k):
    x = random_with_outliers((4, k), torch.float32, seed=k)
    codes, scales = quantize_mxfp4(x)
    assert scales.shape == (4, math.ceil(k / 32)) and codes.shape == (4, 16 * math.ceil(k / 32))
    padded = torch.nn.functional.pad(x, (0, (-k) % 32))
    assert torch.equal(fake_quantize_mxfp4(x), fake_quantize_mxfp4(padded)[:, :k])
    assert dequantize_mxfp4(codes, scales).shape == (4, padded.shape[-1])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="scale_mode"):
        quantize_mxfp4(torch.randn(32), "ceil")
    with pytest.raises(ValueError, match="x must be"):
        quantize_mxfp4(torch.arange(32))
    with pytest.raises(ValueError, match="last dimension"):
        quantize_mxfp4(torch.tensor(1.0))
    codes, scales = quantize_mxfp4(torch.randn(64))
    with pytest.raises(ValueError, match="k must be"):
        dequantize_mxfp4(codes, scales, k=65)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_mxfp4(codes.int(), scales)


finite_rows = st.lists(
    st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32),
    min_size=1,
    max_size=96,
)


@settings(max_examples=200, deadline=None)
@given(row=finite_rows, scale_mode=st.sampled_from(["floor", "rceil"]))
def test_round_trip_error_bound_and_idempotence(row, scale_mode):
    x = torch.tensor(row, dtype=torch.float32)
    codes, scales = quantize_mxfp4(x, scale_mode)
    out = dequantize_mxfp4(codes, scales, k=x.numel())
    assert torch.equal(out, fake_quantize_mxfp4(x, scale_mode))
    # every element is within half a grid step: |err| <= scale/4 * max(1, |x|/scale)
    scale = e8m0_to_float32(scales).repeat_interleave(32)[: x.numel()].double()
    v = x.double() / scale
    err = (out.double() - x.double()).abs() / scale
    assert (err <= 0.25 * torch.clamp(v.abs(), min=1.0) + 1e-12).all()
    if scale_mode == "rceil":  # rceil never clips
        assert (err <= 0.25 * torch.clamp(v.abs(), min=1.0).clamp(max=4.0) + 1e-12).all()
    # values already on the grid stay put
    assert torch.equal(fake_quantize_mxfp4(out, scale_mode), out)


def test_compiles_without_graph_breaks():
    x = random_with_outliers((8, 96), torch.float32, seed=11)
    compiled = torch.compile(fake_quantize_mxfp4, fullgraph=True, backend="aot_eager")
    for mode in ("floor", "rceil"):
        assert torch.equal(compiled(x, mode), fake_quantize_mxfp4(x, mode))


@pytest.mark.parametrize("scale_mode", ["floor", "rceil"])
def test_gptq_rounding_with_frozen_block_scales_equals_fake_quantization(scale_mode):
    """MXFP4's GPTQ step: with the block scales frozen from the same weight, rounding column
    by column gives the codes and values of plain quantization."""
    from serq_ao.formats import get_format

    fmt = get_format("mxfp4", scale_mode)
    x = random_with_outliers((8, 96), torch.float32, seed=12)
    scales = fmt.gptq_frozen_scales(x)  # (8, 3)
    codes, values = zip(*(fmt.gptq_round(x[:, j].double(), scales[:, j // 32]) for j in range(96)))
    values = torch.stack(values, dim=1)
    assert torch.equal(values.float(), fake_quantize_mxfp4(x, scale_mode))
    record = fmt.gptq_record(torch.stack(codes, dim=1), scales, 96)
    expected = fmt.quantize_weight(x)
    assert torch.equal(record.qdata, expected.qdata) and torch.equal(record.scale, expected.scale)
