"""SERQConfig(rank_allocation="error"): each linear's output-error curve against a float64
reference and against the quantized model's measured errors; the allocation against brute
force; the budget; packed, saved and reloaded models with per-linear ranks; misuse."""

import copy
import dataclasses
import itertools
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import serq_ao
from serq_ao.formats import get_format
from serq_ao.formats.hadamard import rotate_weight
from serq_ao.integrations.hf_quantizer import PACKED_TENSOR_CLASSES
from serq_ao.kernels.reference import apply_pre_op
from serq_ao.passes import analyze
from serq_ao.quant.calibration import calibrate
from serq_ao.quant.rank_allocation import (
    InputGrams,
    RankCurve,
    allocate_ranks,
    candidate_ranks,
    measure_rank_curves,
    output_error_curve,
)
from serq_ao.quant.reconstruct import serq_reconstruct
from tests.conftest import make_tiny_llama

CALIBRATION = [torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(s)) for s in range(3)]
IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
MXFP4 = get_format("mxfp4")


def outlier_input(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Random activations with a few large channels, as LLM inputs have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g)
    x[:, torch.randperm(width, generator=g)[:4]] *= 30
    return x


@pytest.mark.parametrize("rotation", [0, 32])
@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8", "w4a4"])
def test_the_curve_is_the_output_error_computed_directly_in_float64(fmt, rotation):
    fmt = get_format(fmt)
    d_in, d_out = 160, 48
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(d_out, d_in, generator=g) * 0.05
    windows = [outlier_input(37, d_in, seed) for seed in range(3)]
    scale = torch.cat(windows).abs().amax(dim=0)
    perm = torch.sort(scale, descending=True).indices
    transformed = rotate_weight((weight * scale)[:, perm], rotation)
    grams = InputGrams()
    inputs = []
    for x in windows:
        x_hat = apply_pre_op(x, 1 / scale, perm, rotation)
        grams.add(x_hat, fmt.fake_quantize_activation(x_hat))
        inputs.append(x_hat)
    ranks = candidate_ranks(d_in, 64)
    assert ranks == (0, 32, 64, 96, 128, 160)
    got = output_error_curve(transformed, grams, ranks, fmt)
    x_hat = torch.cat(inputs).double()
    x_q = fmt.fake_quantize_activation(torch.cat(inputs)).double()
    y = x_hat @ transformed.double().T
    for rank, error in zip(ranks, got):
        main, correction = serq_reconstruct(transformed, rank, fmt)
        y_q = x_q @ main.dequantize().double().T
        if correction is not None:
            y_q += x_q[:, :rank] @ correction.dequantize().double().T
        expected = float((y - y_q).pow(2).sum() / y.pow(2).sum())
        assert error == pytest.approx(expected, rel=1e-4)
    assert got[-1] < got[0]  # the correction helps on this input


def test_a_group_no_token_reached_has_a_zero_curve():
    assert output_error_curve(torch.randn(8, 64), InputGrams(), (0, 32, 64), MXFP4) == (0.0, 0.0, 0.0)


def test_candidates_stop_at_four_times_the_rank_and_at_the_width():
    assert candidate_ranks(576, 64) == tuple(range(0, 257, 32))
    assert candidate_ranks(100, 64) == (0, 32, 64, 96)
    assert candidate_ranks(31, 32) == (0,)


def curves_of(model, rank=32, **options):
    """The curves on ``model`` after serq_ao.transform_model (which changes it in place)."""
    plans = serq_ao.transform_model(model, serq_ao.SERQConfig(rank=rank, **options), CALIBRATION)
    return measure_rank_curves(model, plans, CALIBRATION, rank=rank)


@pytest.mark.parametrize("options", [{}, {"rotation": 32},
                                     # the rotated-gptq recipe's transforms (its GPTQ aside)
                                     {"rotation": 32, "flattening_strength": 0.0, "saliency_unit": "block"}])
def test_curves_match_the_errors_of_the_quantized_model_at_each_rank(options):
    """The curve at rank r is ||Y_q - Y||^2 / ||Y||^2 of the model quantized with rank r, measured
    on the same calibration windows by the layerwise diagnostics (through the real folds).

    The two compute the linears' inputs on different code paths, equal up to float32 rounding,
    and an FP4 activation code flips where an input sits on a rounding boundary: one ulp of
    noise on the tiny model's last down_proj input moves its curve by 0.2-0.4%. So a linear
    may differ by a flipped code (within 1%), and the rest must agree to 1e-5: a wrong fold,
    pre-op or rotation moves every linear it touches by far more."""
    model = make_tiny_llama()
    curves = {c.name: c for c in curves_of(copy.deepcopy(model), **options)}
    assert len(curves) == 14
    differences = []
    for rank in (0, 32, 64):
        report = serq_ao.quantize_model(copy.deepcopy(model), serq_ao.SERQConfig(rank=rank, **options),
                                        CALIBRATION, error_windows=len(CALIBRATION))
        assert report.output_errors.keys() == curves.keys()
        for name, error in report.output_errors.items():
            curve = curves[name]
            differences.append((abs(curve.errors[curve.ranks.index(rank)] / error ** 2 - 1), name, rank))
    assert max(differences)[0] < 1e-2, max(differences)
    flipped = {name for difference, name, _ in differences if difference > 1e-5}
    assert len(flipped) <= 1, sorted(differences)[-4:]


def test_measuring_curves_leaves_the_model_alone():
    model = make_tiny_llama()
    plans = serq_ao.transform_model(model, serq_ao.SERQConfig(rank=32), CALIBRATION)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_rank_curves(model, plans, CALIBRATION, rank=32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def brute_force(curves, fmt, rank):
    """The least total error over every combination of candidate ranks within the budget."""
    def bits(c, r):
        return fmt.effective_bits(c.in_features, r) * c.in_features * c.out_features

    budget = sum(bits(c, rank) for c in curves)
    best = math.inf
    for choice in itertools.product(*(range(len(c.ranks)) for c in curves)):
        if sum(bits(c, c.ranks[j]) for c, j in zip(curves, choice)) <= budget + 1e-6:
            best = min(best, sum(c.errors[j] for c, j in zip(curves, choice)))
    return best


def random_convex_curve(name, g, points=5, d_in=256, d_out=64):
    drops = torch.sort(torch.rand(points - 1, generator=g, dtype=torch.float64), descending=True).values
    start = 0.05 + torch.rand(1, generator=g, dtype=torch.float64).item()
    errors = [start]
    for drop in drops.tolist():
        errors.append(errors[-1] - drop * errors[-1] * 0.5)
    return RankCurve(name, d_in, d_out, tuple(range(0, 32 * points, 32)), tuple(errors))


@pytest.mark.parametrize("seed", range(6))
def test_on_convex_curves_of_equal_shapes_the_allocation_is_the_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    curves = [random_convex_curve(f"l{i}", g) for i in range(4)]
    ranks = allocate_ranks(curves, MXFP4, 64)
    total = sum(c.errors[c.ranks.index(ranks[c.name])] for c in curves)
    assert total == pytest.approx(brute_force(curves, MXFP4, 64), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_any_curves_any_shapes_stay_within_the_budget_and_beat_uniform(seed):
    g = torch.Generator().manual_seed(100 + seed)
    shapes = [(64, 192), (128, 64), (256, 256), (96, 32)]
    curves = []
    for i, (d_in, d_out) in enumerate(shapes):
        ranks = candidate_ranks(d_in, 32)
        errors = torch.rand(len(ranks), generator=g, dtype=torch.float64).tolist()  # not monotone, not convex
        curves.append(RankCurve(f"l{i}", d_in, d_out, ranks, tuple(errors)))
    ranks = allocate_ranks(curves, MXFP4, 32)
    bits = lambda c, r: MXFP4.effective_bits(c.in_features, r) * c.in_features * c.out_features  # noqa: E731
    assert sum(bits(c, ranks[c.name]) for c in curves) <= sum(bits(c, 32) for c in curves)
    assert all(ranks[c.name] in c.ranks for c in curves)
    # every chosen rank is a strict improvement over rank 0 or rank 0 itself
    assert all(ranks[c.name] == 0 or c.errors[c.ranks.index(ranks[c.name])] < c.errors[0] for c in curves)


def test_a_drop_after_a_flat_stretch_is_reached():
    flat_then_drop = RankCurve("a", 256, 64, (0, 32, 64), (1.0, 1.0, 0.1))
    small_gain = RankCurve("b", 256, 64, (0, 32, 64), (1.0, 0.9, 0.85))
    assert allocate_ranks([flat_then_drop, small_gain], MXFP4, 32) == {"a": 64, "b": 0}


def test_ties_go_to_the_earlier_linear():
    straight = [RankCurve(n, 256, 64, (0, 32, 64), (1.0, 0.5, 0.0)) for n in ("first", "second")]
    assert allocate_ranks(straight, MXFP4, 32) == {"first": 64, "second": 0}
    assert allocate_ranks(straight[::-1], MXFP4, 32) == {"second": 64, "first": 0}


def test_the_tiny_model_keeps_the_uniform_storage_and_lowers_the_summed_error():
    model = make_tiny_llama()
    uniform = serq_ao.quantize_model(copy.deepcopy(model), serq_ao.SERQConfig(rank=32), CALIBRATION,
                                     error_windows=len(CALIBRATION))
    allocated = serq_ao.quantize_model(model, serq_ao.SERQConfig(rank=32, rank_allocation="error"), CALIBRATION,
                                       error_windows=len(CALIBRATION))
    ranks = {r.name: r.rank for r in allocated.linears}
    assert len(set(ranks.values())) > 1 and all(r % 32 == 0 and 0 <= r <= 128 for r in ranks.values())
    stored = lambda report: sum(r.bits * r.in_features * r.out_features for r in report.linears)  # noqa: E731
    assert stored(allocated) <= stored(uniform)
    assert sum(e ** 2 for e in allocated.output_errors.values()) < sum(e ** 2 for e in uniform.output_errors.values())
    assert "rank_allocation" in allocated.seconds


def test_gptq_and_rotation_take_the_allocated_ranks():
    config = serq_ao.SERQConfig(rank=32, rank_allocation="error", gptq=True, rotation=32)
    report = serq_ao.quantize_model(make_tiny_llama(), config, CALIBRATION)
    assert len({r.rank for r in report.linears}) > 1
    # on top of the rotated-gptq recipe, within the recipe's uniform storage
    recipe = serq_ao.recipe_config("rotated-gptq", rank=32)
    uniform = serq_ao.quantize_model(make_tiny_llama(), recipe, CALIBRATION)
    allocated = serq_ao.quantize_model(make_tiny_llama(), dataclasses.replace(recipe, rank_allocation="error"),
                                       CALIBRATION)
    assert len({r.rank for r in allocated.linears}) > 1
    assert allocated.effective_bits <= uniform.effective_bits + 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_with_allocated_ranks_saves_and_reloads_bitwise(dtype, tmp_path):
    # loaded in the dtype as a user's checkpoint would be (model.to(dtype) would also cast
    # the rotary inv_freq buffer, which from_pretrained keeps in fp32)
    make_tiny_llama().save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=dtype)
    evaluation = copy.deepcopy(model)
    config = serq_ao.SERQConfig(rank=32, rank_allocation="error")
    serq_ao.quantize_model(evaluation, config, CALIBRATION)
    serq_ao.quantize_(model, config, CALIBRATION)
    ranks = {name: module.weight.rank for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and isinstance(module.weight, PACKED_TENSOR_CLASSES)}
    assert len(ranks) == 14 and len(set(ranks.values())) > 1
    with torch.no_grad():
        logits = model(IDS).logits
        assert torch.equal(logits, evaluation(IDS).logits)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.dtype == dtype and reloaded.serq_config.rank_allocation == "error"
    assert {n: reloaded.get_submodule(n).weight.rank for n in ranks} == ranks
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, logits)


def test_a_folder_whose_ranks_the_config_does_not_allow_is_refused(tmp_path):
    model = make_tiny_llama()
    serq_ao.quantize_(model, serq_ao.SERQConfig(rank=32, rank_allocation="error"), CALIBRATION)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    data = config["quantization_config"]["quant_type"]["default"]["_data"]
    data["serq_config"]["rank_allocation"] = "uniform"  # the ranks now disagree with the config
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"has rank \d+, the checkpoint's config says 32"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    data["serq_config"]["rank_allocation"] = "error"
    data["serq_config"]["rank"] = 0  # no rank to share out
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rank_allocation='error' applies to method 'serq' with rank > 0"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_misuse_is_named(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="rank_allocation must be one of \\('uniform', 'error'\\), got 'bits'"):
        serq_ao.SERQConfig(rank_allocation="bits")
    with pytest.raises(ValueError, match="applies to method 'serq' with rank > 0"):
        serq_ao.SERQConfig(method="rtn", rank_allocation="error")
    with pytest.raises(ValueError, match="applies to method 'serq' with rank > 0"):
        serq_ao.SERQConfig(rank=0, rank_allocation="error")
    model = make_tiny_llama()
    stats = calibrate(model, analyze(model), CALIBRATION)
    with pytest.raises(ValueError, match="rank_allocation='error' needs calibration input ids"):
        serq_ao.quantize_model(model, serq_ao.SERQConfig(rank=32, rank_allocation="error"), stats)
    from serq_ao.streaming import quantize_checkpoint

    with pytest.raises(ValueError, match="needs the whole model in memory"):
        quantize_checkpoint(tiny_model_dir, serq_ao.SERQConfig(rank=32, rank_allocation="error"), CALIBRATION,
                            tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_quantize_and_inspect(tiny_model_dir, tmp_path, capsys):
    from serq_ao.cli.main import main

    out = tmp_path / "q"
    argv = ["quantize", str(tiny_model_dir), "-o", str(out), "--rank", "32", "--rank-allocation", "error",
            "--calib-windows", "3", "--calib-seqlen", "40", "--quiet", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rank_allocation"] == "error" and not summary["streamed"] and summary["packed"]
    assert main(["inspect", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len({row["rank"] for row in record["linears"]}) > 1
    assert main(["inspect", str(out), "--layers", "0"]) == 0
    shown = " ".join(capsys.readouterr().out.split())  # rich wraps a long title at the console width
    assert "Correction rank by layer and linear kind" in shown and "ranks allocated by error" in shown
    assert main(["quantize", str(tiny_model_dir), "-o", str(tmp_path / "r"), "--method", "rtn",
                 "--rank-allocation", "error", "--quiet"]) == 2
    assert "--rank-allocation applies to method serq only" in capsys.readouterr().err


def test_cli_compare_calibrates_the_allocation_on_input_ids(tiny_model_dir, capsys):
    from serq_ao.cli.main import main

    argv = ["compare", str(tiny_model_dir), "--methods", "rtn,serq", "--rank", "32", "--rank-allocation", "error",
            "--calib-windows", "2", "--calib-seqlen", "32", "--windows", "2", "--seqlen", "32", "--quiet", "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["rank_allocation"] == "error" and [r["method"] for r in record["results"]] == ["rtn", "serq"]
