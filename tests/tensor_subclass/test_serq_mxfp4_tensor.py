"""The packed MXFP4 SERQ weight: same numbers as the evaluation mode, one op under compile and export."""

import pytest
import torch

from tests.tensor_subclass.pairs import DTYPES, assert_native_within_bound, make_pair as make_any_pair, random_input


def make_pair(d_in=96, d_out=40, rank=32, preop=True, bias=True, seed=0, dtype=torch.float32, scale_mode="floor"):
    return make_any_pair("mxfp4", d_in=d_in, d_out=d_out, rank=rank, preop=preop, bias=bias, seed=seed, dtype=dtype,
                         scale_mode=scale_mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_mode", ["floor", "rceil"])
@pytest.mark.parametrize("rank, preop, d_in", [(32, True, 96), (0, False, 64), (64, True, 100)])
def test_packed_weight_matches_evaluation_mode_bitwise(rank, preop, d_in, dtype, scale_mode, monkeypatch):
    fake, packed = make_pair(d_in=d_in, rank=rank, preop=preop, dtype=dtype, scale_mode=scale_mode)
    x = random_input(d_in, dtype)
    with torch.no_grad():
        native, expected = packed(x), fake(x)
        monkeypatch.setenv("SERQ_CPU_KERNEL", "reference")
        got = packed(x)
    assert got.dtype == expected.dtype == dtype and torch.equal(got, expected)
    assert_native_within_bound(native, packed, x)
    weight = packed.weight
    assert weight.dtype == dtype
    assert torch.equal(weight.dequantize(), fake.weight)
    assert weight.qdata.dtype == torch.uint8 and weight.scale.dtype == torch.uint8
    # 4.25 bits per element of [W^q | R]
    stored_bits = 8 * (weight.qdata.numel() + weight.scale.numel())
    assert stored_bits == 4.25 * 40 * (-(-d_in // 32) * 32 + rank)


def test_a_bf16_product_in_the_pre_op_would_be_caught():
    """The bug this replaces: a pre-op in bf16 puts flattened maxima on either side of 1.0,
    where the FLOOR block scale jumps. The fp32 reference and a bf16 pre-op must differ here,
    so that the bitwise test above can fail."""
    from serq_ao.formats import fake_quantize_mxfp4
    from serq_ao.kernels.reference import apply_pre_op

    g = torch.Generator().manual_seed(4)
    s = torch.rand(64, generator=g) * 10 + 0.1
    x = (torch.randn(8, 64, generator=g) * s).to(torch.bfloat16)
    x[0] = s.to(torch.bfloat16)  # each channel's maximum: flattened to ~1.0
    fp32 = fake_quantize_mxfp4(apply_pre_op(x, 1 / s, None))
    bf16 = fake_quantize_mxfp4((x * (1 / s).to(torch.bfloat16)).float())
    assert not torch.equal(fp32, bf16)


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
