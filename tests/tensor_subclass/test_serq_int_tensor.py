"""The packed INT SERQ weight (W4A8, W4A4): same numbers as the evaluation mode, one op."""

import io

import pytest
import torch
from torch import nn

from serq_ao.gptq import gptq_quantize
from serq_ao.packing import pack_weight, packed_linear
from serq_ao.reconstruct import serq_reconstruct
from serq_ao.simulate import FakeQuantLinear
from serq_ao.tensor_subclass import SERQIntTensor, SERQMXFP4Tensor


def make_pair(fmt="w4a8", d_in=200, d_out=48, rank=32, preop=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=g) * 0.1
    weight[:, 3] *= 20  # an outlier column
    main, correction = serq_reconstruct(weight, rank, fmt)
    scale_inv = torch.rand(d_in, generator=g) + 0.5 if preop else None
    perm = torch.randperm(d_in, generator=g) if preop else None
    b = torch.randn(d_out, generator=g) if bias else None
    fake = FakeQuantLinear(main, correction, b, fmt=fmt, input_scale_inv=scale_inv, input_perm=perm)
    packed = packed_linear(pack_weight(main, correction, fmt, input_scale_inv=scale_inv, input_perm=perm), b)
    return fake, packed


@pytest.mark.parametrize("fmt", ["w4a8", "w4a4"])
@pytest.mark.parametrize("rank, preop, d_in", [(32, True, 200), (0, False, 128), (64, True, 96)])
def test_packed_int_weight_matches_evaluation_mode(fmt, rank, preop, d_in):
    fake, packed = make_pair(fmt, d_in=d_in, rank=rank, preop=preop)
    x = torch.randn(3, 5, d_in, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        assert torch.allclose(packed(x), fake(x), rtol=1e-5, atol=1e-5)
    weight = packed.weight
    assert isinstance(weight, SERQIntTensor) and weight.rank == rank
    assert torch.equal(weight.dequantize(), fake.weight)
    if rank:
        assert torch.equal(weight.correction(), fake.correction)
    groups = -(-d_in // 128)
    assert weight.qdata.shape == (48, groups * 64) and weight.scale.shape == (48, groups)


def test_gptq_weights_pack_although_a_group_never_reaches_code_7():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 256, generator=g)
    x = torch.randn(512, 256, generator=g)
    hessian = x.T @ x
    main, column_scale = gptq_quantize(weight, hessian, "w4a8")
    codes = main / column_scale
    assert (codes.abs().unflatten(1, (2, 128)).amax(-1) < 7).any(), "want a group whose largest code is not 7"
    packed = SERQIntTensor.from_dequantized(main, None, activation_bits=8)
    assert torch.allclose(packed.dequantize(), main, rtol=2**-20, atol=0)


@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8"])
def test_weights_off_the_grid_are_refused(fmt):
    weight = torch.randn(16, 64)
    with pytest.raises(ValueError, match="not on"):
        pack_weight(weight, None, fmt)


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
def test_dequantizing_in_row_chunks_gives_the_same_output(fmt, monkeypatch):
    from serq_ao.kernels import ops

    _, packed = make_pair(fmt, d_in=200, d_out=48, rank=32)
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = packed(x)
        monkeypatch.setattr(ops, "DEQUANTIZE_CHUNK_ELEMENTS", 5 * 256)  # chunks of 5 rows: 10 of them
        chunked = packed(x)
    assert torch.allclose(chunked, whole, rtol=1e-6, atol=1e-6)
