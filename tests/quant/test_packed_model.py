"""serq_ao.quantize_: a tiny model with packed weights computes what the evaluation mode
computes, and compiles, exports and generates like any transformers model."""

import copy

import pytest
import torch
from torch import nn

import serq_ao
from serq_ao.quant.config import SERQConfig
from serq_ao.quant.packing import is_packed_linear, pack_model, storage_report
from serq_ao.quant.pipeline import quantize_model
from serq_ao.quant.fake_quant import FakeQuantLinear
from serq_ao.tensor_subclass import SERQIntTensor, SERQMXFP4Tensor
from tests.conftest import make_tiny_llama

CALIBRATION = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))


class Logits(nn.Module):
    """The logits of a causal LM without a cache: one tensor in, one out (export, AOTI)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids, use_cache=False).logits


def quantized_pair(config, dtype=torch.float32):
    """(evaluation-mode model, packed model) quantized from the same tiny Llama in ``dtype``."""
    simulated = make_tiny_llama().to(dtype)
    quantize_model(simulated, config, CALIBRATION)
    packed = pack_model(copy.deepcopy(simulated))
    return simulated, packed


@pytest.fixture(scope="module")
def mxfp4_pair():
    return quantized_pair(SERQConfig(rank=32))


@pytest.fixture(scope="module", params=["mxfp4", "w4a8"])
def any_pair(request, mxfp4_pair):
    return mxfp4_pair if request.param == "mxfp4" else quantized_pair(SERQConfig(rank=32, format="w4a8"))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [
    SERQConfig(rank=32),
    SERQConfig(rank=32, format="w4a8"),
    SERQConfig(rank=32, format="w4a4", fold_into_linears=False),
    SERQConfig(method="smoothquant", format="mxfp4", scale_mode="rceil"),
    SERQConfig(method="rtn", format="w4a4"),
    SERQConfig(rank=32, gptq=True),
    SERQConfig(rank=32, format="w4a8", weight_scales="search", gptq=True),
])
def test_packed_model_matches_evaluation_mode_bitwise(config, dtype, reference_kernels):
    simulated, packed = quantized_pair(config, dtype)
    assert not any(isinstance(m, FakeQuantLinear) for m in packed.modules())
    kind = SERQMXFP4Tensor if config.format == "mxfp4" else SERQIntTensor
    packed_linears = [m for m in packed.modules() if is_packed_linear(m)]
    assert len(packed_linears) == 14 and all(isinstance(m.weight, kind) for m in packed_linears)
    assert all(m.weight.dtype == dtype for m in packed_linears)  # the model's dtype
    # every linear computes in fp32 through the same functions in both modes, and the rest of
    # the model is the same module code: the logits agree bit for bit in every dtype
    expected, got = logits(simulated), logits(packed)
    assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [SERQConfig(rank=32), SERQConfig(rank=32, format="w4a8"),
                                    SERQConfig(rank=32, format="w4a4", rotation=64)])
def test_packed_model_on_the_native_kernels_is_close_to_the_evaluation_mode(config, dtype):
    # Each linear is within the derived bound of the reference (tests/kernels); through a model
    # an activation code can flip where a value sits on a rounding threshold, so the model-level
    # check is statistical: the logits agree to a small fraction of their spread, and the
    # predicted tokens agree
    simulated, packed = quantized_pair(config, dtype)
    expected, got = logits(simulated).float(), logits(packed).float()
    assert (got - expected).norm() <= 1e-3 * expected.norm()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95


def test_quantize_packs_and_records_the_config():
    model = make_tiny_llama()
    config = SERQConfig(rank=32)
    report = serq_ao.quantize_(model, config, CALIBRATION)
    assert model.serq_config == config and len(report.linears) == 14
    assert sum(is_packed_linear(m) for m in model.modules()) == 14


def test_a_quantized_model_is_not_quantized_again(mxfp4_pair):
    for model in mxfp4_pair:
        with pytest.raises(ValueError, match="already quantized"):
            serq_ao.quantize_(model, SERQConfig(rank=32), CALIBRATION)


def test_lowrank_methods_are_refused_before_any_work():
    model = make_tiny_llama()
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(ValueError, match="no packed format"):
        serq_ao.quantize_(model, SERQConfig(method="lqer"), CALIBRATION)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_storage_report_stays_within_the_mxfp4_budget(mxfp4_pair):
    _, packed = mxfp4_pair
    report = storage_report(packed)
    assert len(report.linears) == 14
    for linear in report.linears:
        weight_bits = linear.bits_per_weight - linear.pre_op_bits_per_weight
        assert weight_bits <= 4.25 * (1 + linear.rank / linear.in_features) + 1e-9
        if "o_proj" in linear.name:  # GQA: the attention group keeps its pre-op (1/s fp32, pi int16)
            assert linear.pre_op_bits_per_weight == pytest.approx((32 + 16) / linear.out_features)
        else:
            assert linear.pre_op_bits_per_weight == 0
    dense = sum(p.numel() * 4 for p in make_tiny_llama().parameters())
    assert report.unquantized_bytes < report.model_bytes < dense


def test_compiles_fullgraph_without_graph_breaks(any_pair):
    _, packed = any_pair
    explanation = torch._dynamo.explain(Logits(packed))(IDS)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(Logits(packed), fullgraph=True)(IDS)
    assert torch.allclose(compiled, logits(packed), rtol=1e-4, atol=1e-4)


def test_exports_one_op_per_linear_and_runs_through_aoti(any_pair, tmp_path):
    _, packed = any_pair
    program = torch.export.export(Logits(packed), (IDS,))
    serq_nodes = [n for n in program.graph.nodes if n.op == "call_function" and "serq.linear" in str(n.target)]
    assert len(serq_nodes) == 14
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        assert torch.allclose(runner(IDS), logits(packed), rtol=1e-4, atol=1e-4)


def test_generate_with_kv_cache_and_left_padding_matches_evaluation_mode(mxfp4_pair):
    simulated, packed = mxfp4_pair
    ids = IDS[:, :12].clone()
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0  # the shorter prompt, left padded
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        expected = simulated.generate(ids, **kwargs)
        got = packed.generate(ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for step_got, step_expected in zip(got.logits, expected.logits):
        assert torch.allclose(step_got, step_expected, rtol=1e-5, atol=1e-5)
