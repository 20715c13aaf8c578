"""Slices, views and copies of both packed weight classes, each against the same op on the
dequantized weight (serq_ao/tensor_subclass/views.py)."""

import pytest
import torch
import torch.nn.functional as F

from serq_ao.tensor_subclass import PACKED_TENSOR_CLASSES
from tests.tensor_subclass.pairs import make_pair, random_input

# (format, d_in, rank): d_in 100 pads the last MX block, 200 the last INT group
CASES = [("mxfp4", 96, 32), ("mxfp4", 100, 64), ("w4a8", 200, 32), ("w4a4", 256, 64)]
DTYPES = [torch.float32, torch.bfloat16]


def packed_weight(fmt, d_in, rank, *, preop=True, dtype=torch.float32, seed=0, d_out=40):
    _, linear = make_pair(fmt, d_in=d_in, d_out=d_out, rank=rank, preop=preop, bias=False, seed=seed, dtype=dtype)
    weight = linear.weight.detach()
    assert isinstance(weight, PACKED_TENSOR_CLASSES)
    return weight


def unit(fmt) -> int:
    return 32 if fmt == "mxfp4" else 128


def close(got, expected, magnitude):
    """Equal up to fp32 accumulation in another order, relative to sum |a w|."""
    return bool(((got.float() - expected.float()).abs() <= 1e-5 * magnitude + 1e-6).all())


@pytest.mark.parametrize("fmt, d_in, rank", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_slices_are_aliasing_views_of_the_rows(fmt, d_in, rank, dtype):
    weight = packed_weight(fmt, d_in, rank, dtype=dtype)
    x = random_input(d_in, dtype)
    full = F.linear(x, weight)
    for start, end, shard in ((5, 17, weight[5:17]), (5, 17, weight.narrow(0, 5, 12)), (28, 40, weight[-12:]),
                              (30, 40, weight[30:100])):
        assert type(shard) is type(weight) and shard.shape == (end - start, d_in) and shard.dtype == dtype
        assert torch.equal(shard.dequantize(), weight.dequantize()[start:end])
        assert shard.qdata.data_ptr() == weight.qdata[start:].data_ptr()  # a view: loaders copy_ into it
        out = F.linear(x, shard)
        assert out.dtype == dtype and close(out, full[..., start:end], full.float().abs().max())


@pytest.mark.parametrize("fmt, d_in, rank", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_column_shards_carry_their_part_of_r_and_sum_to_the_linear(fmt, d_in, rank, dtype):
    weight = packed_weight(fmt, d_in, rank, preop=False, dtype=dtype)
    x = random_input(d_in, dtype)
    full = F.linear(x, weight)
    cuts = [c for c in range(0, d_in, unit(fmt))] + [d_in]
    for bounds in (cuts, [0, cuts[1], d_in], [0, d_in]):
        total = torch.zeros_like(full, dtype=torch.float32)
        rounding = full.float().abs()  # each output in the model's dtype is rounded once: the bound adds them up
        for start, end in zip(bounds, bounds[1:]):
            shard = weight[:, start:end]
            assert shard.shape == (weight.shape[0], end - start)
            assert torch.equal(shard.dequantize(), weight.dequantize()[:, start:end])
            kept = max(0, min(end, rank) - start)
            assert shard.rank == kept
            if kept:
                assert torch.equal(shard.correction(), weight.correction()[:, start:start + kept])
            else:
                assert shard.correction() is None
            part = F.linear(x[..., start:end], shard).float()
            total += part
            rounding += part.abs()
        ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps  # one rounding to dtype: half of eps
        bound = ulp * rounding + 1e-5 * full.float().abs().max() * len(bounds) + 1e-6
        assert bool(((total - full.float()).abs() <= bound).all()), bounds


@pytest.mark.parametrize("fmt, d_in, rank", CASES[:3])
def test_column_slices_refused_where_they_cannot_be_exact(fmt, d_in, rank):
    gathered = packed_weight(fmt, d_in, rank, preop=True)
    with pytest.raises(ValueError, match="input_perm"):
        gathered[:, : unit(fmt)]
    plain = packed_weight(fmt, d_in, rank, preop=False)
    with pytest.raises(ValueError, match=rf"boundaries \(multiples of {unit(fmt)}"):
        plain[:, 16:]
    with pytest.raises(ValueError, match="empty column slice"):
        plain[:, unit(fmt):unit(fmt)]
    with pytest.raises(ValueError, match="step 1"):
        plain[::2]


@pytest.mark.parametrize("fmt, d_in, rank", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_gives_the_dequantized_row(fmt, d_in, rank, dtype):
    weight = packed_weight(fmt, d_in, rank, dtype=dtype)
    expected = weight.dequantize().to(dtype)
    for index in (0, 7, -1):
        row = weight[index]
        assert type(row) is torch.Tensor and row.dtype == dtype
        assert torch.equal(row, expected[index]) and torch.equal(weight.select(0, index), expected[index])
    with pytest.raises(IndexError):
        weight[weight.shape[0]]
    with pytest.raises(ValueError, match="rows"):
        weight.select(1, 0)


@pytest.mark.parametrize("fmt, d_in, rank", CASES)
def test_cat_along_rows_merges_projections_of_one_group(fmt, d_in, rank):
    weight = packed_weight(fmt, d_in, rank)
    merged = torch.cat([weight[:13], weight[13:30], weight[30:]])
    assert type(merged) is type(weight) and merged.shape == weight.shape
    assert torch.equal(merged.dequantize(), weight.dequantize())
    x = random_input(d_in, torch.float32)
    assert torch.equal(F.linear(x, merged), F.linear(x, weight))
    other = packed_weight(fmt, d_in, rank, seed=5)  # another random pre-op
    with pytest.raises(ValueError, match="pre-ops must agree"):
        torch.cat([weight, other])
    with pytest.raises(ValueError, match="along rows"):
        torch.cat([weight, weight], dim=1)


def test_cat_refuses_mixed_attributes():
    mxfp4 = packed_weight("mxfp4", 96, 32, preop=False)
    with pytest.raises(ValueError, match="rank differ"):
        torch.cat([mxfp4, packed_weight("mxfp4", 96, 64, preop=False)])
    with pytest.raises(TypeError, match="cannot concatenate"):
        torch.cat([packed_weight("w4a8", 128, 32, preop=False), mxfp4[:, :96]])


@pytest.mark.parametrize("fmt, d_in, rank", CASES[:3])
def test_view_to_its_own_shape_and_no_transpose(fmt, d_in, rank):
    weight = packed_weight(fmt, d_in, rank)
    for shape in (weight.shape, (-1, d_in), (weight.shape[0], -1)):
        view = weight.view(*shape)
        assert view.shape == weight.shape and torch.equal(view.dequantize(), weight.dequantize())
    with pytest.raises(ValueError, match="own shape"):
        weight.view(-1)
    with pytest.raises(NotImplementedError, match="no transposed layout"):
        weight.t()
    with pytest.raises(NotImplementedError, match="no transposed layout"):
        weight.transpose(0, 1)


@pytest.mark.parametrize("fmt, d_in, rank", CASES[:3])
def test_empty_like_and_meta_initialisation(fmt, d_in, rank):
    weight = packed_weight(fmt, d_in, rank, dtype=torch.bfloat16)
    fields = [n for n in type(weight).tensor_data_names + type(weight).optional_tensor_data_names]
    for empty, device in ((torch.empty_like(weight), "cpu"), (torch.empty_like(weight, device="meta"), "meta"),
                          (weight.to("meta"), "meta")):
        assert type(empty) is type(weight) and empty.shape == weight.shape and empty.dtype == weight.dtype
        for name in fields:
            mine, theirs = getattr(empty, name), getattr(weight, name)
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert mine.shape == theirs.shape and mine.dtype == theirs.dtype and mine.device.type == device


@pytest.mark.parametrize("fmt, d_in, rank", CASES[:3])
def test_to_dtype_and_device(fmt, d_in, rank):
    weight = packed_weight(fmt, d_in, rank)
    half = weight.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half.qdata, weight.qdata)
    x = random_input(d_in, torch.bfloat16)
    assert F.linear(x, half).dtype == torch.bfloat16
    same = weight.to("cpu")
    assert torch.equal(same.dequantize(), weight.dequantize())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs an accelerator")
@pytest.mark.parametrize("fmt, d_in, rank", CASES[:3])
def test_pin_memory(fmt, d_in, rank):
    weight = packed_weight(fmt, d_in, rank)
    assert not weight.is_pinned()
    pinned = weight.pin_memory()
    assert pinned.is_pinned() and torch.equal(pinned.dequantize(), weight.dequantize())
