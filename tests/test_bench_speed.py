"""Smoke tests of the speed benchmarks (nothing here is timed): benchmarks/linear_latency.py's
five columns, and `serq bench`'s float32 / bfloat16 / packed split, each model in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serq_ao.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = {"fp32", "bf16", "mxfp4", "serq", "int_w4a8"}


def run_linear_latency(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "linear_latency.py"), *argv],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_linear_latency_times_five_columns_per_cell(tmp_path):
    out = tmp_path / "latency.json"
    ran = run_linear_latency("--models", "tiny", "--m", "1,8", "--threads", "1", "--repeats", "1", "--no-compile",
                             "--kernel", "reference", "--out", str(out))
    assert ran.returncode == 0, ran.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [(r["M"], r["threads"], r["K"], r["N"]) for r in record["rows"]] == [(1, 1, 64, 96), (8, 1, 64, 96)]
    for row in record["rows"]:
        assert row["seconds"].keys() == COLUMNS and all(s > 0 for s in row["seconds"].values())
        faster = min(row["seconds"]["fp32"], row["seconds"]["bf16"])
        assert row["serq_over_fp"] == pytest.approx(row["seconds"]["serq"] / faster)
        assert row["int_over_fp"] == pytest.approx(row["seconds"]["int_w4a8"] / faster)
        assert row["serq_over_mxfp4"] == pytest.approx(row["seconds"]["serq"] / row["seconds"]["mxfp4"])
    assert record["kernel_requested"] == "reference" and isinstance(record["native_kernel"], dict)
    assert "One linear" in ran.stdout and "INT W4A8" in ran.stdout


@pytest.mark.parametrize("argv, option", [(["--m", "1,0"], "--m"), (["--threads", "two"], "--threads"),
                                          (["--kernel", "avx9"], "--kernel")])
def test_linear_latency_bad_values_name_their_option(argv, option, tmp_path):
    ran = run_linear_latency("--models", "tiny", *argv, "--out", str(tmp_path / "x.json"))
    assert ran.returncode == 2 and f"argument {option}:" in ran.stderr and "Traceback" not in ran.stderr
    assert list(tmp_path.iterdir()) == []


def test_bench_times_packed_float32_and_bfloat16_each_in_its_own_process(quantized_tiny_dir, tiny_model_dir, capsys):
    argv = ["bench", str(quantized_tiny_dir), "--baseline-dtypes", "float32,bfloat16", "--threads", "1",
            "--prefill", "16", "--decode", "2", "--repeats", "1", "--json", "--quiet"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    processes = record["processes"]
    assert [(p["role"], p["dtype"]) for p in processes.values()] == [
        ("model", "float32"), ("baseline", "float32"), ("baseline", "bfloat16")]
    assert all(p["name"] == str(tiny_model_dir) for p in processes.values() if p["role"] == "baseline")
    assert all(p["threads"] == 1 for p in processes.values())
    # each process's own peak: a loaded model and torch, less than this pytest process has seen
    peaks = [p["peak_rss_bytes"] for p in processes.values()]
    assert all(50 * 2**20 < peak < 4 * 2**30 for peak in peaks), peaks
    rows = record["rows"]
    assert [(r["role"], r["dtype"], r["phase"]) for r in rows] == [
        (role, dtype, phase) for role, dtype in (("model", "float32"), ("baseline", "float32"), ("baseline", "bfloat16"))
        for phase in ("prefill", "decode")]
    assert all(r["tokens_per_second"] > 0 and r["peak_rss_bytes"] > 0 for r in rows)
    seconds = {(r["role"], r["dtype"], r["phase"]): r["seconds"] for r in rows}
    for r in rows:
        for dtype, key in (("float32", "x_faster_than_float32"), ("bfloat16", "x_faster_than_bfloat16")):
            assert r[key] == pytest.approx(seconds[("baseline", dtype, r["phase"])] / r["seconds"])
    assert {(r["baseline_dtype"], r["phase"]) for r in record["ratios"]} == {
        (d, p) for d in ("float32", "bfloat16") for p in ("prefill", "decode")}


def test_bench_baseline_dtypes_without_a_baseline_is_one_line(capsys):
    # refused before anything loads: the model need not exist
    assert main(["bench", "no-such-model", "--baseline", "none", "--baseline-dtypes", "float32", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--baseline-dtypes" in err[0], err


def test_bench_bad_baseline_dtypes_is_one_line_naming_the_option():
    ran = subprocess.run([sys.executable, "-m", "serq_ao.cli.main", "bench", "m", "--baseline-dtypes", "float32,fp8"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = ran.stderr.strip().splitlines()
    assert ran.returncode == 2 and len(lines) == 1, ran.stderr
    assert "argument --baseline-dtypes:" in lines[0] and "'float32,fp8'" in lines[0]


def test_model_speed_rows_put_every_model_over_both_float_baselines():
    from tests.conftest import benchmark_script

    def timings(prefill_s, decode_s):
        return [{"phase": "prefill", "mode": "eager", "seconds": prefill_s, "tokens_per_second": 128 / prefill_s},
                {"phase": "decode", "mode": "eager", "seconds": decode_s, "tokens_per_second": 1 / decode_s}]

    def process(role, dtype):
        return {"name": "x", "role": role, "dtype": dtype, "peak_rss_bytes": 2**28, "threads": 2}

    packed = {"processes": {"q": process("model", "float32"), "b32": process("baseline", "float32"),
                            "b16": process("baseline", "bfloat16")},
              "timings": {"q": timings(0.4, 0.02), "b32": timings(0.2, 0.01), "b16": timings(0.1, 0.04)}}
    head = {"processes": {"h": process("model", "float32")}, "timings": {"h": timings(0.8, 0.01)}}
    llama = {"ran": True, "version": "0.3", "prefill_tokens_per_second": 1280.0, "decode_tokens_per_second": 200.0,
             "peak_rss_bytes": 2**27, "threads": 2}
    with benchmark_script("model_speed") as model_speed:
        rows = model_speed.summary_rows([("packed", packed), ("packed + head", head)], llama, ("eager",))
    by_model = {r["model"]: r for r in rows}
    assert list(by_model) == ["packed", "smollm2-135m float32", "smollm2-135m bfloat16", "packed + head", "llama.cpp 0.3"]
    assert by_model["packed"]["prefill_x_float32"] == pytest.approx(0.5)
    assert by_model["packed"]["decode_x_bfloat16"] == pytest.approx(2.0)
    assert by_model["packed + head"]["decode_x_float32"] == pytest.approx(1.0)
    assert by_model["llama.cpp 0.3"]["prefill_x_bfloat16"] == pytest.approx(1280 / 1280)
    assert by_model["llama.cpp 0.3"]["decode_x_float32"] == pytest.approx(200 / 100)


def test_decode_profile_times_the_linears_it_names():
    """benchmarks/decode_profile.py: its direct kernel calls compute what the modules compute, bit
    for bit, and the step without linears leaves every linear as it was."""
    import torch

    import serq_ao
    from serq_ao import SERQConfig
    from tests.conftest import benchmark_script, make_tiny_llama

    model = make_tiny_llama().to(torch.bfloat16)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # a float head, untied
    serq_ao.quantize_(model, SERQConfig(rank=32), torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)))
    with benchmark_script("decode_profile") as decode_profile, torch.no_grad():
        linears, inputs, kernels = decode_profile.linear_calls(model, torch.bfloat16)
        assert len(linears) == len(inputs) == len(kernels) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        for linear, x, call in zip(linears, inputs, kernels):
            assert torch.equal(call().to(torch.bfloat16), linear(x))
        step = decode_profile.decode_step(model, 8)
        expected = step()  # logits
        decode_profile.without_linears(linears, step)()
        assert all("forward" not in vars(m) for m in linears)
        assert torch.equal(step(), expected)


def test_serve_compares_each_serq_run_with_its_own_cycles_bf16():
    from tests.conftest import benchmark_script

    def run(*tokens_per_s):
        return {"folder": "f", "weight_bytes": 1, "server_peak_rss_bytes": 2,
                "levels": [{"output_tokens_per_s": t, "ttft_median_s": 0.1, "ttft_p90_s": 0.2} for t in tokens_per_s]}

    cycles = [{"bf16": run(100, 200), "serq": run(110, 180)},   # a slow cycle for both
              {"serq": run(150, 300), "bf16": run(120, 330)},
              {"bf16": run(90, 200), "serq": run(99, 220)}]
    with benchmark_script("serve") as serve:
        models = serve.summarize(cycles, [16, 64])
    level = models["serq"]["levels"][0]
    assert level["over_bf16_per_cycle"] == pytest.approx([1.1, 1.25, 1.1]) and level["over_bf16_median"] == pytest.approx(1.1)
    assert models["serq"]["levels"][1]["over_bf16_median"] == pytest.approx(300 / 330)  # of 0.9, 300/330, 1.1
    assert models["bf16"]["levels"][0]["output_tokens_per_s"] == 100 and "over_bf16_median" not in models["bf16"]["levels"][0]
