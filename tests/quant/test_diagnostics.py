"""Per-linear diagnostics against float64 references computed here."""

import copy

import pytest
import torch
import torch.nn.functional as F

from serq_ao.quant.config import SERQConfig
from serq_ao.quant.diagnostics import (
    Diagnostics,
    layer_and_kind,
    quantize_with_diagnostics,
    saliency_curve,
    saliency_statistics,
)
from serq_ao.quant.pipeline import quantize_model
from tests.conftest import make_tiny_llama


def test_saliency_statistics_match_a_float64_reference():
    torch.manual_seed(0)
    channel_max = torch.rand(96).exp() * 3  # positive, unsorted
    s = channel_max.double()
    top = torch.sort(s, descending=True).values
    spread, share = saliency_statistics(channel_max, 32)
    assert spread == pytest.approx(float(s.max() / s.median()), rel=1e-12)
    assert share == pytest.approx(float(top[:32].sum() / s.sum()), rel=1e-12)
    points = dict(saliency_curve(channel_max, 32))
    assert sorted(points) == [1, 2, 4, 8, 16, 32, 64, 96]
    for k, value in points.items():
        assert value == pytest.approx(float(top[:k].sum() / s.sum()), rel=1e-12)
    assert points[96] == pytest.approx(1.0)
    assert saliency_statistics(channel_max, 0)[1] == 0.0
    assert 48 in dict(saliency_curve(channel_max, 48))  # the rank is always a point


def test_layer_and_kind():
    assert layer_and_kind("model.layers.12.mlp.down_proj") == (12, "mlp.down_proj")
    assert layer_and_kind("lm_head") == (None, "lm_head")


def test_rtn_output_error_is_the_fake_quantized_linear_on_float_inputs():
    # RTN has no transforms: the quantized linear takes the float model's own inputs
    model = make_tiny_llama()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 256, (3, 32))
    _, diagnostics = quantize_with_diagnostics(model, SERQConfig(method="rtn", format="mxfp4"), ids,
                                               quantize=quantize_model, error_windows=2)
    name = "model.layers.0.mlp.gate_proj"
    inputs = []
    handle = reference.get_submodule(name).register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    with torch.no_grad():
        reference(input_ids=ids[:2])
        handle.remove()
        x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])
        y = F.linear(x.double(), reference.get_submodule(name).weight.double())
        y_q = model.get_submodule(name)(x).double()
    expected = float((y_q - y).norm() / y.norm())
    (row,) = [d for d in diagnostics.linears if d.name == name]
    assert row.output_error == pytest.approx(expected, rel=1e-5)
    assert diagnostics.error_tokens == 2 * 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_serq_diagnostics_cover_every_linear_and_the_correction_helps(dtype):
    ids = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(1))
    results = {}
    for rank in (0, 32):
        report, diagnostics = quantize_with_diagnostics(
            make_tiny_llama().to(dtype), SERQConfig(method="serq", format="mxfp4", rank=rank), ids, error_windows=2
        )
        assert sorted(d.name for d in diagnostics.linears) == sorted(r.name for r in report.linears)
        assert len(diagnostics.curves) == 2 * 4  # per layer: qkv, o, gate/up, down
        assert {c.kind for c in diagnostics.curves} == {
            "self_attn.q_proj/k_proj/v_proj", "self_attn.o_proj", "mlp.gate_proj/up_proj", "mlp.down_proj"}
        for d in diagnostics.linears:
            assert d.rank == rank and 0 < d.output_error < 1 and d.scale_spread >= 1
            assert (d.saliency_share > rank / d.in_features) if rank else d.saliency_share == 0
        results[rank] = diagnostics
        assert Diagnostics.from_dict(diagnostics.to_dict()) == diagnostics  # stored in serq_report.json
    mean = {r: sum(d.output_error for d in results[r].linears) / len(results[r].linears) for r in results}
    assert mean[32] < mean[0]


def test_error_windows_are_checked():
    with pytest.raises(ValueError, match=r"error_windows must be in \[0, 2\]"):
        quantize_with_diagnostics(make_tiny_llama(), SERQConfig(method="rtn", format="mxfp4"),
                                  torch.randint(0, 256, (2, 16)), error_windows=3)


def test_no_error_windows_measures_no_error():
    _, diagnostics = quantize_with_diagnostics(make_tiny_llama(), SERQConfig(method="serq", format="w4a8", rank=32),
                                               torch.randint(0, 256, (2, 16)), error_windows=0)
    assert all(d.output_error is None for d in diagnostics.linears) and diagnostics.error_tokens == 0
