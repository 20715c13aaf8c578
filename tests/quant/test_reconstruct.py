"""Each step of the methods against a plain float64 reference of its formula."""

import pytest
import torch

from serq_ao.formats import fake_quantize_int, fake_quantize_mxfp4, get_format
from serq_ao.quant.fake_quant import FakeQuantLinear
from serq_ao.quant.reconstruct import saliency_order, serq_reconstruct, smoothquant_scales

MXFP4 = get_format("mxfp4")


def random_linear(d_out=48, d_in=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.05
    x = torch.randn(20, d_in, generator=g, dtype=torch.float64)
    x[:, torch.randperm(d_in, generator=g)[:8]] *= 30  # a few salient channels
    return weight, x


def q_mx(t):  # the format is tested on its own; here it is part of the formula
    return fake_quantize_mxfp4(t.float()).double()


def reference_serq_output(weight, x, rank):
    """Straight from design.md section 2, in float64."""
    s = x.abs().amax(0)
    pi = torch.sort(s, descending=True, stable=True).indices
    w_hat = (weight * s)[:, pi]
    # X / s is rounded to fp32 exactly as the pre-op does (multiply by fp32 1/s): each
    # channel's max token lands on 1.0 or one ulp below, and the FLOOR block scale jumps by 2
    # between the two, so the reference must take the same side
    x_hat = (x.float() * (1 / s).float()).double()[:, pi]
    r_q = q_mx(w_hat[:, :rank]) if rank else None
    w_res = w_hat.clone()
    if rank:
        w_res[:, :rank] -= r_q
    w_q = q_mx(w_res)
    x_q = q_mx(x_hat)
    y = x_q @ w_q.T
    if rank:
        y = y + x_q[:, :rank] @ r_q.T
    return y, s, pi


@pytest.mark.parametrize("rank", [0, 32, 128, 256])
def test_serq_linear_matches_float64_formula(rank):
    weight, x = random_linear()
    expected, s, pi = reference_serq_output(weight, x, rank)
    got = library_serq_linear(weight, s, pi, rank, MXFP4)(x.float()).double()
    assert (got - expected).abs().max() / expected.abs().max() < 1e-5


def library_serq_linear(weight, s, pi, rank, fmt):
    """The library's own SERQ linear: serq_reconstruct, then the evaluation mode with the pre-op."""
    w_hat = (weight.float() * s.float())[:, pi]
    main, correction = serq_reconstruct(w_hat, rank, fmt)
    return FakeQuantLinear(main, correction, None, quant_format=fmt, input_scale_inv=(1 / s).float(), input_perm=pi)


@pytest.mark.parametrize("fmt", ["mxfp4", "w4a4"])
def test_reconstruction_reduces_the_error_on_salient_channels(fmt):
    weight, x = random_linear(seed=1)
    exact = x @ weight.T
    s = x.abs().amax(0)
    pi = torch.sort(s, descending=True, stable=True).indices
    errors = {}
    for rank in (0, 32, 128):
        y = library_serq_linear(weight, s, pi, rank, get_format(fmt))(x.float()).double()
        errors[rank] = ((y - exact).norm() / exact.norm()).item()
    assert errors[128] < errors[32] < errors[0]


def test_residual_keeps_what_r_missed():
    weight, _ = random_linear(seed=2)
    w = weight.float()
    main, correction = serq_reconstruct(w, 64, MXFP4)
    # R is Q(W[:, :r]); the main weight quantizes W - R there and W elsewhere
    assert torch.equal(correction.dequantize(), fake_quantize_mxfp4(w[:, :64]))
    residual = w.clone()
    residual[:, :64] -= fake_quantize_mxfp4(w[:, :64])
    assert torch.equal(main.dequantize(), fake_quantize_mxfp4(residual))
    # INT: R per output row, main in groups of 128
    main, correction = serq_reconstruct(w, 64, get_format("w4a8"))
    assert torch.equal(correction.dequantize(), fake_quantize_int(w[:, :64], 4, granularity="channel"))
    residual = w.clone()
    residual[:, :64] -= fake_quantize_int(w[:, :64], 4, granularity="channel")
    assert torch.equal(main.dequantize(), fake_quantize_int(residual, 4, granularity=128))


def test_int_activation_path_matches_float64_formula():
    weight, x = random_linear(seed=3)
    w = weight.float()
    main, correction = serq_reconstruct(w, 32, get_format("w4a4"))
    linear = FakeQuantLinear(main, correction, None, quant_format=get_format("w4a4"))
    x_q = fake_quantize_int(x.float(), 4, symmetric=False, granularity=128).double()
    r_q = fake_quantize_int(w[:, :32], 4, granularity="channel").double()
    w_res = w.double().clone()
    w_res[:, :32] -= r_q
    w_q = fake_quantize_int(w_res.float(), 4, granularity=128).double()
    expected = x_q @ w_q.T + x_q[:, :32] @ r_q.T
    assert torch.allclose(linear(x.float()).double(), expected, rtol=1e-5, atol=1e-6)


def test_smoothquant_scales_match_formula():
    g = torch.Generator().manual_seed(4)
    amax = torch.rand(16, generator=g, dtype=torch.float64) * 10
    amax[3] = 0
    weights = [torch.randn(8, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    got = smoothquant_scales(amax.float(), [w.float() for w in weights], 0.5)
    w_max = torch.cat(weights).abs().amax(0)
    expected = amax.sqrt() / w_max.sqrt()
    expected[3] = 1.0
    assert torch.allclose(got.double(), expected, rtol=1e-6)


def test_saliency_order_is_descending_and_stable():
    scales = torch.tensor([1.0, 5.0, 3.0, 5.0, 0.5])
    assert saliency_order(scales).tolist() == [1, 3, 2, 0, 4]


def test_effective_bits():
    assert MXFP4.effective_bits(576, 0) == 4.25
    assert MXFP4.effective_bits(576, 64) == pytest.approx(4.25 * 640 / 576)
    assert get_format("w4a8").effective_bits(256, 0) == pytest.approx(4 + 16 * 2 / 256)
    # R per row: 4 bits per element and one 16-bit scale per row
    assert get_format("w4a4").effective_bits(256, 32) == pytest.approx(4 + 16 * 2 / 256 + (4 * 32 + 16) / 256)


def test_rank_larger_than_d_in_is_rejected():
    with pytest.raises(ValueError, match="rank"):
        serq_reconstruct(torch.randn(4, 32), 64, MXFP4)


def test_lowrank_factors_match_float64_svd():
    from serq_ao.quant.reconstruct import lowrank_error_factors

    weight, x = random_linear(seed=5)
    w = weight.float()
    w_q = fake_quantize_mxfp4(w)
    error = weight - w_q.double()
    a, b = lowrank_error_factors(w, w_q, 8)
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]
    # INT8 factors: close to the best rank-8 approximation, and it removes error
    assert ((a.double() @ b.double() - best).norm() / best.norm()) < 0.02
    assert (error - a.double() @ b.double()).norm() < 0.95 * error.norm()
    # L2QER weighs channels by activation size: it reconstructs the output better on x
    scale = x.abs().mean(0)
    a2, b2 = lowrank_error_factors(w, w_q, 8, scale.float())
    plain = (x @ (error - a.double() @ b.double()).T).norm()
    scaled = (x @ (error - a2.double() @ b2.double()).T).norm()
    assert scaled < plain
