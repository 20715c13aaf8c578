import pytest
import torch

from serq_ao.formats import fake_quantize_int, fake_quantize_mxfp4, get_format
from serq_ao.quant.gptq import gptq_quantize


def correlated_problem(d_out=64, k=256, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mixing  # correlated channels: where GPTQ helps
    weight = torch.randn(d_out, k, generator=g) * 0.05
    return weight, x


def output_error(weight, quantized, x):
    return ((x.double() @ (weight.double() - quantized.double()).T).norm() / (x.double() @ weight.double().T).norm()).item()


def reference_gptq_mxfp4(weight, hessian, damping=0.01, hessian_order=False):
    """GPTQ straight from the paper, column by column in float64, no lazy batching: round a
    column, spread its error over the later columns through the upper Cholesky factor of
    H^-1. MXFP4 block scales are those of the whole weight (frozen before the sweep). With
    ``hessian_order``: the columns swept by decreasing H_jj, each with its own block's scale."""
    k = weight.shape[1]
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True) if hessian_order else torch.arange(k)
    w = weight.double()[:, order].clone()
    h = hessian.double()[order][:, order]
    h = h + damping * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    block_scale = torch.exp2(torch.floor(torch.log2(weight.abs().unflatten(1, (-1, 32)).amax(-1))) - 2)  # OCP FLOOR
    q = torch.zeros_like(w)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    for j in range(w.shape[1]):
        s = block_scale[:, int(order[j]) // 32].double()
        magnitude = (w[:, j].float().double().abs() / s)[:, None]
        # nearest grid point (saturating at 6), a tie to the even code, as E2M1 rounds
        distance = (magnitude - grid).abs()
        nearest = distance == distance.min(dim=1, keepdim=True).values
        preference = nearest.double() * (2.0 - torch.arange(8) % 2)  # even codes first
        code = preference.argmax(1)
        q[:, j] = torch.sign(w[:, j].float().double()) * grid[code] * s
        error = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j:] -= error[:, None] * u[j, j:][None, :]
    stored = torch.empty_like(q)
    stored[:, order] = q
    return stored


@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8"])
def test_gptq_beats_round_to_nearest_and_returns_its_codes(fmt):
    weight, x = correlated_problem()
    hessian = x.double().T @ x.double()
    record = gptq_quantize(weight, hessian, get_format(fmt))
    quantized = record.dequantize()
    if fmt == "mxfp4":
        rtn = fake_quantize_mxfp4(weight)
        assert torch.equal(fake_quantize_mxfp4(quantized), quantized)  # representable as MXFP4
    else:
        rtn = fake_quantize_int(weight, 4, granularity=128)
        assert record.scale.shape == (64, 2) and record.group_size == 128  # one fp32 scale per group
    assert output_error(weight, quantized, x) < 0.8 * output_error(weight, rtn, x)


def test_gptq_matches_a_plain_float64_reference():
    weight, x = correlated_problem(d_out=16, k=128, tokens=512, seed=3)
    hessian = x.double().T @ x.double()
    got = gptq_quantize(weight, hessian, get_format("mxfp4")).dequantize().double()
    expected = reference_gptq_mxfp4(weight, hessian)
    # lazy batch updates reorder float64 sums: a rounding tie may fall the other way, rarely
    assert (got == expected).double().mean() > 0.995
    assert abs(output_error(weight, got, x) - output_error(weight, expected, x)) < 1e-3


def test_gptq_with_identity_hessian_is_round_to_nearest():
    weight, _ = correlated_problem(seed=1)
    # H = I: no correlations, so no error is worth spreading: GPTQ reduces to RTN (MXFP4:
    # same fixed block scales, same rounding)
    record = gptq_quantize(weight, torch.eye(256), get_format("mxfp4"))
    assert torch.equal(record.dequantize(), fake_quantize_mxfp4(weight))
    rtn = get_format("mxfp4").quantize_weight(weight)
    assert torch.equal(record.qdata, rtn.qdata) and torch.equal(record.scale, rtn.scale)


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
    record = gptq_quantize(weight, hessian, get_format("w4a8"))
    assert torch.isfinite(record.dequantize()).all() and torch.isfinite(record.scale).all()


def test_hessian_order_matches_the_float64_reference_and_keeps_each_block_its_scale():
    weight, x = correlated_problem(d_out=16, k=128, tokens=512, seed=4)
    x = x * torch.exp(torch.randn(128, generator=torch.Generator().manual_seed(5)))  # channels of unequal energy
    hessian = x.double().T @ x.double()
    record = gptq_quantize(weight, hessian, get_format("mxfp4"), order="hessian")
    got = record.dequantize().double()
    expected = reference_gptq_mxfp4(weight, hessian, hessian_order=True)
    assert (got == expected).double().mean() > 0.995
    assert abs(output_error(weight, got, x) - output_error(weight, expected, x)) < 1e-3
    assert torch.equal(record.scale, get_format("mxfp4").quantize_weight(weight).scale)  # frozen, stored layout
    in_columns_order = reference_gptq_mxfp4(weight, hessian)
    assert not torch.equal(expected, in_columns_order)  # the order matters on this problem


def test_hessian_order_is_the_columns_order_when_the_diagonal_already_decreases():
    weight, x = correlated_problem(d_out=16, k=128, tokens=512, seed=6)
    hessian = x.double().T @ x.double()
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    weight, hessian = weight[:, order], hessian[order][:, order]
    for fmt in ("mxfp4", "w4a8"):
        by_columns = gptq_quantize(weight, hessian, get_format(fmt))
        by_hessian = gptq_quantize(weight, hessian, get_format(fmt), order="hessian")
        if fmt == "mxfp4":
            assert torch.equal(by_columns.qdata, by_hessian.qdata) and torch.equal(by_columns.scale, by_hessian.scale)
        else:  # INT4: the static groups' scales come from the weight before the sweep
            fmt_obj = get_format(fmt)
            static = torch.stack([fmt_obj.gptq_group_scale(weight.double()[:, g:g + 128]) for g in (0,)], dim=1)
            assert torch.equal(by_hessian.scale, static)


def test_gptq_order_is_checked_with_the_option_named():
    from serq_ao.quant.config import SERQConfig

    with pytest.raises(ValueError, match="gptq_order must be one of"):
        gptq_quantize(torch.randn(4, 32), torch.eye(32), get_format("mxfp4"), order="random")
    with pytest.raises(ValueError, match="applies with gptq=True only"):
        SERQConfig(gptq_order="hessian")
    assert SERQConfig.from_dict(SERQConfig(gptq=True, gptq_order="hessian").to_dict()).gptq_order == "hessian"


def test_cli_gptq_order(tiny_model_dir, tmp_path, capsys):
    import json

    from serq_ao.cli.main import main

    argv = ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "q"), "--rank", "32", "--calib-samples", "2",
            "--calib-seqlen", "32", "--no-diagnostics", "--quiet", "--gptq", "--gptq-order", "hessian",
            "--rotation", "32"]
    assert main(argv) == 0
    config = json.loads((tmp_path / "q" / "serq_report.json").read_text())["report"]["config"]
    assert config["gptq_order"] == "hessian" and config["rotation"] == 32 and config["gptq"] is True
    capsys.readouterr()
    assert main(["quantize", str(tiny_model_dir), "-o", str(tmp_path / "r"), "--recipe", "paper", "--gptq-order",
                 "hessian", "--quiet"]) == 2
    assert "--gptq-order applies with GPTQ only (--gptq, or serq's --recipe rotated-gptq)" in capsys.readouterr().err
