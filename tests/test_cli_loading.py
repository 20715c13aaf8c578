"""--device and --dtype on the commands that load a model (issue 14, item 1)."""

import json

import pytest
import torch

from serq_ao.cli.main import main
from serq_ao.models import load_model, resolve_device, resolve_dtype


def test_resolvers():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("auto") == "auto"
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"dtype must be one of \('auto', 'float32', 'bfloat16', 'float16'\)"):
        resolve_dtype("float64")
    with pytest.raises(ValueError, match="device must be cpu, cuda, cuda:N or auto"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("not a device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("argv, message", [
    (["eval", "ppl", "{m}", "--device", "tpu"], "argument --device: device must be cpu, cuda, cuda:N or auto"),
    (["quantize", "{m}", "--out", "{tmp}/o", "--dtype", "float64"], "argument --dtype: invalid choice"),
] + ([] if torch.cuda.is_available() else [
    (["quantize", "{m}", "--out", "{tmp}/o", "--device", "cuda"], "no CUDA device is available"),
]))
def test_bad_device_or_dtype_is_a_usage_error_before_any_work(argv, message, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(m=tiny_model_dir, tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_quantize_in_bfloat16_then_evaluate(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--dtype", "bfloat16", "--rank", "32", "--out", str(out),
                 "--calib-windows", "2", "--calib-seqlen", "32", "--quiet"]) == 0
    model, _ = load_model(out, dtype="auto")  # saved in bf16: "auto" gives it back as bf16
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # the packed weight's logical dtype
    capsys.readouterr()
    assert main(["eval", "ppl", str(out), "--windows", "1", "--seqlen", "32", "--json", "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["ppl"] is not None and record["ppl"] > 1
