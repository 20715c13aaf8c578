"""SERQConfig(quantize_lm_head=True): the output head is quantized as a last stage, a tied head
untied first; in memory, streamed, saved and reloaded, fp32 and bf16."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import serq_ao
from serq_ao.passes import analyze
from serq_ao.quant.calibration import calibrate
from serq_ao.quant.lm_head import HeadError
from serq_ao.streaming import quantize_checkpoint
from tests.conftest import make_byte_tokenizer, make_tiny_llama
from tests.quant.test_experts import tiny_mixtral
from tests.test_streaming import assert_same_tensors, in_memory

CALIBRATION = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
CONFIG = serq_ao.SERQConfig(rank=32, quantize_lm_head=True)


def head_input_amax(model) -> torch.Tensor:
    """max |x| of lm_head's input over the calibration windows, from the float model, float64."""
    seen = []
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].double().abs()))
    with torch.no_grad():
        for window in CALIBRATION:
            model(window[None], use_cache=False)
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).amax(dim=0)


@pytest.mark.parametrize("residual_order", ["per_group", "global"])
def test_the_head_transform_is_exact_and_leaves_hidden_states_alone(residual_order):
    model = make_tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        expected = model(IDS, output_hidden_states=True)
    config = serq_ao.SERQConfig(rank=32, quantize_lm_head=True, residual_order=residual_order)
    plans = serq_ao.transform_model(model, config, CALIBRATION)
    assert "lm_head" in plans and plans["lm_head"].has_pre_op
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    with torch.no_grad():
        got = model(IDS, output_hidden_states=True)
    assert (got.logits - expected.logits).abs().max() <= 1e-5 * expected.logits.abs().max()
    if residual_order == "per_group":  # the final norm's output, as the model returns it, is untouched
        assert torch.equal(model.model.embed_tokens.weight, embeddings)
        torch.testing.assert_close(got.hidden_states[-1], expected.hidden_states[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gptq", [False, True])
def test_the_head_is_quantized_with_statistics_of_its_float_input(gptq):
    model = make_tiny_llama()
    reference = copy.deepcopy(model)
    report = serq_ao.quantize_model(model, serq_ao.SERQConfig(rank=32, gptq=gptq, quantize_lm_head=True),
                                    CALIBRATION)
    assert report.linears[-1].name == "lm_head" and report.linears[-1].rank == 32
    torch.testing.assert_close(report.statistics.amax["lm_head"].double(), head_input_amax(reference),
                               rtol=1e-6, atol=0)
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    with torch.no_grad():
        expected, got = reference(IDS).logits, model(IDS).logits
    without_head = copy.deepcopy(reference)
    serq_ao.quantize_model(without_head, serq_ao.SERQConfig(rank=32, gptq=gptq), CALIBRATION)
    with torch.no_grad():
        baseline = without_head(IDS).logits
    assert not torch.equal(got, baseline)  # the head did change
    assert (got - expected).norm() < 0.5 * expected.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_head_saves_reloads_and_streams_to_the_same_tensors(dtype, tmp_path):
    make_tiny_llama().save_pretrained(tmp_path / "source", max_shard_size="60KB")
    make_byte_tokenizer().save_pretrained(tmp_path / "source")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "source", dtype=dtype)
    serq_ao.quantize_(model, CONFIG, CALIBRATION)
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path / "memory")
    assert json.loads((tmp_path / "memory" / "config.json").read_text())["tie_word_embeddings"] is False
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "memory", dtype=dtype)
    assert type(back.lm_head.weight).__name__ == "SERQMXFP4Tensor"
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, expected)
    quantize_checkpoint(tmp_path / "source", CONFIG, CALIBRATION, tmp_path / "streamed", dtype=dtype,
                        tokenizer=make_byte_tokenizer())
    assert_same_tensors(tmp_path / "memory", tmp_path / "streamed")


def test_an_untied_head_of_a_moe_model_streams_too(tmp_path):
    model = tiny_mixtral()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "source")
    in_memory(model, CONFIG, CALIBRATION, tmp_path / "memory")
    quantize_checkpoint(tmp_path / "source", CONFIG, CALIBRATION, tmp_path / "streamed",
                        tokenizer=make_byte_tokenizer())
    assert_same_tensors(tmp_path / "memory", tmp_path / "streamed")


def test_evaluation_mode_head_saves_and_reloads(tmp_path):
    from serq_ao.integrations.serialization import load_quantized, save_quantized

    model = make_tiny_llama()
    config = serq_ao.SERQConfig(method="l2qer", quantize_lm_head=True)
    report = serq_ao.quantize_model(model, config, CALIBRATION)
    assert report.linears[-1].name == "lm_head"
    with torch.no_grad():
        expected = model(IDS).logits
    save_quantized(model, make_byte_tokenizer(), tmp_path / "q", config)
    back, _ = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, expected)


def test_misuse_is_named():
    with pytest.raises(ValueError, match="quantize_lm_head must be True or False"):
        serq_ao.SERQConfig(quantize_lm_head="yes")
    model = make_tiny_llama()
    statistics = calibrate(model, analyze(model), CALIBRATION)
    with pytest.raises(HeadError, match="quantize_lm_head: the statistics given cover the decoder layers only"):
        serq_ao.quantize_model(model, CONFIG, statistics)
    model = make_tiny_llama()
    model.lm_head = torch.nn.Identity()
    with pytest.raises(HeadError, match="quantize_lm_head: LlamaForCausalLM has no nn.Linear output head"):
        serq_ao.quantize_model(model, CONFIG, CALIBRATION)


def test_cli_flag(tiny_model_dir, tmp_path, capsys):
    from serq_ao.cli.main import main

    argv = ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "q"), "--rank", "32", "--calib-samples", "2",
            "--calib-seqlen", "32", "--no-diagnostics", "--quiet", "--quantize-lm-head"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "q" / "serq_report.json").read_text())["report"]
    assert report["config"]["quantize_lm_head"] is True and report["linears"][-1]["name"] == "lm_head"
    assert main(["compare", str(tiny_model_dir), "--methods", "fp", "--quantize-lm-head"]) == 2
    assert "--quantize-lm-head" in capsys.readouterr().err
