"""The vLLM plugin (serq_ao/integrations/vllm), served by vLLM's CPU build in .venv-vllm
(`make vllm-env`); the reference is serq's own packed model, loaded here by transformers.

Agreement is checked on logprobs, teacher-forced: serq's model runs once on each prompt
followed by the tokens vLLM generated greedily, and at every position

- the logprob vLLM reports (prompt and generated tokens) is within ``LOGPROB_TOL`` of serq's;
- vLLM's greedy token is serq's argmax, up to ties within ``LOGPROB_TOL``;

so greedy decoding with serq's model picks vLLM's tokens, token for token, for the whole
completion. Both run in float32; they differ in summation order only (vLLM's attention and
norm kernels against transformers'), which moves a logprob by ~1e-5 (measured: 2.6e-5 at
most over 60 positions); ``LOGPROB_TOL`` = 1e-3 leaves that a margin of 40x and is still
well under what one bf16 rounding of an activation, or one wrong tensor, moves.

A model whose 4-bit activation codes sit near rounding boundaries can turn a 1e-6 difference
into a flipped code and a different continuation; the folders here are quantized with the
default recipe (Hadamard rotation), on which no flip was seen.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
DRIVER = Path(__file__).with_name("vllm_driver.py")
LOGPROB_TOL = 1e-3
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
           "The three primary colors are"]
MAX_TOKENS = 16

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="needs .venv-vllm: make vllm-env")]


def vllm_env() -> dict:
    env = dict(os.environ)
    env.pop("SERQ_CPU_KERNEL", None)
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; the default takes a share of this machine's memory
    return env


def run_driver(folder: Path, out: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    prompts = out.with_suffix(".prompts.json")
    prompts.write_text(json.dumps(PROMPTS))
    return subprocess.run([str(VLLM_PYTHON), str(DRIVER), str(folder), str(out), "--prompts", str(prompts),
                           "--max-tokens", str(MAX_TOKENS), *extra],
                          capture_output=True, text=True, timeout=timeout, env=vllm_env(), stdin=subprocess.DEVNULL)


def quantize(source: str, out: Path, *options: str) -> Path:
    from serq_ao.cli.main import main

    assert main(["quantize", source, "--out", str(out), "--calib-samples", "8", "--no-diagnostics", "--quiet",
                 *options]) == 0
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    return {fmt: quantize("smollm2-135m", root / fmt, "--format", fmt) for fmt in ("mxfp4", "w4a8")}


def check_against_packed_model(folder: Path, results: list[dict]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert len(results) == len(PROMPTS)
    for result in results:
        prompt, tokens = result["prompt_ids"], result["tokens"]
        assert len(tokens) == MAX_TOKENS
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits.float(), -1)[0]
        for i in range(1, len(prompt)):
            assert abs(logprobs[i - 1, prompt[i]].item() - result["prompt_logprobs"][i]) < LOGPROB_TOL, (i, result)
        for k, token in enumerate(tokens):
            row = logprobs[len(prompt) - 1 + k]
            assert abs(row[token].item() - result["top"][k][str(token)]) < LOGPROB_TOL, (k, result)
            assert row.max().item() - row[token].item() < LOGPROB_TOL, f"step {k}: vLLM chose {token}, serq {row.argmax()}"


@pytest.mark.parametrize("fmt, extra", [("mxfp4", ()), ("w4a8", ("--eager",))], ids=["mxfp4-compiled", "w4a8-eager"])
def test_greedy_generation_matches_the_packed_model(folders, tmp_path, fmt, extra):
    done = run_driver(folders[fmt], tmp_path / "out.json", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    check_against_packed_model(folders[fmt], json.loads((tmp_path / "out.json").read_text()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(process: subprocess.Popen, port: int, log: Path, timeout: float = 600) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"vllm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"vllm serve was not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_vllm_serve_answers_openai_clients_and_stops_cleanly(folders, tmp_path):
    folder, port, log = folders["mxfp4"], free_port(), tmp_path / "serve.log"
    command = [str(VLLM_PYTHON.parent / "vllm"), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "512"]
    with open(log, "w") as out:
        # a session of its own: the server and the engine processes it starts are one group
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=vllm_env(),
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_healthy(process, port, log)
        asked = subprocess.run([str(VLLM_PYTHON), str(DRIVER.with_name("vllm_openai_client.py")),
                                f"http://127.0.0.1:{port}/v1", str(folder), PROMPTS[0]],
                               capture_output=True, text=True, timeout=300, env=vllm_env())
        assert asked.returncode == 0, asked.stderr[-3000:]
        answer = json.loads(asked.stdout.strip().splitlines()[-1])
        assert answer["models"] == [str(folder)]
        assert answer["completion_tokens"] == 8 and answer["chat_tokens"] > 0
        assert answer["completion"].strip() and answer["chat"].strip()
        # the same greedy completion as serq's packed model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
        tokens = []
        with torch.no_grad():
            for _ in range(8):
                tokens.append(int(model(torch.cat([ids, torch.tensor([tokens], dtype=ids.dtype)], 1)).logits[0, -1].argmax()))
        assert answer["completion"] == tokenizer.decode(tokens)
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends: vLLM shuts its engine down
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"vllm serve did not stop within 60 s of SIGINT:\n{log.read_text()[-2000:]}")
    deadline = time.monotonic() + 30
    while group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = group_alive(process.pid)
    if left:
        os.killpg(process.pid, signal.SIGKILL)
    assert not left, "vllm serve left processes running after it stopped"
