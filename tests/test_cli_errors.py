"""Every unclear case of issue 13, through the command line: one line naming the option or
the file, exit 2, no traceback, nothing written."""

import pytest

from serq_ao.cli.main import main
from tests.conftest import make_byte_tokenizer, make_tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-models")
    make_tiny_llama().save_pretrained(root / "no-tokenizer")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=257)).save_pretrained(root / "gpt2")
    make_byte_tokenizer().save_pretrained(root / "gpt2")
    make_tiny_llama().save_pretrained(root / "truncated")
    make_byte_tokenizer().save_pretrained(root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "empty.gguf").write_bytes(b"")
    (root / "random.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    import gguf

    writer = gguf.GGUFWriter(str(root / "header-only.gguf"), "llama")  # a valid header, no tensors
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return root


CALIB = ["--calib-windows", "2", "--calib-seqlen", "32"]


@pytest.mark.parametrize("argv, message", [
    (["quantize", "{q}", "--out", "{tmp}/o", *CALIB], "is already quantized (a serq output): quantize the float model"),
    (["compare", "{q}", "--methods", "fp,rtn", "--windows", "1", "--seqlen", "16"], "is already quantized"),
    (["quantize", "{bad}/gpt2", "--out", "{tmp}/o", *CALIB], "its projections are Conv1D modules"),
    (["quantize", "{bad}/no-tokenizer", "--out", "{tmp}/o"], "has no tokenizer"),
    (["quantize", "{bad}/truncated", "--out", "{tmp}/o"], "cannot load the model (Error while deserializing header"),
    (["eval", "ppl", "{bad}/empty.gguf"], "empty.gguf: not a GGUF model transformers can convert"),
    (["eval", "ppl", "{bad}/random.gguf"], "random.gguf: not a GGUF model transformers can convert"),
    (["eval", "ppl", "{bad}/header-only.gguf"], "header-only.gguf: not a GGUF model transformers can convert"),
    (["quantize", "{m}", "--out", "{tmp}/o", "--method", "rtn", "--rank", "64"], "--rank applies to method serq only"),
    (["quantize", "{m}", "--out", "{tmp}/o", "--format", "w4a8", "--scale-mode", "rceil"],
     "--scale-mode applies to the MXFP4 format only"),
    (["quantize", "{m}", "--out", "{tmp}/o", "--method", "smoothquant", "--residual-order", "global"],
     "--residual-order applies to method serq only"),
    (["compare", "{m}", "--methods", "fp,rtn", "--rank", "32"], "--rank applies to method serq only"),
    (["compare", "{m}", "--methods", "fp", "--gptq"], "--methods fp quantizes nothing"),
    (["compare", "{m}", "--methods", "fp", "--embeddings", "int8"], "--quantize-lm-head and --embeddings"),
    (["quantize", "{m}", "--out", "{tmp}/o", "--calib-windows", "1", "--error-windows", "2"],
     "--error-windows (2) must be at most --calib-samples (1)"),
    (["quantize", "{m}", "--out", "{tmp}/o", "--calib-windows", "2", "--calib-seqlen", "600"],
     "--calib-seqlen needs 601 positions per sequence, the model has max_position_embeddings 512"),
    (["eval", "ppl", "{m}", "--seqlen", "4096", "--windows", "1"], "--seqlen needs 4097 positions"),
    (["export", "{q}", "--out", "{tmp}/m.pt2", "--seqlen", "100000"], "--seqlen needs 100000 positions"),
    (["bench", "{q}", "--prefill", "1000000", "--decode", "1"], "--prefill + --decode needs 1000001 positions"),
])
def test_one_line_error_and_nothing_written(argv, message, models, tiny_model_dir, quantized_tiny_dir, tmp_path, capsys):
    argv = [a.format(q=quantized_tiny_dir, m=tiny_model_dir, bad=models, tmp=tmp_path) for a in argv]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_calib_windows_1_alone_works(tiny_model_dir, tmp_path):
    # --error-windows defaults to min(2, --calib-windows): no complaint about an option never set
    assert main(["quantize", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--calib-windows", "1",
                 "--calib-seqlen", "32", "--quiet"]) == 0
