"""Weight block scales chosen by error (``weight_scales="search"``): against a float64
reference that tries both exponents, never worse than FLOOR or RCEIL per block, still plain
MXFP4 (the same decoder, GPTQ's frozen scales the same)."""

import pytest
import torch

from serq_ao.formats import (
    dequantize_mxfp4,
    e8m0_to_float32,
    get_format,
    quantize_mxfp4,
    quantize_mxfp4_by_error,
)
from serq_ao.quant.config import SERQConfig
from tests.formats.test_mxfp4 import E2M1, random_with_outliers


def block_errors(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors per block of 32, float64 (K a multiple of 32)."""
    return (y.double() - x.double()).square().unflatten(-1, (-1, 32)).sum(-1)


def on_grid(blocks: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """Float64: every element to the nearest of +-E2M1 * 2**exponent (ties to the even code)."""
    scale = torch.exp2(exponent)
    v = (blocks / scale).abs()
    dist = (v.unsqueeze(-1) - E2M1).abs()
    candidates = (dist == dist.min(-1, keepdim=True).values) * 1.0
    even_tie = candidates * (torch.arange(8) % 2 == 0)
    index = torch.where(even_tie.sum(-1) > 0, even_tie.argmax(-1), candidates.argmax(-1))
    return E2M1[index] * torch.sign(blocks) * scale


def reference_by_error(x: torch.Tensor) -> torch.Tensor:
    """Float64, from the definition: each block on FLOOR's grid (e = floor(log2 amax) - 2) or
    on the one twice as coarse (e + 1), whichever has the smaller squared error (FLOOR on a
    tie). K a multiple of 32, blocks finite and not tiny."""
    blocks = x.double().unflatten(-1, (-1, 32))
    floor = torch.floor(torch.log2(blocks.abs().amax(-1, keepdim=True))) - 2
    low, high = on_grid(blocks, floor), on_grid(blocks, floor + 1)
    error = lambda q: (q - blocks).square().sum(-1, keepdim=True)  # noqa: E731
    return torch.where(error(high) < error(low), high, low).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_float64_reference_and_beats_both_rules(dtype, seed):
    x = random_with_outliers((48, 256), dtype, seed=seed)
    codes, scales = quantize_mxfp4_by_error(x)
    got = dequantize_mxfp4(codes, scales, k=256, dtype=torch.float64)
    assert torch.equal(got, reference_by_error(x))
    for rule in ("floor", "rceil"):
        ruled = dequantize_mxfp4(*quantize_mxfp4(x, rule), k=256, dtype=torch.float64)
        assert (block_errors(x, got) <= block_errors(x, ruled)).all()
    floor_scales = quantize_mxfp4(x, "floor")[1].int()
    assert set((scales.int() - floor_scales).unique().tolist()) <= {0, 1}
    assert (scales.int() != floor_scales).any() and (scales.int() == floor_scales).any()  # both get chosen


def test_searching_a_few_rows_at_a_time_changes_nothing(monkeypatch):
    import serq_ao.formats.mxfp4 as mxfp4

    x = random_with_outliers((3, 41, 96), torch.float32, seed=4)
    whole = quantize_mxfp4_by_error(x)
    monkeypatch.setattr(mxfp4, "_SEARCH_CHUNK_ELEMENTS", 200)  # 2 rows of 96 per chunk, 123 rows
    chunked = quantize_mxfp4_by_error(x)
    assert all(torch.equal(a, b) for a, b in zip(chunked, whole)) and chunked[0].shape == (3, 41, 48)
    assert [t.shape for t in quantize_mxfp4_by_error(x[0, 0])] == [t.shape for t in quantize_mxfp4(x[0, 0])]


def test_special_blocks_as_with_floor():
    x = torch.randn(4, 128)
    x[0, :32] = 0.0  # a zero block
    x[1, 32:64] = float("nan")
    x[2, 64:96] = float("inf")
    x[3, 96:128] *= 2.0**-130  # tiny: its FLOOR exponent clamps at -127
    codes, scales = quantize_mxfp4_by_error(x)
    assert scales[0, 0] == 0 and (codes[0, :16] == 0).all()
    assert scales[1, 1] == 255 and scales[2, 2] == 255
    back = dequantize_mxfp4(codes, scales, k=128)
    assert torch.isnan(back[1, 32:64]).all() and torch.isnan(back[2, 64:96]).all()
    assert torch.isfinite(back[3]).all() and (block_errors(x[3:], back[3:])[0, 3]
                                              <= block_errors(x[3:], dequantize_mxfp4(*quantize_mxfp4(x[3:]), k=128))[0, 3])


def test_format_and_gptq_use_the_searched_scales():
    fmt = get_format("mxfp4", "floor", "search")
    x = random_with_outliers((8, 96), torch.float32, seed=3)
    record = fmt.quantize_weight(x)
    codes, scales = quantize_mxfp4_by_error(x)
    assert torch.equal(record.qdata, codes) and torch.equal(record.scale, scales)
    frozen = fmt.gptq_frozen_scales(x)
    assert torch.equal(frozen, e8m0_to_float32(scales))
    codes, values = zip(*(fmt.gptq_round(x[:, j].double(), frozen[:, j // 32]) for j in range(96)))
    rounded = fmt.gptq_record(torch.stack(codes, dim=1), frozen, 96)
    assert torch.equal(rounded.qdata, record.qdata) and torch.equal(rounded.scale, record.scale)
    # activations keep the rule
    assert torch.equal(fmt.fake_quantize_activation(x), get_format("mxfp4", "floor").fake_quantize_activation(x))


def test_the_option_is_named_where_it_does_not_apply():
    with pytest.raises(ValueError, match="weight_scales must be one of \\('rule', 'search'\\)"):
        SERQConfig(weight_scales="best")
    with pytest.raises(ValueError, match="weight_scales must be one of \\('rule', 'search'\\)"):
        get_format("w4a4", "floor", "best")
    assert SERQConfig.from_dict(SERQConfig(weight_scales="search").to_dict()).weight_scales == "search"


def test_a_model_quantized_with_searched_scales_packs_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    import serq_ao
    from tests.conftest import make_tiny_llama

    calibration = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
    model = make_tiny_llama()
    serq_ao.quantize_(model, SERQConfig(rank=32, weight_scales="search"), calibration)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert back.serq_config.weight_scales == "search"
    with torch.no_grad():
        assert torch.equal(back(ids).logits, expected)


def test_cli_option(tiny_model_dir, tmp_path, capsys):
    import json

    from serq_ao.cli.main import main

    argv = ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "q"), "--rank", "32", "--calib-samples", "2",
            "--calib-seqlen", "32", "--no-diagnostics", "--quiet", "--weight-scales", "search"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "q" / "serq_report.json").read_text())["report"]["config"]["weight_scales"] == "search"
    with pytest.raises(SystemExit):
        main(["quantize", str(tiny_model_dir), "-o", str(tmp_path / "r"), "--weight-scales", "best", "--quiet"])
    assert "--weight-scales: invalid choice: 'best'" in capsys.readouterr().err
