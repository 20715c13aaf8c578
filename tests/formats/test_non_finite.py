"""Property tests on arbitrary inputs with NaN and inf: a non-finite value poisons exactly its
own block (MXFP4, 32 elements) or group (INT), which dequantizes to NaN, never raises, and
leaves every other block bit-identical to quantizing the finite data alone."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from serq_ao.formats import dequantize_int, dequantize_mxfp4, quantize_int, quantize_mxfp4

BLOCK = 32
any_fp32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
rows = st.integers(1, 3).flatmap(lambda n: st.integers(1, 4).flatmap(
    lambda blocks: arrays("float32", (n, blocks * BLOCK), elements=any_fp32)))


def blockwise(x: torch.Tensor, size: int):
    """(rows, blocks, size) view and a mask (rows, blocks) of blocks holding a non-finite value."""
    blocks = x.reshape(x.shape[0], -1, size)
    return blocks, (~torch.isfinite(blocks)).any(dim=-1)


def check(x: torch.Tensor, y: torch.Tensor, y_clean: torch.Tensor, size: int) -> None:
    _, poisoned = blockwise(x, size)
    out, clean = blockwise(y, size)[0], blockwise(y_clean, size)[0]
    assert torch.isnan(out[poisoned]).all()
    # bit-identical elsewhere (a finite asymmetric group whose range overflows fp32 is NaN in both)
    assert torch.equal(out[~poisoned].view(torch.int32), clean[~poisoned].view(torch.int32))


@settings(max_examples=150, deadline=None)
@given(x=rows, scale_mode=st.sampled_from(["floor", "rceil"]))
def test_mxfp4_non_finite_stays_in_its_block(x, scale_mode):
    x = torch.from_numpy(x)
    codes, scales = quantize_mxfp4(x, scale_mode)
    _, poisoned = blockwise(x, BLOCK)
    assert torch.equal(scales[poisoned], torch.full_like(scales[poisoned], 255))  # E8M0's NaN
    clean = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    check(x, dequantize_mxfp4(codes, scales, k=x.shape[-1]), dequantize_mxfp4(*quantize_mxfp4(clean, scale_mode), k=x.shape[-1]), BLOCK)


@settings(max_examples=150, deadline=None)
@given(x=rows, bits=st.sampled_from([4, 8]), symmetric=st.booleans())
def test_int_non_finite_stays_in_its_group(x, bits, symmetric):
    x = torch.from_numpy(x)
    y = dequantize_int(quantize_int(x, bits, symmetric=symmetric, granularity=BLOCK))
    clean = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    check(x, y, dequantize_int(quantize_int(clean, bits, symmetric=symmetric, granularity=BLOCK)), BLOCK)
