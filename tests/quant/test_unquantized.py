"""Weights the method does not quantize are reported, never left silently in float: the
fused expert tensors and the router of a tiny Mixtral."""

import logging

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import serq_ao
from tests.conftest import make_tiny_llama

IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))


def tiny_mixtral():
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256)
    return MixtralForCausalLM(config).eval()


def test_moe_experts_and_router_are_reported(caplog):
    model = tiny_mixtral()
    with caplog.at_level(logging.WARNING):
        report = serq_ao.quantize_model(model, serq_ao.SERQConfig(rank=32), IDS)
    experts = model.model.layers[0].mlp.experts
    expected = {
        "model.layers.*.mlp.experts.gate_up_proj": 2 * experts.gate_up_proj.numel() * 4,
        "model.layers.*.mlp.experts.down_proj": 2 * experts.down_proj.numel() * 4,
        "model.layers.*.mlp.gate.weight": 2 * model.model.layers[0].mlp.gate.weight.numel() * 4,
    }
    assert report.unquantized == expected and report.to_dict()["unquantized_bytes"] == expected
    assert "not quantized, kept in the model's dtype" in caplog.text and "mlp.experts.gate_up_proj" in caplog.text


def test_ignored_linears_are_not_reported_as_unquantized(caplog):
    report = serq_ao.quantize_model(tiny_mixtral(), serq_ao.SERQConfig(rank=32, ignore=["*.mlp.gate"]), IDS)
    assert "model.layers.*.mlp.gate.weight" not in report.unquantized
    plain = serq_ao.quantize_model(make_tiny_llama(), serq_ao.SERQConfig(rank=32), IDS)
    assert plain.unquantized == {}


def test_cli_reports_them_too(tmp_path, capsys):
    """(--in-memory: transformers saves a Mixtral under its original per-expert key names, which
    the streamed reader does not map onto the fused tensors yet; it says so and asks for it.)"""
    import json

    from serq_ao.cli.main import main
    from tests.conftest import make_byte_tokenizer

    source = tmp_path / "mixtral"
    tiny_mixtral().save_pretrained(source)
    make_byte_tokenizer().save_pretrained(source)
    argv = ["quantize", str(source), "-o", str(tmp_path / "q"), "--rank", "32", "--calib-samples", "2",
            "--calib-seqlen", "32", "--no-diagnostics", "--quiet", "--json", "--in-memory"]
    assert main(argv) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "q" / "serq_report.json").read_text())["report"]
    assert set(report["unquantized_bytes"]) == {"model.layers.*.mlp.experts.gate_up_proj",
                                                "model.layers.*.mlp.experts.down_proj", "model.layers.*.mlp.gate.weight"}
