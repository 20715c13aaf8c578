"""SERQConfig(embeddings="int8"): the input embedding table stored as int8 per row, a tied head
reading the same table; in memory, streamed, saved and reloaded, fp32 and bf16."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import serq_ao
from serq_ao.formats.int8_rows import dequantize_int8_rows, quantize_int8_rows
from serq_ao.quant.packing import storage_report
from serq_ao.streaming import quantize_checkpoint
from serq_ao.tensor_subclass import Int8RowsTensor
from tests.conftest import make_byte_tokenizer, make_tiny_llama
from tests.test_streaming import assert_same_tensors

CALIBRATION = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
CONFIG = serq_ao.SERQConfig(rank=32, embeddings="int8")


def test_int8_rows_against_float64():
    weight = torch.randn(300, 70, generator=torch.Generator().manual_seed(0)) * torch.rand(300, 1) * 3
    weight[7] = 0  # a padding row
    codes, scale = quantize_int8_rows(weight)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and codes.shape == weight.shape
    assert int(codes.abs().max()) == 127 and not bool((codes == -128).any())
    assert scale[7] == 1 and not codes[7].any()
    amax = weight.double().abs().amax(dim=1)
    # the float32 scale is max|row| / 127 rounded once; every value within half a step of it
    assert ((scale.double()[amax > 0] - amax[amax > 0] / 127).abs() <= 2**-24 * amax[amax > 0] / 127 * 2).all()
    error = (dequantize_int8_rows(codes, scale).double() - weight.double()).abs()
    assert (error <= scale.double()[:, None] * (0.5 + 2**-20)).all()
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_int8_rows(torch.tensor([[1.0, float("nan")]]))


def test_lookup_and_tied_head_use_the_same_table():
    model = make_tiny_llama()
    table = model.model.embed_tokens.weight.detach().clone()
    serq_ao.quantize_(model, CONFIG, CALIBRATION)
    weight = model.model.embed_tokens.weight
    assert isinstance(weight, Int8RowsTensor) and model.lm_head.weight is weight  # still tied, one tensor
    values = dequantize_int8_rows(weight.qdata, weight.scale)
    assert ((values - table).abs() <= weight.scale[:, None] / 2 * (1 + 2**-20)).all()
    rows = model.model.embed_tokens(IDS)
    assert rows.dtype == table.dtype and torch.equal(rows, values[IDS].to(table.dtype))
    x = torch.randn(5, table.shape[1])
    logits = model.lm_head(x)
    expected = x.double() @ weight.qdata.double().T * weight.scale.double()
    bound = 2 * (table.shape[1] + 2) * 2**-24 * (x.double().abs() @ weight.qdata.double().abs().T) * weight.scale.double()
    assert ((logits.double() - expected).abs() <= bound + 1e-30).all()
    report = storage_report(model)
    assert report.unquantized_bytes < report.model_bytes - table.numel()  # the table no longer counts as float


def test_the_head_quantized_with_quantize_lm_head_is_left_alone():
    model = make_tiny_llama()
    serq_ao.quantize_(model, serq_ao.SERQConfig(rank=32, embeddings="int8", quantize_lm_head=True), CALIBRATION)
    assert isinstance(model.model.embed_tokens.weight, Int8RowsTensor)
    assert type(model.lm_head.weight).__name__ == "SERQMXFP4Tensor"


@pytest.mark.parametrize("residual_order", ["per_group", "global"])
def test_evaluation_mode_changes_only_what_the_table_rounds(residual_order):
    """The table is quantized after the transforms (the global order folds into it): the model
    with an int8 table equals the float-table model with the table's values replaced by the
    int8 ones."""
    floats, int8 = make_tiny_llama(), make_tiny_llama()
    config = serq_ao.SERQConfig(rank=32, residual_order=residual_order)
    serq_ao.quantize_model(floats, config, CALIBRATION)
    serq_ao.quantize_model(int8, serq_ao.SERQConfig(rank=32, residual_order=residual_order, embeddings="int8"),
                           CALIBRATION)
    table = int8.model.embed_tokens.weight
    with torch.no_grad():
        floats.model.embed_tokens.weight.copy_(table.dequantize())
        expected = floats(IDS).logits
        got = int8(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_reloads_and_streams_to_the_same_tensors(dtype, tmp_path):
    make_tiny_llama().save_pretrained(tmp_path / "source", max_shard_size="60KB")
    make_byte_tokenizer().save_pretrained(tmp_path / "source")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "source", dtype=dtype)
    serq_ao.quantize_(model, CONFIG, CALIBRATION)
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path / "memory")
    quantization = json.loads((tmp_path / "memory" / "config.json").read_text())["quantization_config"]
    assert quantization["quant_type"]["default"]["_data"]["packed_embeddings"] == ["model.embed_tokens"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "memory", dtype=dtype)
    assert isinstance(back.model.embed_tokens.weight, Int8RowsTensor)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert back.model.embed_tokens.weight.dtype == dtype
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, expected)
    quantize_checkpoint(tmp_path / "source", CONFIG, CALIBRATION, tmp_path / "streamed", dtype=dtype,
                        tokenizer=make_byte_tokenizer())
    assert_same_tensors(tmp_path / "memory", tmp_path / "streamed")
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=dtype)
    with torch.no_grad():
        assert torch.equal(streamed(IDS).logits, expected)


def test_a_table_declared_but_stored_float_is_refused(tmp_path):
    from serq_ao.integrations.verify import CheckpointError

    model = make_tiny_llama()
    serq_ao.quantize_(model, serq_ao.SERQConfig(rank=32), CALIBRATION)
    model.config.quantization_config.quant_type.packed_embeddings = ["model.embed_tokens"]
    model.save_pretrained(tmp_path / "q")
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight is declared packed in only one"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_misuse_is_named():
    with pytest.raises(ValueError, match=r"embeddings must be one of \('float', 'int8'\), got 'int4'"):
        serq_ao.SERQConfig(embeddings="int4")
    with pytest.raises(ValueError, match="embeddings='int8' stores the table packed, and method 'lqer'"):
        serq_ao.SERQConfig(method="lqer", embeddings="int8")


def test_cli_flag(tiny_model_dir, tmp_path):
    from serq_ao.cli.main import main

    argv = ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "q"), "--rank", "32", "--calib-samples", "2",
            "--calib-seqlen", "32", "--no-diagnostics", "--quiet", "--embeddings", "int8"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "q" / "serq_report.json").read_text())["report"]
    assert report["config"]["embeddings"] == "int8"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(back.model.embed_tokens.weight, Int8RowsTensor)


def test_compiles_exports_and_generates_with_the_int8_table(tmp_path):
    from tests.quant.test_packed_model import Logits

    model = make_tiny_llama()
    serq_ao.quantize_(model, CONFIG, CALIBRATION)
    with torch.no_grad():
        expected = model(IDS, use_cache=False).logits
    explanation = torch._dynamo.explain(Logits(model))(IDS)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(Logits(model), fullgraph=True)(IDS)
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=1e-4)
    program = torch.export.export(Logits(model), (IDS,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("serq.linear_int8_weights" in t for t in targets) == 1  # the tied head
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(torch._inductor.aoti_load_package(path)(IDS), expected, rtol=1e-4, atol=1e-4)
        steps = model.generate(IDS[:, :8], max_new_tokens=6, do_sample=False, pad_token_id=0,
                               return_dict_in_generate=True, output_logits=True)
        full = model(steps.sequences, use_cache=False).logits
    for k, step in enumerate(steps.logits):  # the cached steps equal the whole sequence's logits
        torch.testing.assert_close(step, full[:, 7 + k], rtol=1e-4, atol=1e-4)
