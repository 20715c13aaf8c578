"""INT4 weight scales chosen by error (``weight_scales="search"`` on the INT formats): against
a float64 reference written from the definition, never worse than the rule per group, the
rule kept on a tie, special groups as the rule treats them, and the same search in GPTQ and
in packed, saved and reloaded models."""

import json

import pytest
import torch

import serq_ao
from serq_ao.formats import dequantize_int, get_format, quantize_int, quantize_int_by_error
from serq_ao.formats.integer import SCALE_SHRINKS, symmetric_scales_by_error
from serq_ao.quant.config import SERQConfig
from serq_ao.quant.gptq import gptq_quantize
from tests.conftest import make_tiny_llama
from tests.formats.test_integer import random_with_outliers

CALIBRATION = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))


def reference_by_error(x: torch.Tensor, group: int, bits: int = 4) -> torch.Tensor:
    """Float64, one group at a time: each candidate float32 scale fl(fl(amax * f) / qmax) for
    f in 1, 0.98, ..., 0.5, the codes clamp(round(x / scale)) on it, their float32 values
    code * scale, and the values of the candidate with the least squared error (the first,
    largest scale on a tie). K a multiple of ``group``, groups finite and not all zero."""
    qmax = 2 ** (bits - 1) - 1
    x32 = x.float()
    out = torch.empty(x.shape, dtype=torch.float64)
    for row in range(x.shape[0]):
        for start in range(0, x.shape[1], group):
            values = x32[row, start:start + group]
            amax = values.abs().max()
            best = None
            for k in range(26):
                scale = (amax * (1 - k / 50)) / qmax  # float32, as stored
                # x / scale divided in float32 as the module documents, then rounded half to even
                codes = torch.clamp(torch.round((values / scale).double()), -qmax - 1, qmax)
                dequantized = (codes * scale.double()).float().double()  # dequantized in float32, as stored
                error = float(((dequantized - values.double()) ** 2).sum())
                if best is None or error < best[0]:
                    best = (error, dequantized)
            out[row, start:start + group] = best[1]
    return out


def group_errors(x: torch.Tensor, y: torch.Tensor, group: int) -> torch.Tensor:
    return (y.double() - x.float().double()).square().unflatten(-1, (-1, group)).sum(-1)


def test_the_candidates_run_from_the_rule_down_to_half():
    assert SCALE_SHRINKS[0] == 1.0 and SCALE_SHRINKS[-1] == 0.5 and len(SCALE_SHRINKS) == 26
    assert all(a > b for a, b in zip(SCALE_SHRINKS, SCALE_SHRINKS[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 128])
def test_matches_the_float64_reference_and_never_loses_to_the_rule(dtype, group):
    x = random_with_outliers((24, 256), seed=group, dtype=dtype)
    searched = quantize_int_by_error(x, 4, granularity=group)
    assert searched.q.dtype == torch.int8 and searched.scale.shape == (24, 256 // group)
    got = dequantize_int(searched, torch.float64)
    assert torch.equal(got, reference_by_error(x, group))
    rule = dequantize_int(quantize_int(x, 4, symmetric=True, granularity=group), torch.float64)
    assert (group_errors(x, got, group) <= group_errors(x, rule, group)).all()
    rule_scale = quantize_int(x, 4, symmetric=True, granularity=group).scale
    shrunk = searched.scale < rule_scale
    assert shrunk.any() and (searched.scale <= rule_scale).all()  # only ever the max or a clip of it


def test_searching_a_few_rows_at_a_time_changes_nothing(monkeypatch):
    import serq_ao.formats.integer as integer

    x = random_with_outliers((41, 384), seed=4)  # 123 groups: 61 chunks of 2 and one of 1
    whole = quantize_int_by_error(x, 4, granularity=128)
    monkeypatch.setattr(integer, "_SEARCH_CHUNK_ELEMENTS", 300)  # 2 groups of 128 per chunk
    chunked = quantize_int_by_error(x, 4, granularity=128)
    assert torch.equal(chunked.scale, whole.scale) and torch.equal(chunked.q, whole.q)


def test_a_group_the_rule_reconstructs_exactly_keeps_the_rule():
    # codes -7..7 times one scale: the rule is exact, every smaller scale has an error
    row = torch.arange(-7, 8, dtype=torch.float32).repeat(3)[:32] * 0.37
    x = torch.stack([row, row.flip(0)])
    searched = quantize_int_by_error(x, 4, granularity=32)
    assert torch.equal(searched.scale, quantize_int(x, 4, symmetric=True, granularity=32).scale)


def test_partial_groups_and_special_groups_as_with_the_rule():
    x = random_with_outliers((4, 80), seed=3)  # groups of 32: the last one holds 16
    x[0, :32] = 0.0
    x[1, 32:64] = float("nan")
    x[2, 64:] = float("inf")
    searched = quantize_int_by_error(x, 4, granularity=32)
    rule = quantize_int(x, 4, symmetric=True, granularity=32)
    assert searched.scale[0, 0] == 1 and (searched.q[0, :32] == 0).all()
    assert torch.isnan(searched.scale[1, 1]) and torch.isnan(searched.scale[2, 2])
    back = dequantize_int(searched)
    assert torch.isnan(back[1, 32:64]).all() and torch.isnan(back[2, 64:]).all()
    finite = torch.isfinite(searched.scale)
    assert torch.equal(finite, torch.isfinite(rule.scale))
    # the partial group: the zero padding cannot change the error of any candidate
    tail = x[3:, 64:]
    assert torch.equal(searched.scale[3, 2], quantize_int_by_error(tail, 4, granularity=16).scale[0, 0])


def test_the_format_searches_main_and_correction_and_activations_keep_the_rule():
    fmt = get_format("w4a8", weight_scales="search")
    x = random_with_outliers((16, 256), seed=5)
    main = fmt.quantize_weight(x)
    assert torch.equal(main.scale, quantize_int_by_error(x, 4, granularity=128).scale)
    correction = fmt.quantize_correction(x[:, :64])
    assert torch.equal(correction.scale, quantize_int_by_error(x[:, :64], 4, granularity="channel").scale)
    assert torch.equal(fmt.fake_quantize_activation(x), get_format("w4a8").fake_quantize_activation(x))
    assert fmt.effective_bits(256, 64) == get_format("w4a8").effective_bits(256, 64)
    assert fmt.to_dict()["weight_scales"] == "search"


@pytest.mark.parametrize("order", ["columns", "hessian"])
def test_gptq_chooses_each_groups_scale_by_the_same_search(order):
    fmt = get_format("w4a4", weight_scales="search")
    w = random_with_outliers((12, 256), seed=7)
    # an identity Hessian propagates no error: GPTQ is then round-to-nearest on its scales
    record = gptq_quantize(w, torch.eye(256), fmt, order=order)
    expected = fmt.quantize_weight(w)
    assert torch.equal(record.scale, expected.scale) and torch.equal(record.qdata, expected.qdata)
    group = w[:, 128:].double()
    searched = symmetric_scales_by_error(group.float().unsqueeze(1), 4).reshape(-1)
    assert torch.equal(fmt.gptq_group_scale(group), searched)
    # a real Hessian: the static order searches the weight before the sweep, the column order
    # each group as the sweep has updated it
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(8))
    record = gptq_quantize(w, x.T @ x, fmt, order=order)
    assert torch.isfinite(record.scale).all()
    assert torch.equal(record.scale, expected.scale) == (order == "hessian")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["w4a8", "w4a4"])
def test_a_searched_int_model_packs_saves_and_reloads_bitwise(tmp_path, fmt, dtype):
    from transformers import AutoModelForCausalLM

    make_tiny_llama().save_pretrained(tmp_path / "float")  # loaded as a user loads it, in ``dtype``
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=dtype)
    serq_ao.quantize_(model, SERQConfig(rank=32, format=fmt, weight_scales="search", gptq=True), CALIBRATION)
    rule = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=dtype)
    serq_ao.quantize_(rule, SERQConfig(rank=32, format=fmt, gptq=True), CALIBRATION)
    with torch.no_grad():
        expected = model(IDS).logits
        assert not torch.equal(expected, rule(IDS).logits)
    model.save_pretrained(tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert back.serq_config.weight_scales == "search" and back.serq_config.format == fmt
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, expected)


def test_cli_option_on_an_int_format(tiny_model_dir, tmp_path):
    from serq_ao.cli.main import main

    argv = ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "q"), "--format", "w4a8", "--rank", "32",
            "--recipe", "paper", "--calib-samples", "2", "--calib-seqlen", "32", "--no-diagnostics", "--quiet",
            "--weight-scales", "search"]
    assert main(argv) == 0
    config = json.loads((tmp_path / "q" / "serq_report.json").read_text())["report"]["config"]
    assert config["weight_scales"] == "search" and config["format"] == "w4a8"
