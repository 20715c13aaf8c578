import pytest
import torch

from serq_ao.formats import fake_quantize_int, fake_quantize_mxfp4
from serq_ao.gptq import gptq_quantize


def correlated_problem(d_out=64, k=256, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mixing  # correlated channels: where GPTQ helps
    weight = torch.randn(d_out, k, generator=g) * 0.05
    return weight, x


def assert_on_int4_grid(quantized, scale):
    codes = quantized.double() / scale.double()
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= -8 and codes.round().max() <= 7
    # one scale per group of 128 columns
    assert torch.equal(scale, scale[:, ::128].repeat_interleave(128, dim=1)[:, : scale.shape[1]])


def output_error(weight, quantized, x):
    return ((x.double() @ (weight.double() - quantized.double()).T).norm() / (x.double() @ weight.double().T).norm()).item()


@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8"])
def test_gptq_beats_round_to_nearest_and_stays_on_the_grid(fmt):
    weight, x = correlated_problem()
    hessian = x.double().T @ x.double()
    quantized, scale = gptq_quantize(weight, hessian, fmt)
    if fmt == "mxfp4":
        rtn = fake_quantize_mxfp4(weight)
        assert torch.equal(fake_quantize_mxfp4(quantized), quantized)  # representable as MXFP4
    else:
        rtn = fake_quantize_int(weight, 4, granularity=128)
        assert_on_int4_grid(quantized, scale)
    assert output_error(weight, quantized, x) < 0.8 * output_error(weight, rtn, x)


def test_gptq_with_identity_hessian_is_round_to_nearest():
    weight, _ = correlated_problem(seed=1)
    # H = I: no correlations, so no error is worth spreading: GPTQ reduces to RTN (MXFP4:
    # same fixed block scales, same rounding)
    assert torch.equal(gptq_quantize(weight, torch.eye(256), "mxfp4")[0], fake_quantize_mxfp4(weight))


@pytest.mark.parametrize("hessian_kind", ["zero", "rank_deficient", "dead_channels"])
def test_degenerate_hessians_never_crash(hessian_kind):
    weight, x = correlated_problem(seed=2)
    if hessian_kind == "zero":
        hessian = torch.zeros(256, 256)
    elif hessian_kind == "rank_deficient":
        hessian = x[:8].T @ x[:8]
    else:
        x[:, :100] = 0
        hessian = x.T @ x
    quantized, scale = gptq_quantize(weight, hessian, "w4a8")
    assert torch.isfinite(quantized).all()
    assert_on_int4_grid(quantized, scale)
