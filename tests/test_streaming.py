"""Layer-by-layer quantization, in memory and streamed from safetensors shards: the same
tensors, bit for bit, as quantizing the whole model at once and saving it."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import serq_ao
from serq_ao.integrations.serialization import load_quantized
from serq_ao.models import ModelLoadError
from serq_ao.passes import ResidualOrderError, analyze
from serq_ao.quant.activations import ActivationCache
from serq_ao.quant.calibration import calibrate
from serq_ao.quant.input_checks import NonFiniteError
from serq_ao.quant.config import SERQConfig
from serq_ao.quant.pipeline import quantize_model
from serq_ao.streaming import CheckpointLayers, quantize_checkpoint
from tests.conftest import make_byte_tokenizer, make_tiny_llama
from tests.passes.architectures import build

CALIBRATION = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(1))


def tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def assert_same_tensors(a, b):
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb), sorted(set(ta) ^ set(tb))[:5]
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


def save_source(model, folder):
    model.save_pretrained(folder, max_shard_size="60KB")  # several shards, a layer split across two
    make_byte_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) >= 2


def in_memory(model, config, calibration, folder, source=None, dtype=None):
    # in another dtype, the model as transformers loads it (rotary buffers stay float32)
    reference = copy.deepcopy(model) if dtype is None else AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    serq_ao.quantize_(reference, config, calibration)
    reference.save_pretrained(folder)
    return reference


CASES = {
    "serq": SERQConfig(rank=32),
    "serq+gptq": SERQConfig(rank=32, gptq=True),
    "rtn": SERQConfig(method="rtn"),
    "w4a4-preops": SERQConfig(rank=32, format="w4a4", fold_into_linears=False),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma3", "opt"])
@pytest.mark.parametrize("case", ["serq", "serq+gptq"])
def test_streamed_output_is_the_in_memory_output_bit_for_bit(arch, case, tmp_path):
    model, config = build(arch), CASES[case]
    save_source(model, tmp_path / "source")
    reference = in_memory(model, config, CALIBRATION, tmp_path / "memory")
    report, written = quantize_checkpoint(tmp_path / "source", config, CALIBRATION, tmp_path / "streamed",
                                          tokenizer=make_byte_tokenizer())
    assert_same_tensors(tmp_path / "memory", tmp_path / "streamed")
    assert len(report.linears) == len(written.packed_linears) > 0
    loaded, _ = load_quantized(tmp_path / "streamed")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, reference(IDS).logits)


@pytest.mark.parametrize("case", ["rtn", "w4a4-preops"])
def test_streamed_rtn_and_pre_op_formats(case, tmp_path):
    model, config = make_tiny_llama(), CASES[case]
    save_source(model, tmp_path / "source")
    calibration = None if case == "rtn" else CALIBRATION
    in_memory(model, config, calibration, tmp_path / "memory")
    quantize_checkpoint(tmp_path / "source", config, calibration, tmp_path / "streamed")
    assert_same_tensors(tmp_path / "memory", tmp_path / "streamed")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_streamed_in_half_precision_equals_the_half_precision_model(dtype, tmp_path):
    model = make_tiny_llama()
    save_source(model, tmp_path / "source")
    reference = in_memory(model, SERQConfig(rank=32), CALIBRATION, tmp_path / "memory", tmp_path / "source", dtype)
    quantize_checkpoint(tmp_path / "source", SERQConfig(rank=32), CALIBRATION, tmp_path / "streamed", dtype=dtype)
    assert_same_tensors(tmp_path / "memory", tmp_path / "streamed")
    loaded, _ = load_quantized(tmp_path / "streamed", dtype="auto")
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    with torch.no_grad():
        got = loaded(IDS).logits
    assert got.dtype == dtype and torch.equal(got, reference(IDS).logits)


def test_activations_spilled_to_disk_change_nothing_and_are_removed(tmp_path):
    model = make_tiny_llama()
    save_source(model, tmp_path / "source")
    config = SERQConfig(rank=32, gptq=True)
    quantize_checkpoint(tmp_path / "source", config, CALIBRATION, tmp_path / "memory")
    with ActivationCache(memory_bytes=0, folder=tmp_path / "spill") as cache:
        quantize_checkpoint(tmp_path / "source", config, CALIBRATION, tmp_path / "disk", activations=cache)
        assert cache.spilled_bytes > 0 and cache.in_memory == 0
    assert list((tmp_path / "spill").iterdir()) == []
    assert_same_tensors(tmp_path / "memory", tmp_path / "disk")


def test_activation_stream_round_trips_and_releases_its_budget(tmp_path):
    windows = [torch.randn(1, 7, 5), torch.randn(1, 7, 5, dtype=torch.float64), torch.randn(1, 7, 5).bfloat16()]
    cache = ActivationCache(memory_bytes=windows[0].numel() * 4, folder=tmp_path)
    stream = cache.stream()
    for w in windows:
        stream.append(w)
    assert len(stream) == 3 and cache.in_memory == windows[0].numel() * 4
    assert cache.spilled_bytes == sum(w.numel() * w.element_size() for w in windows[1:])
    for got, expected in zip(stream, windows):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    stream.release()
    assert cache.in_memory == 0 and len(stream) == 0
    cache.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="activation memory"):
        ActivationCache(memory_bytes=-1)


def test_only_one_decoder_layer_is_real_at_a_time(tmp_path):
    model = build("llama")
    model.config.num_hidden_layers = 2
    save_source(model, tmp_path / "source")
    seen = []
    original = CheckpointLayers.onload

    def onload(self, index, layer, device):
        others = [i for i, other in enumerate(self.layers) if i != index
                  and any(t.device.type != "meta" for t in [*other.parameters(), *other.buffers()])]
        seen.append((index, others))
        original(self, index, layer, device)

    CheckpointLayers.onload = onload
    try:
        quantize_checkpoint(tmp_path / "source", SERQConfig(rank=32), CALIBRATION, tmp_path / "out")
    finally:
        CheckpointLayers.onload = original
    assert seen == [(0, []), (1, [])]  # layer 0 was written and dropped before layer 1 was read


def test_layerwise_statistics_are_the_whole_model_forward_statistics():
    model = make_tiny_llama()
    whole = calibrate(copy.deepcopy(model), analyze(model), CALIBRATION)
    report = quantize_model(model, SERQConfig(rank=32), CALIBRATION)
    assert set(report.statistics.amax) == set(whole.amax)
    for name in whole.amax:
        assert torch.equal(report.statistics.amax[name], whole.amax[name])
        assert torch.equal(report.statistics.abs_mean[name], whole.abs_mean[name])
    assert report.statistics.tokens == whole.tokens == CALIBRATION.numel()


def test_checkpoint_problems_are_named(tmp_path):
    model = make_tiny_llama()
    save_source(model, tmp_path / "source")
    index = json.loads((tmp_path / "source" / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.0.mlp.up_proj.weight"
    shard = tmp_path / "source" / index[key]
    state = load_file(str(shard))
    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata()
    broken = dict(state)
    broken[key] = broken[key].clone()
    broken[key].view(-1)[3] = float("nan")
    save_file(broken, str(shard), metadata=metadata)
    with pytest.raises(NonFiniteError, match=r"model\.layers\.0"):
        quantize_checkpoint(tmp_path / "source", SERQConfig(rank=32), CALIBRATION, tmp_path / "a")
    save_file({k: v for k, v in state.items() if k != key}, str(shard), metadata=metadata)
    with pytest.raises(ModelLoadError, match=f"lacks '{key}'"):
        quantize_checkpoint(tmp_path / "source", SERQConfig(rank=32), CALIBRATION, tmp_path / "b")
    save_file(state, str(shard), metadata=metadata)
    with pytest.raises(ResidualOrderError, match="per_group"):
        quantize_checkpoint(tmp_path / "source", SERQConfig(rank=32, residual_order="global"), CALIBRATION,
                            tmp_path / "c")
    with pytest.raises(ValueError, match="no packed format"):
        quantize_checkpoint(tmp_path / "source", SERQConfig(method="l2qer"), CALIBRATION, tmp_path / "d")
    with pytest.raises(ValueError, match="rank"):
        quantize_checkpoint(tmp_path / "source", SERQConfig(rank=96), CALIBRATION, tmp_path / "e")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "serq_ao.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_streams_by_default_and_equals_in_memory(tmp_path):
    save_source(make_tiny_llama(), tmp_path / "source")
    common = ["--calib-windows", "3", "--calib-seqlen", "32", "--json", "--quiet"]
    streamed = run_cli("quantize", str(tmp_path / "source"), "--out", str(tmp_path / "s"), *common)
    assert streamed.returncode == 0, streamed.stderr
    whole = run_cli("quantize", str(tmp_path / "source"), "--out", str(tmp_path / "m"), "--in-memory", *common)
    assert whole.returncode == 0, whole.stderr
    assert json.loads(streamed.stdout)["streamed"] and not json.loads(whole.stdout)["streamed"]
    assert_same_tensors(tmp_path / "s", tmp_path / "m")
    reports = [json.loads((tmp_path / f / "serq_report.json").read_text()) for f in ("s", "m")]
    assert reports[0]["storage"] == reports[1]["storage"]
    assert reports[0]["diagnostics"] == reports[1]["diagnostics"]
    bad = run_cli("quantize", str(tmp_path / "source"), "--out", str(tmp_path / "x"), "--activation-memory", "-1")
    assert bad.returncode == 2 and "--activation-memory" in bad.stderr
