import json
import subprocess
import sys
from pathlib import Path

import pytest

from serq_ao.integrations.checkpoint_config import checkpoint_fields
from serq_ao.cli.main import main


def test_eval_ppl_json(tiny_model_dir, capsys):
    code = main(["eval", "ppl", str(tiny_model_dir), "--windows", "2", "--seqlen", "32", "--json", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    record = json.loads(out)  # one JSON object and nothing else on stdout
    assert {"ppl", "windows", "tokens", "seconds", "nll"} <= record.keys()
    assert record["windows"] == 2 and record["tokens"] == 2 * 32  # BOS: every text token scored
    assert record["ppl"] > 1


def test_eval_ppl_table(tiny_model_dir, capsys):
    assert main(["eval", "ppl", str(tiny_model_dir), "--windows", "1", "--seqlen", "16", "--quiet"]) == 0
    assert "Perplexity" in capsys.readouterr().out


def test_unknown_model_is_a_one_line_usage_error(capsys):
    assert main(["eval", "ppl", "no-such-model", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model must be one of" in err and "Traceback" not in err and len(err.splitlines()) <= 2


def test_too_many_windows_is_a_usage_error(tiny_model_dir, capsys):
    assert main(["eval", "ppl", str(tiny_model_dir), "--windows", "100000", "--quiet"]) == 2
    assert "n_windows must be in" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["eval", "ppl", "x", "--windows", "0"], ["eval", "ppl", "x", "--corpus", "c4"], ["eval"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "error:" in err and "--help" in err  # one line, no usage dump


def test_console_script_is_installed():
    # the `serq` entry point sits next to the interpreter of the environment under test
    script = Path(sys.executable).parent / "serq"
    done = subprocess.run([str(script), "eval", "ppl", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--windows" in done.stdout


QUICK = ["--calib-windows", "2", "--calib-seqlen", "32", "--quiet"]


def test_quantize_then_eval_the_saved_folder(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "quantized"
    code = main(["quantize", str(tiny_model_dir), "--method", "serq", "--rank", "32", "--out", str(out), "--json", *QUICK])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "serq" and summary["rank"] == 32 and summary["linears"] == 14
    # tiny Llama: six linears with d_in 64 (28,672 weights), down_proj with d_in 128 (8,192)
    expected_bits = (28672 * 4.25 * 96 / 64 + 8192 * 4.25 * 160 / 128) / (28672 + 8192)
    assert summary["effective_bits"] == pytest.approx(expected_bits)
    # the packed format: a transformers folder whose config names serq's torchao config
    assert summary["packed"] and summary["model_bytes"] > 0
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["quant_type"]["default"]["_type"] == "serq_ao.SERQCheckpointConfig"
    # streamed: one shard per decoder layer, one for the rest, and their index
    assert (out / "model.safetensors.index.json").is_file() and (out / "serq_report.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    assert main(["eval", "ppl", str(out), "--windows", "1", "--seqlen", "32", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] > 1


def test_lowrank_methods_are_saved_in_evaluation_mode(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "lqer"
    assert main(["quantize", str(tiny_model_dir), "--method", "l2qer", "--out", str(out), "--json", *QUICK]) == 0
    assert not json.loads(capsys.readouterr().out)["packed"]
    assert (out / "serq_config.json").is_file()
    assert main(["eval", "ppl", str(out), "--windows", "1", "--seqlen", "32", "--json", "--quiet"]) == 0


def test_quantize_rejects_bad_rank_before_any_work(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--rank", "48", "--out", str(out), *QUICK]) == 2
    assert "multiple of 32" in capsys.readouterr().err and not out.exists()
    assert main(["quantize", str(tiny_model_dir), "--rank", "128", "--out", str(out), *QUICK]) == 2
    assert "smallest d_in" in capsys.readouterr().err and not out.exists()


def test_quantize_refuses_to_overwrite_a_foreign_folder(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["quantize", str(tiny_model_dir), "--method", "rtn", "--out", str(tmp_path), *QUICK]) == 2
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_compare_methods(tiny_model_dir, capsys):
    argv = ["compare", str(tiny_model_dir), "--methods", "fp,rtn,serq", "--rank", "32", "--windows", "1", "--seqlen", "32", "--json", *QUICK]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in record["results"]] == ["fp", "rtn", "serq"]
    assert record["results"][0]["bits"] == 32.0 and all(r["ppl"] > 1 for r in record["results"])
    assert main(["compare", str(tiny_model_dir), "--methods", "fp,awq", *QUICK]) == 2


def test_quantize_with_gptq(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "gptq"
    argv = ["quantize", str(tiny_model_dir), "--method", "rtn", "--format", "w4a8", "--gptq", "--out", str(out), "--json", *QUICK]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["gptq"] is True and summary["linears"] == 14
    saved = checkpoint_fields(json.loads((out / "config.json").read_text())["quantization_config"])
    assert saved["serq_config"]["gptq"] is True
    assert json.loads((out / "serq_report.json").read_text())["calibration"]["windows"] == 2


def test_eval_ppl_on_a_text_file(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, a tiny model read a short story. " * 20, encoding="utf-8")
    assert main(["eval", "ppl", str(tiny_model_dir), "--text", str(text), "--seqlen", "64", "--json", "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out)
    # one token per byte: 1020 bytes give 15 windows of 64
    assert record["text"] == str(text) and record["windows"] == 15 and record["tokens"] == 15 * 64


@pytest.mark.parametrize("content, message", [(None, "no such file"), (b"\xff\xfe bad", "not UTF-8"), (b"short", "n_windows must be in")])
def test_eval_ppl_text_mistakes_are_usage_errors(tiny_model_dir, tmp_path, capsys, content, message):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    assert main(["eval", "ppl", str(tiny_model_dir), "--text", str(path), "--seqlen", "64", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("aoti", [False, True])
def test_export_writes_a_program_that_runs(quantized_tiny_dir, tmp_path, capsys, aoti):
    out = tmp_path / ("tiny.aoti.pt2" if aoti else "tiny.pt2")
    argv = ["export", str(quantized_tiny_dir), "--out", str(out), "--batch-size", "2", "--seqlen", "16", "--json", "--quiet"]
    assert main(argv + (["--aoti"] if aoti else [])) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kind"] == ("aoti" if aoti else "program") and record["serq_nodes"] == 14
    assert record["smoke_ok"] and out.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left


@pytest.mark.parametrize("out, message", [("model.onnx", ".pt2"), ("folder.pt2", "is a folder")])
def test_export_usage_errors(quantized_tiny_dir, tmp_path, capsys, out, message):
    (tmp_path / "folder.pt2").mkdir()
    assert main(["export", str(quantized_tiny_dir), "--out", str(tmp_path / out), "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_bench_times_the_quantized_model_next_to_its_source(quantized_tiny_dir, tiny_model_dir, capsys):
    argv = ["bench", str(quantized_tiny_dir), "--compile", "--prefill", "16", "--decode", "2", "--repeats", "1", "--json", "--quiet"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["baseline"] == str(tiny_model_dir)
    assert len(record["timings"]) == 2
    for timings in record["timings"].values():
        assert [(t["phase"], t["mode"]) for t in timings] == [
            ("prefill", "eager"), ("decode", "eager"), ("prefill", "compiled"), ("decode", "compiled")]
        assert all(t["seconds"] > 0 and t["tokens_per_second"] > 0 for t in timings)
    assert len(record["ratios"]) == 4 and {"torch", "cpus", "serq_ao"} <= record["machine"].keys()


def test_bench_usage_error(capsys):
    assert main(["bench", "no-such-model", "--quiet"]) == 2


def test_inspect_a_packed_folder_lists_its_linears(quantized_tiny_dir, capsys):
    assert main(["inspect", str(quantized_tiny_dir), "--json", "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["config"]["method"] == "serq" and len(record["linears"]) == 14
    for linear in record["linears"]:
        # tiny Llama: d_in 64 or 128, r = 32; only o_proj (GQA) keeps a pre-op
        assert linear["rank"] == 32
        codes_and_scales = linear["bits_per_weight"] - linear["pre_op_bits_per_weight"]
        assert codes_and_scales == pytest.approx(4.25 * (linear["in_features"] + 32) / linear["in_features"])
        assert (linear["pre_op_bits_per_weight"] > 0) == linear["name"].endswith("o_proj")
    assert main(["inspect", str(quantized_tiny_dir), "--quiet"]) == 0
    assert "Quantized linears: serq, mxfp4" in capsys.readouterr().out


def test_inspect_a_packed_folder_shows_the_diagnostics_recorded_at_quantize_time(quantized_tiny_dir, capsys):
    assert main(["inspect", str(quantized_tiny_dir), "--json", "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out)
    for linear in record["linears"]:
        assert linear["scale_spread"] >= 1 and 32 / linear["in_features"] < linear["saliency_share"] < 1
        assert 0 < linear["output_error"] < 1 and linear["layer"] in (0, 1)
    assert len(record["saliency_curves"]) == 2 * 4
    assert record["error_tokens"] == 2 * (1 + 32)  # --error-windows 2 of BOS + 32 tokens


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_inspect_plot_writes_png_figures(quantized_tiny_dir, tmp_path, capsys):
    sweep = tmp_path / "accuracy.json"  # the shape benchmarks/accuracy.py writes: cells, and their sweep
    sweep.write_text(json.dumps({"cells": [], "rank_sweep": {"serq": [[0, 70.0], [32, 40.0], [64, 38.0]], "rtn": 80.0,
                                                             "fp": None}}))
    plots = tmp_path / "plots"
    argv = ["inspect", str(quantized_tiny_dir), "--plot", str(plots), "--sweep", str(sweep), "--json", "--quiet"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    names = sorted(Path(p).name for p in record["plots"])
    assert names == ["layer_error.png", "rank_sweep.png", "saliency.png"]
    assert sorted(p.name for p in plots.iterdir()) == names  # no temporary files left
    assert all((plots / n).read_bytes().startswith(PNG_MAGIC) for n in names)


def test_inspect_float_model_stats(tiny_model_dir, capsys):
    argv = ["inspect", str(tiny_model_dir), "--stats", "--rank", "32", "--calib-windows", "2", "--calib-seqlen", "32",
            "--json", "--quiet"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["plan"]["groups"]) == 8 and len(record["linears"]) == 14
    assert record["config"]["rank"] == 32
    assert all(0 < r["output_error"] < 1 and r["rank"] == 32 for r in record["linears"])


def test_inspect_usage_errors(quantized_tiny_dir, tiny_model_dir, tmp_path, capsys):
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"")
    assert main(["inspect", str(quantized_tiny_dir), "--plot", str(a_file), "--quiet"]) == 2
    assert "--plot must be a folder" in capsys.readouterr().err
    assert main(["inspect", str(quantized_tiny_dir), "--plot", str(tmp_path / "p"), "--sweep", str(tmp_path / "none.json"),
                 "--quiet"]) == 2
    assert "--sweep: no such file" in capsys.readouterr().err
    not_a_sweep = tmp_path / "cells.json"
    not_a_sweep.write_text(json.dumps({"cells": []}))
    assert main(["inspect", str(quantized_tiny_dir), "--plot", str(tmp_path / "p"), "--sweep", str(not_a_sweep),
                 "--quiet"]) == 2
    assert "must be a rank sweep" in capsys.readouterr().err
    assert main(["inspect", str(quantized_tiny_dir), "--sweep", str(not_a_sweep), "--quiet"]) == 2
    assert "--sweep applies with --plot only" in capsys.readouterr().err
    argv = ["inspect", str(tiny_model_dir), "--stats", "--calib-windows", "2", "--error-windows", "3", "--quiet"]
    assert main(argv) == 2
    assert "--error-windows (3) must be at most --calib-samples (2)" in capsys.readouterr().err


def test_quantize_without_diagnostics_has_nothing_to_plot(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--method", "rtn", "--no-diagnostics", "--out", str(out), *QUICK]) == 0
    assert main(["inspect", str(out), "--plot", str(tmp_path / "plots"), "--quiet"]) == 2
    assert "has no diagnostics to plot" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


def test_inspect_a_float_model_shows_its_plan(tiny_model_dir, capsys):
    assert main(["inspect", str(tiny_model_dir), "--json", "--quiet"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert len(plan["groups"]) == 2 * 4  # per layer: qkv, o, gate/up, down
