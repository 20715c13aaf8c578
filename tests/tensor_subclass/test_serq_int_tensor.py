"""The packed INT SERQ weight (W4A8, W4A4): same numbers as the evaluation mode, one op."""

import io

import pytest
import torch
from torch import nn

from serq_ao.formats import get_format
from serq_ao.quant.gptq import gptq_quantize
from serq_ao.tensor_subclass import SERQIntTensor, SERQMXFP4Tensor, pack_weight
from tests.tensor_subclass.pairs import DTYPES, assert_native_within_bound, make_pair, random_input


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["w4a8", "w4a4"])
@pytest.mark.parametrize("rank, preop, d_in", [(32, True, 200), (0, False, 128), (64, True, 96)])
def test_packed_int_weight_matches_evaluation_mode_bitwise(fmt, rank, preop, d_in, dtype, monkeypatch):
    fake, packed = make_pair(fmt, d_in=d_in, rank=rank, preop=preop, dtype=dtype)
    x = random_input(d_in, dtype)
    with torch.no_grad():
        native, expected = packed(x), fake(x)
        monkeypatch.setenv("SERQ_CPU_KERNEL", "reference")
        got = packed(x)
    # the reference: one arithmetic for both (fp32 pre-op, same matmuls), equal in every model dtype
    assert got.dtype == expected.dtype == dtype and torch.equal(got, expected)
    assert_native_within_bound(native, packed, x)
    weight = packed.weight
    assert isinstance(weight, SERQIntTensor) and weight.rank == rank and weight.dtype == dtype
    assert torch.equal(weight.dequantize(), fake.weight)
    if rank:
        assert torch.equal(weight.correction(), fake.correction)
    groups = -(-d_in // 128)
    assert weight.qdata.shape == (48, groups * 64) and weight.scale.shape == (48, groups)
    assert weight.scale.dtype == torch.float32  # scales never follow the model's dtype


def test_gptq_records_pack_with_their_own_scales():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 256, generator=g)
    x = torch.randn(512, 256, generator=g)
    fmt = get_format("w4a8")
    record = gptq_quantize(weight, x.T @ x, fmt)
    packed = pack_weight(fmt, record, None, input_scale_inv=None, input_perm=None, dtype=torch.float32)
    assert torch.equal(packed.scale, record.scale) and torch.equal(packed.qdata, record.qdata)
    assert torch.equal(packed.dequantize(), record.dequantize())


def test_records_of_another_grid_are_refused():
    weight = torch.randn(16, 64)
    mx = get_format("mxfp4").quantize_weight(weight)
    with pytest.raises(ValueError, match="must be an INT4 record"):
        SERQIntTensor.from_quantized(mx, None, activation_bits=8)
    integer = get_format("w4a8").quantize_weight(weight)
    with pytest.raises(ValueError, match="must be an MXFP4 record"):
        SERQMXFP4Tensor.from_quantized(integer, None)


@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8"])
def test_to_dtype_changes_what_the_packed_linear_returns(fmt):
    _, packed = make_pair(fmt, d_in=128, rank=32, bias=False)
    x = random_input(128, torch.bfloat16)
    with torch.no_grad():
        in_fp32 = packed(x.float())
        packed.to(torch.bfloat16)
        in_bf16 = packed(x)
    assert packed.weight.dtype == torch.bfloat16 and in_fp32.dtype == torch.float32 and in_bf16.dtype == torch.bfloat16
    # codes and float32 scales untouched: the same fp32 arithmetic, rounded at the end
    assert packed.weight.scale.dtype == (torch.uint8 if fmt == "mxfp4" else torch.float32)
    assert torch.equal(in_bf16, in_fp32.to(torch.bfloat16))


def test_int_op_compiles_exports_and_passes_opcheck():
    _, packed = make_pair("w4a4", d_in=200)
    x = torch.randn(2, 5, 200)
    with torch.no_grad():
        eager = packed(x)
        assert torch.allclose(torch.compile(packed, fullgraph=True)(x), eager, rtol=1e-6, atol=1e-6)
    program = torch.export.export(packed, (x,))
    ops = [n for n in program.graph.nodes if n.op == "call_function" and "serq" in str(n.target)]
    assert len(ops) == 1
    w = packed.weight
    torch.library.opcheck(
        torch.ops.serq.linear_int.default,
        (x[0], w.qdata, w.scale, 200, 128, 4, w.correction_qdata, w.correction_scale, w.input_scale_inv, w.input_perm,
         packed.bias.detach()),
    )


@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8"])
def test_state_dict_round_trips_through_torch_load_weights_only(fmt):
    _, packed = make_pair(fmt, d_in=128, rank=32)
    buffer = io.BytesIO()
    torch.save(packed.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert type(state["weight"]) is (SERQMXFP4Tensor if fmt == "mxfp4" else SERQIntTensor)
    fresh = nn.Linear(128, 48)
    fresh.load_state_dict(state, assign=True)
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert torch.equal(fresh(x), packed(x))


@pytest.mark.parametrize("fmt", ["mxfp4", "w4a4"])
def test_dequantizing_in_row_chunks_gives_the_same_output(fmt, monkeypatch, reference_kernels):
    from serq_ao.kernels import reference

    fake, packed = make_pair(fmt, d_in=200, d_out=48, rank=32)
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = packed(x)
        monkeypatch.setattr(reference, "DEQUANTIZE_CHUNK_ELEMENTS", 5 * 232)  # chunks of 5 rows: 10 of them
        chunked, fake_chunked = packed(x), fake(x)
    assert torch.allclose(chunked, whole, rtol=1e-6, atol=1e-6)
    assert torch.equal(chunked, fake_chunked)  # the evaluation mode chunks alike
