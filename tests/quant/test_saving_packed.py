"""Packed models saved and reloaded: torch.save, safetensors, save_pretrained / from_pretrained."""

import copy
import io
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, TorchAoConfig

import serq_ao
from serq_ao.quant.config import SERQConfig
from serq_ao.integrations.checkpoint_config import SERQCheckpointConfig
from serq_ao.integrations.hf_quantizer import SERQHfConfig
from serq_ao.passes import OutputGather
from serq_ao.integrations.serialization import load_quantized, save_quantized
from serq_ao.tensor_subclass import PACKED_TENSOR_CLASSES, SERQIntTensor, SERQMXFP4Tensor
from serq_ao.tensor_subclass.flatten import flatten_state_dict, unflatten_state_dict
from tests.conftest import make_tiny_llama

CALIBRATION = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
CONFIGS = {
    "mxfp4": SERQConfig(rank=32),
    "w4a4-preops": SERQConfig(rank=32, format="w4a4", fold_into_linears=False),
}


def logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def packed(request):
    model = make_tiny_llama()
    serq_ao.quantize_(model, CONFIGS[request.param], CALIBRATION)
    return model


def packed_weights(model):
    return {n: p for n, p in model.named_parameters() if isinstance(p, PACKED_TENSOR_CLASSES)}


def test_save_pretrained_then_from_pretrained_gives_identical_logits(packed, tmp_path):
    packed.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    # torchao's method, so that a process without serq_ao refuses the folder by name
    assert config["quant_method"] == "torchao"
    assert config["quant_type"]["default"]["_type"] == "serq_ao.SERQCheckpointConfig"
    assert config["quant_type"]["default"]["_data"]["format_version"] == 4
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert torch.equal(logits(loaded), logits(packed))
    assert packed_weights(loaded).keys() == packed_weights(packed).keys()
    for name, weight in packed_weights(loaded).items():
        assert type(weight) is type(packed_weights(packed)[name]) and not weight.requires_grad
    assert isinstance(loaded.model.layers[0].input_layernorm, OutputGather)
    assert loaded.serq_config == packed.serq_config
    # a loaded model saves again, to the same thing
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(logits(again), logits(packed))


def test_from_pretrained_in_bfloat16_runs_the_packed_weights_in_bfloat16(packed, tmp_path):
    packed.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    weight = next(iter(packed_weights(loaded).values()))
    assert weight.dtype == torch.bfloat16 and weight.qdata.dtype == torch.uint8
    assert weight.scale.dtype == packed_weights(packed)[next(iter(packed_weights(loaded)))].scale.dtype  # not cast
    out = logits(loaded)
    assert out.dtype == torch.bfloat16
    reference, unquantized = logits(packed), logits(make_tiny_llama())
    # bf16 moves activations across 4-bit rounding boundaries (folded norm weights are bf16
    # too), so it adds error of its own; it must stay below the quantization error itself
    bf16_error = (out.float() - reference).norm() / reference.norm()
    assert bf16_error < (reference - unquantized).norm() / unquantized.norm()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_quantized_in_half_precision_saves_and_reloads_bitwise(dtype, tmp_path):
    # loaded in half precision as a user's checkpoint would be (model.to(dtype) would also
    # cast the rotary inv_freq buffer, which from_pretrained keeps in fp32)
    make_tiny_llama().save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=dtype)
    serq_ao.quantize_(model, SERQConfig(rank=32, gptq=True), CALIBRATION)
    assert {w.dtype for w in packed_weights(model).values()} == {dtype}
    model.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # the checkpoint's dtype
    assert loaded.dtype == dtype and {w.dtype for w in packed_weights(loaded).values()} == {dtype}
    assert torch.equal(logits(loaded), logits(model))


def test_safetensors_round_trip(packed, tmp_path):
    tensors, metadata = flatten_state_dict(packed.state_dict())
    assert not any(isinstance(t, PACKED_TENSOR_CLASSES) for t in tensors.values())
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items() if k != "lm_head.weight"}, path, metadata=metadata)
    with safe_open(path, framework="pt") as handle:
        state = unflatten_state_dict(load_file(path), handle.metadata())
    fresh = copy.deepcopy(packed)
    fresh.load_state_dict(state, assign=True, strict=False)
    fresh.tie_weights()
    assert torch.equal(logits(fresh), logits(packed))
    for name, weight in packed_weights(fresh).items():
        assert weight is not packed_weights(packed)[name]
        assert torch.equal(weight.qdata, packed_weights(packed)[name].qdata)


def test_torch_save_and_load_weights_only(packed):
    buffer = io.BytesIO()
    torch.save(packed.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    kinds = {type(v) for v in state.values()}
    assert kinds & {SERQMXFP4Tensor, SERQIntTensor}
    fresh = copy.deepcopy(packed)
    fresh.load_state_dict(state, assign=True)
    assert torch.equal(logits(fresh), logits(packed))


def test_save_quantized_writes_the_packed_folder_atomically(packed, tmp_path, byte_tokenizer):
    out = save_quantized(packed, byte_tokenizer, tmp_path / "q", packed.serq_config, {"source": "tiny"})
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
    model, tokenizer = load_quantized(out)
    assert torch.equal(logits(model), logits(packed)) and tokenizer is not None
    assert json.loads((out / "serq_report.json").read_text()) == {"source": "tiny"}


def test_a_float_checkpoint_cannot_be_quantized_by_from_pretrained(tiny_model_dir):
    with pytest.raises(ValueError, match="cannot quantize a float model.*SERQLinearConfig"):
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=SERQHfConfig())
    with pytest.raises(ValueError, match="cannot quantize a float model.*SERQLinearConfig"):
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=TorchAoConfig(SERQCheckpointConfig()))


def test_an_unknown_format_version_is_refused():
    with pytest.raises(ValueError, match="quantization format"):
        SERQHfConfig(format_version=99)
    with pytest.raises(ValueError, match="quantization format"):
        SERQCheckpointConfig(format_version=3)


def test_a_format_3_folder_still_loads(packed, tmp_path):
    """Folders written before the torchao method (quant_method "serq") load as they did."""
    packed.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    fields = config["quantization_config"]["quant_type"]["default"]["_data"]
    config["quantization_config"] = {"quant_method": "serq", **fields, "format_version": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(loaded), logits(packed))


def test_a_folder_saved_without_its_tokenizer(tmp_path, capsys):
    """save_pretrained alone writes no tokenizer: load_quantized gives the model and None, the
    CLI (which needs one) says so in one line instead of a transformers traceback."""
    from serq_ao.cli.main import main

    model = make_tiny_llama()
    serq_ao.quantize_(model, SERQConfig(rank=32), CALIBRATION)
    model.save_pretrained(tmp_path / "q")
    back, tokenizer = load_quantized(tmp_path / "q")
    assert tokenizer is None
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, model(IDS).logits)
    capsys.readouterr()  # what saving printed (transformers' shard bar) is not the CLI's
    # --quiet: on a non-terminal stderr (pytest's capture) the CLI prints plain progress lines
    assert main(["inspect", str(tmp_path / "q"), "--quiet"]) == 2  # as for a float folder without one
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no tokenizer" in err[0] and "tokenizer.save_pretrained" in err[0]
