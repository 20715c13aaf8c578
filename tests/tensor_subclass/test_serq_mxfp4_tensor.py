"""The packed MXFP4 SERQ weight: same numbers as the evaluation mode, one op under compile and export."""

import pytest
import torch
from torch import nn

from serq_ao.reconstruct import serq_reconstruct
from serq_ao.simulate import FakeQuantLinear
from serq_ao.tensor_subclass import SERQMXFP4Tensor


def make_pair(d_in=96, d_out=40, rank=32, preop=True, bias=True, seed=0):
    """A FakeQuantLinear and the nn.Linear holding the same weights packed."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=g) * 0.1
    main, correction = serq_reconstruct(weight, rank, "mxfp4")
    scale_inv = torch.rand(d_in, generator=g) + 0.5 if preop else None
    perm = torch.randperm(d_in, generator=g) if preop else None
    b = torch.randn(d_out, generator=g) if bias else None
    fake = FakeQuantLinear(main, correction, b, fmt="mxfp4", input_scale_inv=scale_inv, input_perm=perm)
    packed = nn.Linear(d_in, d_out, bias=bias)
    packed.weight = nn.Parameter(
        SERQMXFP4Tensor.from_dequantized(main, correction, input_scale_inv=scale_inv, input_perm=perm), requires_grad=False
    )
    if bias:
        packed.bias = nn.Parameter(b.clone(), requires_grad=False)
    return fake, packed


@pytest.mark.parametrize("rank, preop, d_in", [(32, True, 96), (0, False, 64), (64, True, 100)])
def test_packed_weight_matches_evaluation_mode(rank, preop, d_in):
    fake, packed = make_pair(d_in=d_in, rank=rank, preop=preop)
    x = torch.randn(3, 7, d_in, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(packed(x), fake(x), rtol=1e-6, atol=1e-6)
    weight = packed.weight
    assert torch.equal(weight.dequantize(), fake.weight)
    assert weight.qdata.dtype == torch.uint8 and weight.scale.dtype == torch.uint8
    # 4.25 bits per element of [W^q | R]
    stored_bits = 8 * (weight.qdata.numel() + weight.scale.numel())
    assert stored_bits == 4.25 * 40 * (-(-d_in // 32) * 32 + rank)


def test_compiles_without_graph_breaks_and_exports_as_one_op():
    _, packed = make_pair()
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        eager = packed(x)
        compiled = torch.compile(packed, fullgraph=True, backend="aot_eager")(x)
    assert torch.allclose(compiled, eager, rtol=1e-6, atol=1e-6)
    program = torch.export.export(packed, (x,))
    ops = [n for n in program.graph.nodes if n.op == "call_function" and "serq" in str(n.target)]
    assert len(ops) == 1
    assert torch.allclose(program.module()(x), eager, rtol=1e-6, atol=1e-6)


def test_inductor_compiles_it_on_cpu():
    _, packed = make_pair(seed=3)
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        assert torch.allclose(torch.compile(packed, fullgraph=True)(x), packed(x), rtol=1e-6, atol=1e-6)


def test_custom_op_passes_opcheck():
    _, packed = make_pair()
    w = packed.weight
    x = torch.randn(4, 96)
    torch.library.opcheck(
        torch.ops.serq.linear_mxfp4.default,
        (x, w.qdata, w.scale, 96, 32, "floor", w.input_scale_inv, w.input_perm, packed.bias.detach()),
    )
