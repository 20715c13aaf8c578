"""A serq folder in processes that never imported serq_ao (real subprocesses): plain
transformers, ``pipeline`` and lm-eval's own CLI raise an error naming serq_ao, never hand back
random weights; with serq_ao imported the same calls load the quantized model.
(Why config.json says quant_method "torchao": serq_ao.integrations.checkpoint_config.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
IDS = [[5, 17, 200, 31, 64, 9, 120, 77]]


def run_python(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


# loads folders the way a user of plain transformers would, each call as "how:folder";
# prints one JSON line: per call, what happened
LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, pipeline
results = []
for call in sys.argv[1:]:
    how, folder = call.split(":", 1)
    try:
        if how == "from_pretrained":
            model = AutoModelForCausalLM.from_pretrained(folder)
            with torch.no_grad():
                out = model(torch.tensor(%s)).logits.flatten().tolist()
        else:
            out = None
            pipeline("text-generation", model=folder)("hello", max_new_tokens=2)
        results.append({"loaded": True, "logits": out})
    except Exception as e:
        results.append({"loaded": False, "error": f"{type(e).__name__}: {e}"})
print("RESULT " + json.dumps({"serq_ao_imported": "serq_ao" in sys.modules, "calls": results}))
""" % IDS


def load_in_fresh_process(*calls: str, import_serq_ao: bool) -> tuple[bool, list[dict]]:
    process = run_python(("import serq_ao\n" if import_serq_ao else "") + LOAD, *calls)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, process.stdout[-2000:] + process.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    return result["serq_ao_imported"], result["calls"]


@pytest.fixture(scope="module")
def lqer_dir(tiny_model_dir, tmp_path_factory):
    """An evaluation-mode folder (dequantized weights + serq_config.json)."""
    from serq_ao.cli.main import main

    out = tmp_path_factory.mktemp("lqer") / "tiny-lqer"
    argv = ["quantize", str(tiny_model_dir), "--method", "lqer", "--out", str(out), "--in-memory",
            "--calib-windows", "2", "--calib-seqlen", "32", "--quiet"]
    assert main(argv) == 0
    return out


def test_plain_transformers_refuses_serq_folders_with_an_error_naming_serq_ao(quantized_tiny_dir, lqer_dir):
    imported, calls = load_in_fresh_process(f"from_pretrained:{quantized_tiny_dir}", f"pipeline:{quantized_tiny_dir}",
                                            f"from_pretrained:{lqer_dir}", import_serq_ao=False)
    assert not imported
    for what, call in zip(("packed from_pretrained", "packed pipeline", "evaluation-mode from_pretrained"), calls):
        assert not call["loaded"], f"plain transformers loaded a serq folder ({what}): random weights"
        assert "serq_ao" in call["error"], (what, call["error"])


def test_with_serq_ao_imported_a_fresh_process_loads_the_quantized_model(quantized_tiny_dir, lqer_dir):
    from serq_ao.integrations.serialization import load_quantized

    model, _ = load_quantized(quantized_tiny_dir)
    with torch.no_grad():
        expected = model(torch.tensor(IDS)).logits.flatten().tolist()
    _, (packed, lqer) = load_in_fresh_process(f"from_pretrained:{quantized_tiny_dir}", f"from_pretrained:{lqer_dir}",
                                              import_serq_ao=True)
    assert packed["loaded"] and packed["logits"] == expected  # bitwise: the same packed model
    # an evaluation-mode folder is not a transformers quantization: said, with where to go
    assert not lqer["loaded"] and "load_quantized" in lqer["error"], lqer["error"]


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """A two-choice lm-eval task over a local JSONL file (no network)."""
    folder = tmp_path_factory.mktemp("task")
    rows = [{"text": "the cat sat on the", "choices": [" mat", " sky"], "label": 0}] * 3
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{text}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n")
    return folder


def lm_eval_argv(folder, task_dir, out) -> list[str]:
    return ["--model", "hf", "--model_args", f"pretrained={folder},dtype=float32", "--tasks", "tiny_choice",
            "--include_path", str(task_dir), "--limit", "2", "--output_path", str(out)]


@pytest.mark.slow  # two lm-eval runs (~1 min)
def test_lm_eval_own_cli_fails_naming_serq_ao_and_evaluates_through_serq_ao(quantized_tiny_dir, local_task, tmp_path):
    plain = run_python("from lm_eval.__main__ import cli_evaluate; cli_evaluate()",
                       *lm_eval_argv(quantized_tiny_dir, local_task, tmp_path / "plain"))
    assert plain.returncode != 0 and "serq_ao" in plain.stderr.strip().splitlines()[-1], plain.stderr[-2000:]
    assert not (tmp_path / "plain").exists()
    # the same flags, in a process that imported serq_ao
    process = subprocess.run([sys.executable, "-m", "serq_ao.eval.lm_eval_main",
                              *lm_eval_argv(quantized_tiny_dir, local_task, tmp_path / "serq")],
                             capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert process.returncode == 0, process.stderr[-3000:]
    results = json.loads(next((tmp_path / "serq").rglob("results_*.json")).read_text())
    assert 0.0 <= results["results"]["tiny_choice"]["acc,none"] <= 1.0
