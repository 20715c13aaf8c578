"""SERQConfig.flattening_strength: s = max|x| ** strength, the order by max|x| at any strength.

Checked like the paper's flattening: the scales against their formula, the transformed model
equal to the float model before quantization, the quantized model equal to a per-linear
runtime implementation, a lone linear against the method written out, packed models bitwise
through save and reload in every dtype, and the options' errors."""

import json

import pytest
import torch

import serq_ao
from serq_ao.quant.config import SERQConfig
from serq_ao.quant.pipeline import quantize_model, transform_model
from serq_ao.quant.reconstruct import FLATTEN_SHRINK, flattening_scales, saliency_order
from tests.conftest import make_tiny_llama
from tests.passes.architectures import build
from tests.quant.test_pipeline import assert_pipeline_equals_naive, ids

CALIBRATION = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))


def test_scales_follow_their_formula_at_each_strength():
    amax = torch.rand(300, generator=torch.Generator().manual_seed(0)) * 50
    amax[::7] = 0.0  # channels that were always zero get s = 1
    base = torch.where(amax > 0, amax, torch.ones_like(amax))
    assert torch.equal(flattening_scales(amax), base * FLATTEN_SHRINK)  # the paper's, bitwise
    assert torch.equal(flattening_scales(amax, 1), flattening_scales(amax))
    assert torch.equal(flattening_scales(amax, 0.0), torch.ones_like(amax))  # exactly 1: folds are no-ops
    half = flattening_scales(amax, 0.5).double()
    assert torch.allclose(half, base.double().sqrt() * FLATTEN_SHRINK, rtol=1e-6, atol=0)
    # the order of any strength above 0 is the order by max |x|
    assert torch.equal(saliency_order(flattening_scales(amax, 0.5)), saliency_order(flattening_scales(amax)))


@pytest.mark.parametrize("arch", ["llama", "phi3", "opt"])
@pytest.mark.parametrize("strength", [0.0, 0.5])
def test_the_transforms_leave_the_float_model_output_unchanged(arch, strength):
    model = build(arch)
    evaluation = ids(1, vocab=64)
    with torch.no_grad():
        expected = model(input_ids=evaluation).logits
    transform_model(model, SERQConfig(rank=32, flattening_strength=strength), ids(0, vocab=64))
    with torch.no_grad():
        got = model(input_ids=evaluation).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt"])
@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8"])
@pytest.mark.parametrize("strength", [0.0, 0.5])
def test_the_pipeline_equals_the_runtime_implementation(arch, fmt, strength):
    """The naive reference divides by s = max|x| ** strength at run time (or in the producing
    rows), gathers by the order of max|x|, and quantizes per linear."""
    assert_pipeline_equals_naive(arch, SERQConfig(format=fmt, rank=32, flattening_strength=strength))


def test_without_flattening_the_quantized_weights_are_the_plain_weights_in_saliency_order():
    from serq_ao.passes import GatedProducer, analyze
    from serq_ao.quant.calibration import calibrate
    from serq_ao.quant.fake_quant import FakeQuantLinear
    from serq_ao.quant.reconstruct import serq_reconstruct

    model = make_tiny_llama()
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    plan = analyze(model)
    stats = calibrate(model, plan, CALIBRATION)
    group_of = {linear: group.name for group in plan.groups for linear in group.linears}
    config = SERQConfig(rank=32, flattening_strength=0.0)
    quantize_model(model, config, stats)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert set(linears) == set(group_of)
    # a gated MLP's order is folded into the gate and up rows (down_proj needs no gather)
    row_order = {}
    for group in plan.groups:
        if isinstance(group.producer, GatedProducer):
            order = saliency_order(flattening_scales(stats.amax[group.name]))
            row_order[group.producer.gate.linear] = row_order[group.producer.up.linear] = order
    assert row_order
    for name, linear in linears.items():
        # s = 1 exactly: no weight is scaled, by its own flattening or by a fold into it
        perm = saliency_order(flattening_scales(stats.amax[group_of[name]]))
        weight = original[name][row_order[name]] if name in row_order else original[name]
        main, correction = serq_reconstruct(weight[:, perm], 32, config.quant_format)
        assert torch.equal(linear.weight, main.dequantize()), name
        assert torch.equal(linear.correction, correction.dequantize()), name
        assert linear.input_scale_inv is None or bool((linear.input_scale_inv == 1).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_rotated_gptq_recipe_model_saves_and_reloads_bitwise(tmp_path, dtype):
    """The command line's default recipe (no flattening, block order, rotation, GPTQ), loaded
    as a user loads a model, in every dtype."""
    from transformers import AutoModelForCausalLM

    from serq_ao.quant.recipes import recipe_config

    config = recipe_config("rotated-gptq", rank=32)
    make_tiny_llama().save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=dtype)
    evaluation = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=dtype)
    serq_ao.quantize_(model, config, CALIBRATION)
    serq_ao.quantize_model(evaluation, config, CALIBRATION)  # evaluation mode: FakeQuantLinear
    with torch.no_grad():
        logits = model(IDS).logits
        assert torch.isfinite(logits).all()
        assert torch.equal(logits, evaluation(IDS).logits)  # the packed op computes what evaluation mode does
    model.save_pretrained(tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert back.serq_config == config
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, logits)


def test_the_config_checks_the_strength_and_reads_old_files():
    for bad in (-0.1, 1.5, float("nan"), True, "0.5", None):
        with pytest.raises(ValueError, match=r"flattening_strength must be a number in \[0, 1\]"):
            SERQConfig(flattening_strength=bad)
    for method in ("rtn", "smoothquant", "lqer"):
        with pytest.raises(ValueError, match="flattening_strength=0.5 applies to method 'serq' only"):
            SERQConfig(method=method, flattening_strength=0.5)
    config = SERQConfig(flattening_strength=0)
    assert config.flattening_strength == 0.0 and isinstance(config.flattening_strength, float)
    assert SERQConfig.from_dict(json.loads(config.to_json())) == config
    old = {k: v for k, v in SERQConfig().to_dict().items() if k != "flattening_strength"}
    assert SERQConfig.from_dict(old).flattening_strength == 1.0  # folders written before the option


def test_an_edited_strength_in_a_folder_is_refused_naming_it(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama()
    serq_ao.quantize_(model, SERQConfig(rank=32, flattening_strength=0.0), CALIBRATION)
    model.save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    text = json.dumps(config)
    assert '"flattening_strength": 0.0' in text
    path.write_text(text.replace('"flattening_strength": 0.0', '"flattening_strength": 7'))
    with pytest.raises(Exception, match="flattening_strength"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_cli_option_and_its_errors(tiny_model_dir, tmp_path, capsys):
    from serq_ao.cli.main import main

    base = ["quantize", str(tiny_model_dir), "--rank", "32", "--calib-samples", "2", "--calib-seqlen", "32",
            "--no-diagnostics", "--quiet"]
    assert main([*base, "-o", str(tmp_path / "q"), "--flattening-strength", "0"]) == 0
    report = json.loads((tmp_path / "q" / "serq_report.json").read_text())
    assert report["report"]["config"]["flattening_strength"] == 0.0
    capsys.readouterr()
    for bad in ("2", "nan", "half"):
        with pytest.raises(SystemExit):
            main([*base, "-o", str(tmp_path / "r"), "--flattening-strength", bad])
        assert "--flattening-strength: expected a number in [0, 1]" in capsys.readouterr().err
    assert main(["quantize", str(tiny_model_dir), "-o", str(tmp_path / "r"), "--method", "rtn",
                 "--flattening-strength", "0", "--quiet"]) == 2
    assert "--flattening-strength applies to method serq only" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
