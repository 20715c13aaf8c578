"""SERQConfig(ignore=...): linears left in floating point, the rest quantized as before."""

import copy
import logging

import pytest
import torch
from torch import nn

import serq_ao
from serq_ao.integrations.serialization import load_quantized, save_quantized
from serq_ao.passes import PreOpLinear
from tests.conftest import make_byte_tokenizer, make_tiny_llama

IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
X = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def _quantized(fields, model=None):
    model = copy.deepcopy(model or make_tiny_llama(seed=6))
    report = serq_ao.quantize_model(model, serq_ao.SERQConfig(**fields), IDS)
    return model, report


@pytest.mark.parametrize("pattern, kept", [
    ("model.layers.1.mlp.down_proj", {"model.layers.1.mlp.down_proj"}),
    ("*.down_proj", {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}),
    ("re:model\\.layers\\.0\\..*_proj", None),  # every linear of layer 0
    ("re:.*\\.(q|k)_proj", {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qk"}),
])
@pytest.mark.parametrize("fold", [True, False])
def test_ignored_linears_stay_float_and_the_rest_is_unchanged(pattern, kept, fold):
    fields = {"rank": 32, "fold_into_linears": fold}
    full, full_report = _quantized(fields)
    partly, report = _quantized({**fields, "ignore": [pattern]})
    every = {r.name for r in full_report.linears}
    if kept is None:
        kept = {n for n in every if n.startswith("model.layers.0.")}
    assert {r.name for r in report.linears} == every - kept
    for name in kept:
        module = partly.get_submodule(name)
        assert type(module) is nn.Linear, name  # plain: no quantization, no pre-op left
    for name in every - kept:  # the quantized ones are the same modules as without ignore
        a, b = full.get_submodule(name).state_dict(), partly.get_submodule(name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert set(report.plans) == every - kept


@pytest.mark.parametrize("fold", [True, False])
def test_ignoring_everything_gives_the_float_model(fold):
    """All linears ignored: only the exact transforms remain, so the logits are the float
    model's up to rounding."""
    model = make_tiny_llama(seed=6)
    partly, report = _quantized({"rank": 32, "fold_into_linears": fold, "ignore": ["*"]}, model)
    assert report.linears == []
    with torch.no_grad():
        expected, got = model(X).logits, partly(X).logits
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, PreOpLinear) for m in partly.modules())


def test_a_pre_op_linear_undone_into_a_plain_one():
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 16)
    scale_inv, perm = torch.rand(64, generator=g) + 0.5, torch.randperm(64, generator=g)
    pre_op = PreOpLinear(linear, scale_inv, perm)
    x = torch.randn(3, 64, generator=g, dtype=torch.float64).float()
    plain = pre_op.as_plain_linear()
    expected = (x.double() * scale_inv.double())[:, perm] @ linear.weight.double().T + linear.bias.double()
    assert torch.allclose(plain(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_ignored_linears_save_and_reload(tmp_path):
    config = serq_ao.SERQConfig(rank=32, ignore=["*.o_proj"])
    model = make_tiny_llama(seed=6)
    serq_ao.quantize_(model, config, IDS)
    out = save_quantized(model, make_byte_tokenizer(), tmp_path / "q", config)
    reloaded, _ = load_quantized(out)
    assert type(reloaded.model.layers[0].self_attn.o_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(reloaded(X).logits, model(X).logits)


def test_pattern_that_matches_nothing_warns(caplog):
    with caplog.at_level(logging.WARNING):
        _quantized({"rank": 32, "ignore": ["*.gate"]})
    assert "'*.gate' matched none of the quantizable linears" in caplog.text


@pytest.mark.parametrize("ignore, message", [
    ("*.down_proj", "ignore must be a list of module-name patterns"),
    ([""], "ignore must be a list"),
    (["re:("], "is not a regular expression"),
])
def test_bad_ignore_is_refused(ignore, message):
    with pytest.raises(ValueError, match=message):
        serq_ao.SERQConfig(ignore=ignore)


def test_cli_ignore(tiny_model_dir, tmp_path, capsys):
    import json

    from serq_ao.cli.main import main

    argv = ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "q"), "--rank", "32", "--calib-samples", "2",
            "--calib-seqlen", "32", "--no-diagnostics", "--quiet", "--json", "--ignore", "*.down_proj",
            "--ignore", "re:.*layers\\.0\\.self_attn\\.q_proj"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["linears"] == 14 - 3 and summary["ignore"] == ["*.down_proj", "re:.*layers\\.0\\.self_attn\\.q_proj"]
    reloaded, _ = load_quantized(tmp_path / "q")
    assert type(reloaded.model.layers[1].mlp.down_proj) is nn.Linear
