"""Integer quantization against a float64 reference written from the formulas, plus properties.

The reference works one group at a time on Python floats (float64, ``round`` half to even),
so it shares no code with the module: only the documented formulas and scale layout.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from serq_ao.formats.integer import (
    IntQuantized,
    dequantize_int,
    fake_quantize_int,
    pack_int4,
    quantize_int,
    unpack_int4,
)

FP32_TINY = torch.finfo(torch.float32).tiny  # smallest normal fp32


def random_with_outliers(shape, seed, dtype=torch.float32):
    """Normal data, rows of varied magnitude, ~1% outliers x100; never all zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x *= torch.exp(torch.randn(*shape[:-1], 1, generator=g, dtype=torch.float64))
    outliers = torch.rand(shape, generator=g) < 0.01
    return torch.where(outliers, x * 100, x).to(dtype)


def group_size(granularity, shape):
    if granularity == "tensor":
        return math.prod(shape)
    return shape[-1] if granularity in ("channel", "token") else granularity


def per_element(t, granularity, shape):
    """Spread a per-group tensor in the documented layout to one value per element of x."""
    if granularity == "tensor":
        assert t.shape == ()
        return t.expand(shape)
    return t.repeat_interleave(group_size(granularity, shape), dim=-1)[..., : shape[-1]]


def reference(x, bits, symmetric, granularity):
    """float64 (q, scale, zero, ratio = x / scale) from the formulas, one group at a time.

    q and ratio come back with x's shape; scale and zero in the module's layout.
    """
    shape = tuple(x.shape)
    rows = x.double().reshape(1, -1) if granularity == "tensor" else x.double().reshape(-1, shape[-1])
    g = group_size(granularity, shape)
    q_rows, ratio_rows, scales, zeros = [], [], [], []
    for row in rows.tolist():
        q_row, ratio_row, row_scales, row_zeros = [], [], [], []
        for start in range(0, len(row), g):
            group = row[start : start + g]
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                scale = max(abs(v) for v in group) / qmax
                low, high = -qmax - 1, qmax
            else:
                levels = 2**bits - 1
                xmin, xmax = min(min(group), 0.0), max(max(group), 0.0)
                scale = (xmax - xmin) / levels
                low, high = 0, levels
            scale = scale if scale > 0 else 1.0
            zero = 0 if symmetric else round(-xmin / scale)
            ratios = [v / scale for v in group]
            q_row += [min(max(round(r) + zero, low), high) for r in ratios]
            ratio_row += ratios
            row_scales.append(scale)
            row_zeros.append(zero)
        q_rows.append(q_row)
        ratio_rows.append(ratio_row)
        scales.append(row_scales)
        zeros.append(row_zeros)
    lead = () if granularity == "tensor" else shape[:-1]
    layout = lead + ((len(scales[0]),) if granularity != "tensor" else ())
    as_tensor = lambda v, s: torch.tensor(v, dtype=torch.float64).reshape(s)  # noqa: E731
    return (
        as_tensor(q_rows, shape),
        as_tensor(scales, layout),
        as_tensor(zeros, layout),
        as_tensor(ratio_rows, shape),
    )


def near_tie(v):
    """float64 values within 1e-4 of a .5 rounding tie, where fp32 may round the other way."""
    return ((v - torch.floor(v)) - 0.5).abs() < 1e-4


SHAPES = [(8, 256), (2, 3, 200)]  # K = 200: groups of 32, 64 and 128 end in a partial group
GRANULARITIES = ["tensor", "channel", "token", 32, 64, 128]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, bits, symmetric, granularity):
    x = random_with_outliers(shape, seed=hash((shape, bits, symmetric, str(granularity))) % 2**31)
    r = quantize_int(x, bits, symmetric=symmetric, granularity=granularity)
    q_ref, scale_ref, zero_ref, ratio = reference(x, bits, symmetric, granularity)

    assert isinstance(r, IntQuantized)
    assert (r.bits, r.symmetric, r.granularity, r.shape) == (bits, symmetric, granularity, x.shape)
    assert r.q.shape == x.shape and r.q.dtype == (torch.int8 if symmetric else torch.uint8)
    assert r.scale.dtype == torch.float32 and r.scale.shape == scale_ref.shape
    torch.testing.assert_close(r.scale.double(), scale_ref, rtol=1e-6, atol=0)

    if symmetric:
        assert r.zero_point is None
        zero, zero_tie = torch.zeros_like(scale_ref), torch.zeros(scale_ref.shape, dtype=torch.bool)
    else:
        assert r.zero_point.dtype == torch.int32 and r.zero_point.shape == scale_ref.shape
        zero = r.zero_point.double()
        # -xmin / scale, at a tie the zero point may round either way
        zero_tie = near_tie(zero_ref - torch.round(zero_ref) + torch.round(zero_ref))
        zero_tie = near_tie(
            -per_element(scale_ref * 0, granularity, shape)[..., :1].new_zeros(()) + 0
        ) if False else near_tie(_minus_xmin_over_scale(x, scale_ref, granularity, shape))
        assert ((zero - zero_ref).abs() <= zero_tie.double()).all()

    # A code may differ by one where x / scale is at a tie, or its group's zero point is.
    allowed = (near_tie(ratio) | per_element(zero_tie, granularity, shape)).double()
    q = r.q.double()
    assert ((q - q_ref).abs() <= allowed).all()

    centered = q - per_element(zero, granularity, shape)
    centered_ref = q_ref - per_element(zero_ref, granularity, shape)
    scale_el = per_element(scale_ref, granularity, shape)
    deq = dequantize_int(r)
    assert deq.dtype == torch.float32 and deq.shape == x.shape
    deq_ref = centered_ref * scale_el
    tolerance = (centered - centered_ref).abs() * scale_el + 1e-6 * deq_ref.abs()
    assert ((deq.double() - deq_ref).abs() <= tolerance).all()
