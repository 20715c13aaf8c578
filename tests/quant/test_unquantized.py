"""Weights the method does not quantize are reported, never left silently in float: a MoE
router (a bare parameter), and the experts of a layout serq does not unfuse (GPT-OSS:
interleaved gate/up, transposed, with biases). Experts of the common layout are quantized
(tests/quant/test_experts.py)."""

import json
import logging

import torch
from transformers import GptOssConfig, GptOssForCausalLM

import serq_ao
from tests.conftest import make_tiny_llama
from tests.quant.test_experts import tiny_mixtral

IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))


def tiny_gpt_oss():
    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=257, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=256, sliding_window=16,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return GptOssForCausalLM(config).eval()


def test_router_and_experts_of_another_layout_are_reported(caplog):
    model = tiny_gpt_oss()
    with caplog.at_level(logging.WARNING):
        report = serq_ao.quantize_model(model, serq_ao.SERQConfig(rank=32), IDS)
    mlp = model.model.layers[0].mlp
    expected = {
        "model.layers.*.mlp.router.weight": 2 * mlp.router.weight.numel() * 4,
        "model.layers.*.mlp.experts.gate_up_proj": 2 * mlp.experts.gate_up_proj.numel() * 4,
        "model.layers.*.mlp.experts.gate_up_proj_bias": 2 * mlp.experts.gate_up_proj_bias.numel() * 4,
        "model.layers.*.mlp.experts.down_proj": 2 * mlp.experts.down_proj.numel() * 4,
        "model.layers.*.mlp.experts.down_proj_bias": 2 * mlp.experts.down_proj_bias.numel() * 4,
    }
    assert report.unquantized == expected and report.to_dict()["unquantized_bytes"] == expected
    assert "not quantized, kept in the model's dtype" in caplog.text and "mlp.experts.gate_up_proj" in caplog.text
    assert {r.name.rsplit(".", 1)[1] for r in report.linears} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_ignored_linears_are_not_reported_as_unquantized():
    report = serq_ao.quantize_model(tiny_mixtral(), serq_ao.SERQConfig(rank=32, ignore=["*.mlp.gate"]), IDS)
    assert "model.layers.*.mlp.gate.weight" not in report.unquantized
    plain = serq_ao.quantize_model(make_tiny_llama(), serq_ao.SERQConfig(rank=32), IDS)
    assert plain.unquantized == {}


def test_cli_reports_them_too(tmp_path, capsys):
    """Streamed from the folder transformers writes (Mixtral under its original per-expert
    names): the experts are quantized, the router is reported."""
    from serq_ao.cli.main import main
    from tests.conftest import make_byte_tokenizer

    source = tmp_path / "mixtral"
    tiny_mixtral().save_pretrained(source)
    make_byte_tokenizer().save_pretrained(source)
    argv = ["quantize", str(source), "-o", str(tmp_path / "q"), "--rank", "32", "--calib-samples", "2",
            "--calib-seqlen", "32", "--no-diagnostics", "--quiet", "--json"]
    assert main(argv) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "q" / "serq_report.json").read_text())["report"]
    assert set(report["unquantized_bytes"]) == {"model.layers.*.mlp.gate.weight"}
    assert any(r["name"] == "model.layers.1.mlp.experts.3.down_proj" for r in report["linears"])
