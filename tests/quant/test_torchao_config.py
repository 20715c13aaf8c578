"""SERQLinearConfig through torchao's own quantize_ (a registered handler)."""

import json

import pytest
import torch
from torch import nn
from torchao.quantization import FqnToConfig, quantize_

from serq_ao import SERQLinearConfig
from serq_ao.quant.reconstruct import flattening_scales, saliency_order, serq_reconstruct
from serq_ao.formats import get_format
from serq_ao.tensor_subclass import SERQIntTensor, SERQMXFP4Tensor


def naive(linear, amax, rank, fmt):
    """SERQ on a lone linear written out: divide, gather, quantize, two matmuls."""
    scales = flattening_scales(amax)
    perm = saliency_order(scales)
    quant_format = get_format(fmt)
    main, correction = serq_reconstruct((linear.weight.detach() * scales)[:, perm], rank, quant_format)
    main = main.dequantize()
    correction = None if correction is None else correction.dequantize()

    def forward(x):
        # times 1/s, as every pre-op in serq_ao: x / s differs in the last bit, which
        # occasionally moves an activation across an INT8 rounding boundary
        x_q = quant_format.fake_quantize_activation((x * (1 / scales))[..., perm])
        y = x_q @ main.T + linear.bias.detach()
        return y if correction is None else y + x_q[..., :rank] @ correction.T

    return forward


@pytest.mark.parametrize("fmt, rank", [("mxfp4", 64), ("w4a8", 32), ("w4a4", 0)])
def test_lone_linear_matches_the_method_written_out(fmt, rank):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(160, 48)
    x = torch.randn(64, 160, generator=g) * torch.logspace(-1, 1, 160)  # channels of very different sizes
    amax = x.abs().amax(dim=0)
    expected = naive(linear, amax, rank, fmt)(x)
    model = nn.Sequential(linear)
    quantize_(model, SERQLinearConfig(input_amax=amax, rank=rank, format=fmt))
    assert isinstance(model[0].weight, SERQMXFP4Tensor if fmt == "mxfp4" else SERQIntTensor)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_each_linear_gets_its_own_statistics_through_fqn_to_config():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    x = torch.randn(32, 64, generator=g)
    amax_0 = x.abs().amax(0)
    amax_2 = model[1](model[0](x)).abs().amax(0).detach()
    first, second = naive(model[0], amax_0, 32, "mxfp4"), naive(model[2], amax_2, 32, "mxfp4")
    with torch.no_grad():
        expected = second(torch.relu(first(x)))
    quantize_(model, FqnToConfig({"0": SERQLinearConfig(input_amax=amax_0, rank=32),
                                  "2": SERQLinearConfig(input_amax=amax_2, rank=32)}), filter_fn=None)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt, weight_scales, rotation, strength, unit",
                         [("mxfp4", "search", 32, 1.0, "channel"), ("w4a8", "rule", 128, 1.0, "channel"),
                          ("mxfp4", "rule", 32, 0.0, "block"), ("w4a4", "rule", 0, 0.5, "channel"),
                          ("w4a8", "rule", 64, 0.0, "block"), ("w4a8", "search", 128, 0.0, "block")])
def test_lone_linear_with_rotation_and_weight_scales_matches_the_method_written_out(fmt, weight_scales, rotation,
                                                                                    strength, unit):
    from tests.quant.test_saliency_unit import brute_force_block_order

    from serq_ao.formats.hadamard import block_hadamard

    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(160, 48)
    x = torch.randn(64, 160, generator=g) * torch.logspace(-1, 1, 160)
    amax = x.abs().amax(dim=0)
    scales = flattening_scales(amax, strength)
    if unit == "block":
        perm = torch.tensor(brute_force_block_order(amax.tolist(), rotation))
    else:
        perm = torch.argsort(amax, descending=True, stable=True)  # by max |x| at any strength
    quant_format = get_format(fmt, "floor", weight_scales)
    rotated = block_hadamard(((linear.weight.detach() * scales)[:, perm]).double(), rotation).float()  # W~[:, pi] H
    main, correction = serq_reconstruct(rotated, 32, quant_format)
    x_q = quant_format.fake_quantize_activation(block_hadamard((x * (1 / scales))[..., perm], rotation))
    expected = x_q @ main.dequantize().T + linear.bias.detach() + x_q[..., :32] @ correction.dequantize().T
    model = nn.Sequential(linear)
    quantize_(model, SERQLinearConfig(input_amax=amax, rank=32, format=fmt, weight_scales=weight_scales,
                                      rotation=rotation, flattening_strength=strength,
                                      saliency_unit=unit))
    assert model[0].weight.rotation == rotation
    with torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-5)
    from serq_ao.integrations.torchao_route import model_config_of

    config = model_config_of([SERQLinearConfig(input_amax=amax, rank=32, format=fmt, weight_scales=weight_scales,
                                               rotation=rotation, flattening_strength=strength, saliency_unit=unit)])
    assert (config.rotation, str(config.weight_scales), config.flattening_strength, str(config.saliency_unit)) == (
        rotation, weight_scales, strength, unit)
    with pytest.raises(ValueError, match=r"flattening_strength must be a number in \[0, 1\]"):
        SERQLinearConfig(input_amax=amax, rank=32, flattening_strength=2)
    with pytest.raises(ValueError, match="saliency_unit='block' moves the blocks of a rotation"):
        SERQLinearConfig(input_amax=amax, rank=32, saliency_unit="block")


def test_config_serializes_to_json():
    config = SERQLinearConfig(input_amax=torch.rand(40), rank=32, format="w4a8")
    back = SERQLinearConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back.input_amax == config.input_amax and back.rank == 32 and back.format == "w4a8"
    # and through torchao's own encoding, which transformers' TorchAoConfig uses
    from torchao.core.config import config_from_dict, config_to_dict

    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=32), "needs input_amax"),
    (dict(input_amax=torch.rand(8), rank=48), "multiple of 32"),
    (dict(input_amax=torch.rand(8), format="int4"), "format must be one of"),
    (dict(input_amax=torch.rand(8), scale_mode="even"), "scale_mode must be one of"),
    (dict(input_amax=torch.rand(2, 8)), "1-D"),
    (dict(input_amax=torch.tensor([1.0, float("nan")])), "finite"),
    (dict(input_amax=torch.rand(8), rotation=16), "rotation must be one of"),
    (dict(input_amax=torch.rand(8), weight_scales="best"), "weight_scales must be one of"),
])
def test_bad_configs_are_refused_when_made(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SERQLinearConfig(**kwargs)


def test_statistics_of_the_wrong_width_and_too_large_a_rank_are_refused():
    with pytest.raises(ValueError, match=r"input_amax must have shape \(64,\)"):
        quantize_(nn.Sequential(nn.Linear(64, 8)), SERQLinearConfig(input_amax=torch.rand(32), rank=0))
    with pytest.raises(ValueError, match="at most the linear's in_features"):
        quantize_(nn.Sequential(nn.Linear(64, 8)), SERQLinearConfig(input_amax=torch.rand(64), rank=96))


# ---- transformers' TorchAoConfig route: quantize on load, save, reload --------------------------

IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(4))


def hf_logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torchao_config_quantizes_on_load_saves_and_reloads_to_identical_logits(tiny_model_dir, tmp_path, dtype):
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from serq_ao.tensor_subclass import PACKED_TENSOR_CLASSES

    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=dtype, quantization_config=TorchAoConfig(SERQLinearConfig(rank=0)))
    linears = {n: m for n, m in quantized.named_modules() if isinstance(m, nn.Linear)}
    packed = {n for n, m in linears.items() if isinstance(m.weight, PACKED_TENSOR_CLASSES)}
    assert packed and all(linears[n].weight.dtype == dtype for n in packed)
    float_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    assert not torch.equal(hf_logits(quantized), hf_logits(float_model))  # it did quantize
    quantized.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_type"]["default"]["_type"] == "serq_ao.SERQCheckpointConfig"
    assert sorted(config["quant_type"]["default"]["_data"]["packed_linears"]) == sorted(packed)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert torch.equal(hf_logits(reloaded), hf_logits(quantized))
    assert reloaded.serq_config.method == "rtn" and reloaded.serq_config.format == "mxfp4"


def test_torchao_config_with_per_linear_statistics_saves_and_reloads(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from serq_ao.tensor_subclass import SERQIntTensor

    g = torch.Generator().manual_seed(5)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    amax = {names[0]: torch.rand(64, generator=g) + 0.1, names[1]: torch.rand(128, generator=g) + 0.1}
    config = TorchAoConfig(FqnToConfig({n: SERQLinearConfig(input_amax=a, rank=32, format="w4a8")
                                        for n, a in amax.items()}))
    quantized = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config)
    for name in names:
        weight = quantized.get_submodule(name).weight
        assert isinstance(weight, SERQIntTensor) and weight.rank == 32 and weight.input_perm is not None
    quantized.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(hf_logits(reloaded), hf_logits(quantized))
    assert reloaded.serq_config.method == "serq" and reloaded.serq_config.rank == 32


@pytest.mark.parametrize("entries, message", [
    ({"a": SERQLinearConfig(rank=0), "b": SERQLinearConfig(rank=0, format="w4a8")}, "must agree on format"),
    ({"a": SERQLinearConfig(rank=0), "b": "int4"}, "mixes SERQLinearConfig with Int4WeightOnlyConfig"),
])
def test_torchao_config_that_no_one_folder_could_describe_is_refused_before_loading(tiny_model_dir, entries, message):
    from torchao.quantization import Int4WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    entries = {k: Int4WeightOnlyConfig() if v == "int4" else v for k, v in entries.items()}
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=TorchAoConfig(FqnToConfig(entries)))


def test_other_torchao_configs_still_go_to_torchao(tiny_model_dir):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    from serq_ao.integrations.torchao_route import TorchAoOrSERQHfQuantizer

    config = TorchAoConfig(Int8WeightOnlyConfig())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config)
    assert type(model.hf_quantizer) is TorchAoOrSERQHfQuantizer and isinstance(model.hf_quantizer, TorchAoHfQuantizer)
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
