"""SERQConfig.saliency_unit="block": the saliency order moves whole rotation blocks."""

import pytest
import torch

from serq_ao.quant.config import SERQConfig
from serq_ao.quant.pipeline import transform_model
from serq_ao.quant.reconstruct import flattening_scales, saliency_order
from tests.conftest import make_tiny_llama
from tests.passes.architectures import build
from tests.quant.test_pipeline import ids

CALIBRATION = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(2))


def brute_force_block_order(scales: list[float], block: int) -> list[int]:
    """Written out with lists: full blocks by their largest scale (ties: the earlier block),
    then the tail in place."""
    full = len(scales) // block
    blocks = sorted(range(full), key=lambda b: (-max(scales[b * block:(b + 1) * block]), b))
    return [b * block + i for b in blocks for i in range(block)] + list(range(full * block, len(scales)))


@pytest.mark.parametrize("columns, block", [(576, 32), (100, 32), (96, 64), (1536, 128), (7, 32), (64, 32)])
def test_block_order_is_the_written_out_order(columns, block):
    scales = torch.rand(columns, generator=torch.Generator().manual_seed(columns)) * 10
    scales[::5] = scales[0]  # ties between blocks go to the earlier block
    order = saliency_order(scales, block)
    assert order.tolist() == brute_force_block_order(scales.tolist(), block)
    assert sorted(order.tolist()) == list(range(columns))  # a permutation
    assert torch.equal(saliency_order(scales, 0), saliency_order(scales))  # 0: the channel order


@pytest.mark.parametrize("arch", ["llama", "phi3", "opt"])
def test_block_order_leaves_the_float_model_output_unchanged(arch):
    model = build(arch)
    evaluation = ids(1, vocab=64)
    with torch.no_grad():
        expected = model(input_ids=evaluation).logits
    transform_model(model, SERQConfig(rank=32, rotation=32, saliency_unit="block", flattening_strength=0.0),
                    ids(0, vocab=64))
    with torch.no_grad():
        got = model(input_ids=evaluation).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_each_group_takes_the_block_order_of_its_statistics():
    """The order of every group is the block order of max |x| over blocks of the rotation's
    size, whatever the flattening strength; the channel unit keeps the channel order."""
    from serq_ao.passes import analyze
    from serq_ao.quant.calibration import calibrate
    from serq_ao.quant.pipeline import _transforms

    model = make_tiny_llama()
    plan = analyze(model)
    stats = calibrate(model, plan, CALIBRATION)
    for strength in (1.0, 0.0):
        block = _transforms(model, plan, SERQConfig(rank=32, rotation=32, saliency_unit="block",
                                                    flattening_strength=strength), stats, set())
        channel = _transforms(model, plan, SERQConfig(rank=32, rotation=32, flattening_strength=strength), stats, set())
        for group in plan.groups:
            amax = stats.amax[group.name]
            expected = saliency_order(flattening_scales(amax), 32)
            assert not torch.equal(expected, saliency_order(flattening_scales(amax)))  # the test can tell
            assert torch.equal(block[group.name].perm, expected), group.name
            assert torch.equal(channel[group.name].perm, saliency_order(flattening_scales(amax))), group.name


def test_the_option_is_checked_with_its_needs_named(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="saliency_unit must be one of"):
        SERQConfig(rotation=32, saliency_unit="row")
    for kwargs in (dict(saliency_unit="block"), dict(method="rtn", rotation=32, saliency_unit="block"),
                   dict(rotation=32, saliency_unit="block", residual_order="global")):
        with pytest.raises(ValueError, match="saliency_unit='block' moves the blocks of a rotation"):
            SERQConfig(**kwargs)
    old = {k: v for k, v in SERQConfig().to_dict().items() if k != "saliency_unit"}
    assert SERQConfig.from_dict(old).saliency_unit == "channel"  # folders written before the option
    config = SERQConfig(rotation=64, saliency_unit="block")
    assert SERQConfig.from_dict(config.to_dict()) == config
    assert config.saliency_block == 64 and SERQConfig(rotation=64).saliency_block == 0

    from serq_ao.cli.main import main

    base = ["quantize", str(tiny_model_dir), "--calib-samples", "2", "--calib-seqlen", "32", "--no-diagnostics",
            "--quiet", "--recipe", "paper", "--rank", "32"]
    assert main([*base, "-o", str(tmp_path / "r"), "--saliency-unit", "block"]) == 2
    assert "saliency_unit='block' moves the blocks of a rotation" in capsys.readouterr().err
    assert main(["quantize", str(tiny_model_dir), "-o", str(tmp_path / "r"), "--quiet", "--method", "rtn",
                 "--saliency-unit", "block", "--rotation", "32"]) == 2
    assert "--saliency-unit applies to method serq only" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
