"""Finite numbers: non-finite weights and calibration activations are refused, naming where;
diagnostics never turn a NaN into 0; JSON outputs are strict."""

import json
import math

import pytest
import torch

from serq_ao.files import strict_json
from serq_ao.quant.input_checks import NonFiniteError
from serq_ao.quant.config import SERQConfig
from serq_ao.quant.diagnostics import relative_error
from serq_ao.quant.pipeline import quantize_model
from tests.conftest import make_tiny_llama


def ids(seed, n=2, length=17):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight", "model.embed_tokens.weight"])
def test_non_finite_weights_are_refused_naming_the_tensor(value, where):
    model = make_tiny_llama()
    with torch.no_grad():
        model.get_parameter(where).view(-1)[7] = value
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match=rf"parameter {where} has 1 NaN or inf value"):
        quantize_model(model, SERQConfig(rank=32), ids(0))
    after = model.state_dict()
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) for k in before)  # untouched


@pytest.mark.parametrize("method", ["serq", "smoothquant"])
@pytest.mark.parametrize("gptq", [False, True])
def test_calibration_overflow_is_an_error_naming_the_linear(method, gptq):
    # fp16: gate and up stay finite (~1e4), their product, down_proj's input, overflows
    model = make_tiny_llama().to(torch.float16)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.mul_(1e5)
        model.model.layers[0].mlp.up_proj.weight.mul_(1e5)
    with pytest.raises(NonFiniteError, match=r"NaN or inf activations .* model\.layers\.0\.mlp\.down_proj"):
        quantize_model(model, SERQConfig(method=method, rank=32 if method == "serq" else 0, gptq=gptq), ids(1))


def test_per_linear_torchao_route_refuses_non_finite_weights():
    from torchao.quantization import quantize_

    from serq_ao import SERQLinearConfig

    linear = torch.nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="1 NaN or inf"):
        quantize_(torch.nn.Sequential(linear), SERQLinearConfig(rank=0))


def test_relative_error_never_reports_a_broken_linear_as_exact():
    assert math.isnan(relative_error(float("nan"), 4.0)) and math.isnan(relative_error(1.0, float("nan")))
    assert relative_error(0.0, 0.0) == 0.0 and relative_error(1.0, 0.0) == math.inf
    assert relative_error(1.0, 4.0) == 0.5


def test_strict_json_has_null_and_a_flag_for_non_finite_values():
    text = strict_json({"ppl": float("inf"), "linears": [{"error": float("nan")}, {"error": 0.25}], "ok": 1.0})
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert record == {"ppl": None, "linears": [{"error": None}, {"error": 0.25}], "ok": 1.0,
                      "non_finite": ["ppl", "linears[0].error"]}
    assert json.loads(strict_json({"a": 1})) == {"a": 1}  # no flag when all is finite


def test_cli_refuses_a_folder_with_nan_weights_in_one_line(tmp_path, capsys):
    from serq_ao.cli.main import main
    from tests.conftest import make_byte_tokenizer

    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    make_byte_tokenizer().save_pretrained(tmp_path / "m")
    argv = ["quantize", str(tmp_path / "m"), "--out", str(tmp_path / "q"), "--calib-windows", "2",
            "--calib-seqlen", "16", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj.weight has 1 NaN" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()
