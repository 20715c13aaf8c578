"""The vLLM plugin (serq_ao/integrations/vllm), served by vLLM's CPU build in .venv-vllm
(`make vllm-env`); the reference is serq's own packed model, loaded here by transformers.

Agreement is checked on logprobs, teacher-forced: serq's model runs once on each prompt
followed by the tokens vLLM generated greedily, and at every position

- the logprob vLLM reports (prompt and generated tokens) is within the tolerance of serq's;
- vLLM's greedy token is serq's argmax, up to ties within the tolerance;

so greedy decoding with serq's model picks vLLM's tokens for the whole completion. Both run
in float32 and differ in summation order only (vLLM's attention and norm kernels against
transformers'). The tolerance is ``LOGPROB_TOL`` = 1e-3 (the measured difference on the
default MXFP4 folder is 2.6e-5 at most), or twice what serq's own model moves when its input
embeddings change by a relative 1e-6 (float-order noise), where that is larger.

Why the second term: a quantized model whose activation codes sit near rounding boundaries
turns float-order noise into flipped codes. On the default model the INT W4A8 folders move by
0.3 to 0.6 nats under a relative 1e-7 change of the embeddings (a flipped 8-bit code in an
early layer cascades through the layers that re-quantize), MXFP4 with the default rotation
by nothing measurable;
with ``--recipe paper`` (no rotation) MXFP4 moved by up to 11 nats. No engine that sums in
another order can match such a model closer than it matches itself.
"""

from __future__ import annotations

import json
import os
import re
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
FLOAT_ORDER_NOISE = 1e-6  # relative; fp32 sums of a few thousand terms in another order
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

    assert main(["quantize", source, "--out", str(out), "--calib-samples", "8", "--no-gptq", "--no-diagnostics",
                 "--quiet", *options]) == 0
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    built = {fmt: quantize("smollm2-135m", root / fmt, "--format", fmt) for fmt in ("mxfp4", "w4a8")}
    built["mxfp4-int8-table"] = quantize("smollm2-135m", root / "mxfp4-int8-table", "--embeddings", "int8")
    return built


def token_logprobs(model, ids: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
    """(T, vocab) logprobs of serq's model on one sequence (optionally on given embeddings)."""
    with torch.no_grad():
        logits = model(input_ids=None if embeds is not None else ids, inputs_embeds=embeds).logits
    return torch.log_softmax(logits.float(), -1)[0]


def sensitivity(model, ids: torch.Tensor, seeds: int = 3) -> float:
    """How far serq's own logprobs move when its input changes by float-order noise: the
    largest change over positions and ``seeds`` perturbations of the embeddings by a relative
    ``FLOAT_ORDER_NOISE``."""
    embeds = model.get_input_embeddings()(ids)
    base = token_logprobs(model, ids, embeds)
    moved = 0.0
    for seed in range(seeds):
        noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(seed))
        moved = max(moved, (token_logprobs(model, ids, embeds * (1 + FLOAT_ORDER_NOISE * noise)) - base).abs().max().item())
    return moved


def check_against_packed_model(folder: Path, results: list[dict]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert len(results) == len(PROMPTS)
    for result in results:
        prompt, tokens = result["prompt_ids"], result["tokens"]
        assert len(tokens) == MAX_TOKENS
        ids = torch.tensor([prompt + tokens])
        logprobs = token_logprobs(model, ids)
        moved = sensitivity(model, ids)
        tolerance = max(LOGPROB_TOL, 2 * moved)
        where = f"(serq's model moves {moved:.2e} under float-order noise; tolerance {tolerance:.2e})"
        for i in range(1, len(prompt)):
            diff = abs(logprobs[i - 1, prompt[i]].item() - result["prompt_logprobs"][i])
            assert diff <= tolerance, f"prompt token {i}: vLLM's logprob differs by {diff:.2e} {where}"
        for k, token in enumerate(tokens):
            row = logprobs[len(prompt) - 1 + k]
            diff = abs(row[token].item() - result["top"][k][str(token)])
            assert diff <= tolerance, f"generated token {k}: vLLM's logprob differs by {diff:.2e} {where}"
            gap = row.max().item() - row[token].item()
            assert gap <= tolerance, f"step {k}: vLLM chose {token}, serq {int(row.argmax())} by {gap:.2e} {where}"


@pytest.mark.parametrize("fmt, extra", [("mxfp4", ()), ("w4a8", ("--eager",)), ("mxfp4-int8-table", ())],
                         ids=["mxfp4-compiled", "w4a8-eager", "mxfp4-int8-table-compiled"])
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


def save_tiny(model, folder: Path) -> Path:
    from tests.conftest import make_byte_tokenizer

    model.save_pretrained(folder)
    make_byte_tokenizer(bos=True).save_pretrained(folder)
    return folder


def tiny_llama():
    """Two layers, head size 64 (vLLM's CPU attention has no kernel for the conftest model's 16);
    every width splits over two ranks at INT's 128-column groups."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=512)
    return MixtralForCausalLM(config).eval()


def quantize_tiny(source: Path, out: Path, *options: str) -> Path:
    from serq_ao.cli.main import main

    assert main(["quantize", str(source), "--out", str(out), "--calib-windows", "2", "--calib-seqlen", "64",
                 "--no-diagnostics", "--quiet", *options]) == 0
    return out


@pytest.mark.parametrize("fmt, options", [("mxfp4", ("--embeddings", "int8")), ("w4a8", ())],
                         ids=["mxfp4-int8-table", "w4a8"])
def test_tensor_parallel_2_serves_the_packed_model(tmp_path, fmt, options):
    """Two CPU workers, one core each (vLLM binds one NUMA node's threads per worker unless
    told which cores: VLLM_CPU_OMP_THREADS_BIND). q, k, v, gate and up are split by rows, o_proj
    and down_proj by columns; o_proj's saliency order makes each rank all-gather its input. An
    int8 embedding table is split by vocabulary rows, for the lookup and the tied head."""
    folder = quantize_tiny(save_tiny(tiny_llama(), tmp_path / "fp"), tmp_path / "q", "--format", fmt, *options)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    o_proj = "model.layers.0.self_attn.o_proj.weight_input_"
    assert f"{o_proj}perm" in index or f"{o_proj}scale_inv" in index  # the all-gathered pre-op is exercised
    env_bind = {**vllm_env(), "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    prompts = tmp_path / "out.prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    done = subprocess.run([str(VLLM_PYTHON), str(DRIVER), str(folder), str(tmp_path / "out.json"), "--prompts",
                           str(prompts), "--max-tokens", str(MAX_TOKENS), "--eager", "--tensor-parallel-size", "2"],
                          capture_output=True, text=True, timeout=900, env=env_bind, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    check_against_packed_model(folder, json.loads((tmp_path / "out.json").read_text()))


def test_a_packed_head_in_a_folder_written_in_memory_serves(tmp_path):
    """``--quantize-lm-head`` (the head packed, untied from the embeddings, which are int8: the
    table serves lookups only) and ``--in-memory`` (one save_pretrained file instead of
    streamed shards)."""
    folder = quantize_tiny(save_tiny(tiny_llama(), tmp_path / "fp"), tmp_path / "q", "--quantize-lm-head", "--in-memory",
                           "--embeddings", "int8")
    fields = json.loads((folder / "config.json").read_text())["quantization_config"]["quant_type"]["default"]["_data"]
    assert "lm_head" in fields["packed_linears"] and fields["packed_embeddings"] == ["model.embed_tokens"]
    done = run_driver(folder, tmp_path / "out.json", "--eager")
    assert done.returncode == 0, done.stderr[-3000:]
    check_against_packed_model(folder, json.loads((tmp_path / "out.json").read_text()))


def test_an_int8_table_serves_as_embeddings_and_tied_head_in_the_compiled_graph(tmp_path):
    """``--embeddings int8`` with the head tied: vLLM's lookups and logits read the int8 table
    through serq's op, inside vLLM's compiled graph."""
    folder = quantize_tiny(save_tiny(tiny_llama(), tmp_path / "fp"), tmp_path / "q", "--embeddings", "int8")
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    done = run_driver(folder, tmp_path / "out.json")
    assert done.returncode == 0, done.stderr[-3000:]
    check_against_packed_model(folder, json.loads((tmp_path / "out.json").read_text()))


def refused(folder: Path, tmp_path: Path) -> str:
    """What vLLM printed for a folder it must refuse before it serves anything (its engine
    process logs to stdout, the front end raises to stderr)."""
    done = run_driver(folder, tmp_path / "out.json", "--eager", timeout=600)
    assert done.returncode != 0 and not (tmp_path / "out.json").exists()
    return done.stdout + done.stderr


def test_a_mixture_of_experts_is_refused_naming_the_layer(tmp_path):
    folder = quantize_tiny(save_tiny(tiny_mixtral(), tmp_path / "fp"), tmp_path / "q")
    stderr = refused(folder, tmp_path)
    assert re.search(r"serq: model\.layers\.0\.\S+ is a mixture-of-experts layer and the folder packs its "
                     r"experts \(model\.layers\.0\.", stderr), stderr[-3000:]


def test_a_damaged_folder_is_refused_as_serq_eval_refuses_it(folders, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(folders["w4a8"], folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x10  # in the last tensor's bytes: the file keeps its size, its SHA-256 changes
    shard.write_bytes(bytes(data))
    evaluated = subprocess.run([sys.executable, "-m", "serq_ao.cli.main", "eval", "ppl", str(folder), "--windows", "1"],
                               capture_output=True, text=True, timeout=600)
    assert evaluated.returncode != 0
    problem = next(line for line in evaluated.stderr.splitlines() if "the checkpoint is damaged" in line)
    problem = problem[problem.index(str(shard)):]  # the CLI's prefix off: the path, what differs, what to do
    assert problem in refused(folder, tmp_path)


def edit_quantization_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"]["quant_type"]["default"]["_data"])
    (folder / "config.json").write_text(json.dumps(config))


def test_an_unknown_format_version_is_one_clear_line(folders, tmp_path):
    folder = tmp_path / "future"
    shutil.copytree(folders["mxfp4"], folder)
    edit_quantization_config(folder, lambda data: data.update(format_version=5))
    stderr = refused(folder, tmp_path)
    assert "this serq-ao reads quantization format 4, the checkpoint has format 5" in stderr, stderr[-3000:]


def test_an_evaluation_mode_folder_is_refused_with_what_to_do(tmp_path):
    folder = quantize_tiny(save_tiny(tiny_llama(), tmp_path / "fp"), tmp_path / "q", "--method", "lqer")
    stderr = refused(folder, tmp_path)
    assert "serq: this is an evaluation-mode serq folder" in stderr, stderr[-3000:]


def test_the_linear_benchmark_runs_serqs_prepacked_module_beside_vllms_bf16(tmp_path):
    out = tmp_path / "linear.json"
    done = subprocess.run([str(VLLM_PYTHON), str(ROOT / "benchmarks" / "vllm_linear.py"), "--m", "3", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, env=vllm_env())
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [r["layer"] for r in record["rows"]] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert all(r["prepacked"] and r["m"] == 3 and r["ms"]["bf16"] > 0 and r["ms"]["serq"] > 0 for r in record["rows"])
    assert record["kernel"]["native"]


PACKED_LINEAR_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from serq_ao.integrations.vllm.linear import PackedLinear
from serq_ao.kernels import cpu_native
from tests.kernels.native_cases import packed_weight, random_input, run_native
for fmt in ("mxfp4", "w4a8", "w4a4"):
    weight = packed_weight(fmt, 200, 70, 64)
    module = PackedLinear(weight)
    x = random_input((5,), 200).to(torch.bfloat16)
    bias = torch.randn(70)
    got = module(x, bias)
    isa = cpu_native.selected_isa()
    expected = run_native(weight, x, bias, isa, "panels" if module.isa is not None else cpu_native.GEMM_BY_ROWS)
    assert torch.equal(got, expected), fmt
    assert (module.isa is not None) == (cpu_native.panel_columns(isa) > 1), (fmt, module.isa)
    assert module.qdata is None if module.isa is not None else module.qdata is not None
print("ok", module.isa)
"""


@pytest.mark.parametrize("kernel", ["auto", "portable"])
def test_the_served_linear_prepacks_where_the_cpu_path_has_panels_and_runs_the_op_elsewhere(kernel):
    env = {**vllm_env(), "SERQ_CPU_KERNEL": kernel}
    done = subprocess.run([str(VLLM_PYTHON), "-c", PACKED_LINEAR_CHECK, str(ROOT)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]
    assert done.stdout.split()[1] == ("None" if kernel == "portable" else str(cpu_native_best_isa()))


def cpu_native_best_isa() -> int:
    from serq_ao.kernels import cpu_native

    return cpu_native.KERNELS.index(cpu_native.cpu_best())
