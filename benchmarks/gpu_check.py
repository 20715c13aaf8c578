"""The prepared GPU check: the Triton kernels and the packed default model on a real CUDA device.

    .venv/bin/python benchmarks/gpu_check.py                      # every check: a few minutes
    .venv/bin/python benchmarks/gpu_check.py --only kernel-ops,logits --windows 2
    .venv/bin/python benchmarks/gpu_check.py --device cuda:1 --out /tmp/gpu_check.json

Checks, in this order (``--only`` picks some):

- kernel-tests: ``pytest tests/kernels_interpret`` with TRITON_INTERPRET unset, so that Triton
  is the real backend: those tests make their inputs on the CPU, run the kernels on CUDA
  tensors and compare with their CPU references, under the same tolerances as under the
  interpreter (kernel-ops below compares the ops on CUDA with the same ops on CPU).
- sm90a-tests: ``pytest tests/kernels/test_gpu_compile.py`` (every kernel configuration
  compiles for sm_90a without register spills).
- kernel-ops: ``serq::quantize_activation_mxfp4``, ``serq::mxfp4_gemm`` and
  ``serq::linear_mxfp4`` on CUDA (the Triton kernels) against the same ops on CPU (their
  plain-PyTorch reference): activation codes and scales bit for bit; GEMM and linear outputs
  within fp32-accumulation tolerance; decode, middle and prefill sizes (each kernel config).
- logits: smollm2-135m quantized once on the CPU (SERQ, MXFP4, r = 64, 4 calibration
  windows), packed, run on CPU and on CUDA over ``--windows`` evaluation windows: max |diff|,
  ||diff|| / ||cpu|| and argmax agreement of the logits, next to the FP model's distance.
- cli-ppl: ``serq quantize --device cuda`` then ``serq eval ppl --device cuda`` against the same
  two commands on CPU in the same run (4 calibration windows, ``--windows`` evaluation windows);
  the CUDA-quantized folder is also evaluated on the CPU, which tells quantization differences
  from kernel differences.
- inductor: the packed model under ``torch.compile(fullgraph=True)`` on CUDA; both Triton kernels
  must appear in Inductor's output code and the compiled logits must match eager.
- linear-latency: ``benchmarks/linear_latency.py --device cuda --models smollm2``; its JSON is
  written beside ``--out`` (linear_latency_cuda.json) and its table printed after ours.
- vllm: the default model's serq folder served by vLLM's offline engine on CUDA (the plugin's
  Triton path; ``tests/vllm_driver.py`` in ``--vllm-python``, a Python whose vLLM is a CUDA
  build), float32, greedy on 4 prompts; serq's packed model on the same device, teacher-forced
  on vLLM's tokens, must agree on the argmax at >= 95% of the steps. Skipped where that Python
  is missing or its vLLM has no CUDA (.venv-vllm is vLLM's CPU build).

Each check runs in a process of its own with a time limit (a CUDA fault poisons its process's
context, a hang would eat the machine's time), so a failure is recorded with its error and the
others still run; the whole run stops starting checks at ``--time-limit`` (default 540 s, under
the 10 minutes a GPU command gets). Writes benchmarks/results/gpu_check.json (or ``--out``)
after every check, prints a table last, exits 1 if any check failed. Without CUDA it exits 2
at once, writing nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m"
RANK = 64
CALIBRATION_WINDOWS = 4  # calibration quality does not matter for CPU-vs-CUDA agreement
COMPILE_TOKENS = 128  # the inductor check's input: one window's first tokens
LATENCY_REPEATS = 3
# The kernels' entry points; Inductor's output code names user-defined Triton kernels after them.
KERNEL_NAMES = ("_quantize_activation_mxfp4_kernel", "_serq_mxfp4_gemm_kernel")

# Tolerances. fp32 sums in another order can move a later activation across a 4-bit rounding
# boundary, so a 30-layer model agrees closely, not bit for bit; a wrong kernel gives a
# relative difference of order 1 (quantization itself is ~0.3 away from FP).
ACCUMULATION_RTOL = 1e-5  # of sum |a w|: fp32 accumulation in another order (the kernel tests' bound)
BF16_ULP = 2.0**-7  # relative: two roundings of nearly equal fp32 sums to bf16 may differ by one ulp
LOGITS_MAX_REL_DIFF = 0.05
LOGITS_MIN_ARGMAX_AGREEMENT = 0.95
PPL_MAX_REL_DIFF = 0.02

# Seconds. A check's limit covers its whole process (imports, quantization, compilation).
TIME_LIMIT = 540
MIN_SECONDS_TO_START = 30
PYTEST_TIMEOUT = 200
# tests/kernels_interpret compiles about 150 kernel variants from scratch on a fresh machine (the
# whole run has TIME_LIMIT: run it alone, --only kernel-tests, if it needs longer)
KERNEL_TESTS_TIMEOUT = 300
CLI_TIMEOUT = 180  # one serq command
LATENCY_TIMEOUT = 300
VLLM_TIMEOUT = 300  # one vLLM engine: start (compilation) and 4 greedy completions
VLLM_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
                "The three primary colors are"]


# ----------------------------------------------------------------------------- outcomes


@dataclasses.dataclass
class Outcome:
    status: str  # "passed", "failed" or "skipped"
    figure: str  # the key figure (or the error), one line
    details: dict = dataclasses.field(default_factory=dict)


class CheckError(RuntimeError):
    """A failure with what was measured before it (``details`` goes to the JSON)."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# ----------------------------------------------------------------------------- processes


@dataclasses.dataclass
class Ran:
    returncode: int | None  # None: killed at its time limit
    stdout: str
    stderr: str
    seconds: float


def run_command(cmd: list[str], timeout: float, *, env: dict | None = None, own_group: bool = False) -> Ran:
    """Run ``cmd`` in the repository root; past ``timeout`` (or on Ctrl-C) kill it.

    The parent starts each check with ``own_group``: a process group of its own, which it kills
    whole, so that what the check started (pytest, serq, Inductor's compile workers), left in
    that group, goes with it. Inside a check, a command that times out is killed alone."""
    started = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               errors="replace", start_new_session=own_group)

    def kill():
        if own_group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()

    try:
        stdout, stderr = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        kill()
        try:
            stdout, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # something it started still holds its output open
            stdout, stderr = "", ""
        code = None
    except BaseException:
        kill()
        process.wait()
        raise
    return Ran(code, stdout, stderr, time.perf_counter() - started)


def tail(text: str, chars: int = 3000) -> str:
    return text[-chars:]


def ran_error(what: str, ran: Ran, timeout: float) -> CheckError:
    """A CheckError for a command that timed out or failed, with its output's tail."""
    reason = f"timed out after {timeout:.0f} s" if ran.returncode is None else f"exit status {ran.returncode}"
    last = [line for line in ran.stderr.splitlines() if line.strip()]
    message = f"{what}: {reason}" + (f": {last[-1].strip()}" if last else "")
    return CheckError(message, {"stdout_tail": tail(ran.stdout), "stderr_tail": tail(ran.stderr)})


def device_index(device: str) -> int | None:
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"not a CUDA device: {device!r}")
    return None if match.group(1) is None else int(match.group(1))


def cuda_env(device: str, environ: dict) -> dict:
    """``environ`` for a tool that takes only plain "cuda" (linear_latency.py): with cuda:N, N
    becomes the only visible device (the N-th of an existing CUDA_VISIBLE_DEVICES list)."""
    env = dict(environ)
    index = device_index(device)
    if index is None:
        return env
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    env["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
    return env


# ----------------------------------------------------------------------------- pytest checks


def pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's summary line ("48 passed, 3 skipped in 7.70s"): passed, failed,
    skipped, errors, ...; empty if there is none ("no tests ran" gives {})."""
    summary = [line for line in output.splitlines() if re.search(r"\bin \d+(\.\d+)?s\b", line)]
    if not summary:
        return {}
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", summary[-1]):
        counts["errors" if word.startswith("error") else word] = int(number)
    return counts


def pytest_skip_reasons(output: str) -> list[str]:
    """The reasons of ``-rs``'s "SKIPPED [n] path:line: reason" lines, first seen first."""
    reasons = re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", output, flags=re.MULTILINE)
    return list(dict.fromkeys(reasons))


def run_pytest(paths: list[str], timeout: float = PYTEST_TIMEOUT) -> Outcome:
    """pytest on ``paths`` with the real Triton backend (TRITON_INTERPRET removed); every
    failure is run and counted (no ``-x``): one device's quirk should not hide the rest."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *paths]
    ran = run_command(cmd, timeout, env=env)
    counts = pytest_counts(ran.stdout)
    details = {"command": " ".join(cmd[1:]), "counts": counts, "skip_reasons": pytest_skip_reasons(ran.stdout),
               "seconds": ran.seconds}
    summary = ", ".join(f"{n} {word}" for word, n in counts.items()) or "no tests ran"
    # exit status 5 is "no tests collected": not a failure of the kernels
    if ran.returncode not in (0, 5) or counts.get("failed") or counts.get("errors"):
        error = ran_error("pytest " + " ".join(paths), ran, timeout)
        return Outcome("failed", f"{summary}; {error}", {**details, **error.details})
    if not counts.get("passed"):
        reason = details["skip_reasons"][0] if details["skip_reasons"] else "nothing collected"
        return Outcome("skipped", f"{summary}: {reason}", details)
    return Outcome("passed", summary, details)


def check_kernel_tests(args) -> Outcome:
    return run_pytest(["tests/kernels_interpret"], KERNEL_TESTS_TIMEOUT)


def check_sm90a_tests(args) -> Outcome:
    return run_pytest(["tests/kernels/test_gpu_compile.py"])


# ----------------------------------------------------------------------------- kernel ops


def closeness(got, expected, magnitude, *, bf16: bool) -> tuple[float, float]:
    """(max |got - expected|, max |got - expected| / tolerance) over all elements, where the
    tolerance is ACCUMULATION_RTOL * magnitude (sum |a w| + |bias|), plus one bf16 ulp of
    ``expected`` for bf16 outputs. Within tolerance iff the ratio is <= 1; NaN counts as inf."""
    import torch

    got, expected, magnitude = (t.detach().cpu().double().reshape(magnitude.shape) for t in (got, expected, magnitude))
    tolerance = ACCUMULATION_RTOL * magnitude
    if bf16:
        tolerance = tolerance + BF16_ULP * expected.abs()
    error = (got - expected).abs().nan_to_num(nan=math.inf)
    ratio = error / tolerance.clamp_min(torch.finfo(torch.float64).tiny)
    return error.max().item(), ratio.max().item()


def random_activations(m: int, k: int, seed: int, *, special: bool = False):
    """(m, k) float32 with a per-row spread and outlier channels (x 1e3), as LLM activations;
    ``special`` adds an all-zero block (E8M0 byte 0) and an inf (byte 255, its block NaN)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))
    x[:, torch.randperm(k, generator=g)[: k // 32]] *= 1e3
    if special:
        x[0, :32] = 0.0
        x[-1, 40] = float("inf")
    return x


def pre_op(k: int, seed: int):
    """A flattening scale and a channel order, as a linear that kept its pre-op has (int16 order)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    return torch.exp(torch.randn(k, generator=g)), torch.randperm(k, generator=g).to(torch.int16)


def packed_weight(n: int, k: int, rank: int, seed: int, scale_inv=None, perm=None):
    """A SERQMXFP4Tensor ``[W^q | R]`` of a random (n, k) weight, packed as quantize_ packs."""
    import torch

    from serq_ao.formats import MXFP4Format
    from serq_ao.tensor_subclass import pack_weight
    from serq_ao.quant.reconstruct import serq_reconstruct

    g = torch.Generator().manual_seed(seed + 2)
    weight = torch.randn(n, k, generator=g) * torch.exp(torch.randn(1, k, generator=g))
    main, correction = serq_reconstruct(weight, rank, MXFP4Format())
    return pack_weight(MXFP4Format(), main, correction, input_scale_inv=scale_inv, input_perm=perm, dtype=torch.float32)


def gemm_magnitude(a_codes, a_scales, w_codes, w_scales, kp: int, rank: int, bias):
    """sum_k |a_k w_k| (+ |bias|) per output, float64: the scale of fp32 rounding there."""
    import torch

    from serq_ao.formats.mxfp4 import dequantize_mxfp4

    a = dequantize_mxfp4(a_codes, a_scales, dtype=torch.float64).reshape(-1, kp)
    w = dequantize_mxfp4(w_codes, w_scales, dtype=torch.float64)
    magnitude = a.abs() @ w[:, :kp].abs().T
    if rank:
        magnitude += a[:, :rank].abs() @ w[:, kp:].abs().T
    return magnitude if bias is None else magnitude + bias.double().abs()


def to_device(values: tuple, device) -> tuple:
    """The tensors among ``values`` moved to ``device``; the rest (ints, strings, dtypes) as they are."""
    import torch

    return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in values)


def case(op: str, name: str, ok: bool, max_error: float, worst_ratio: float) -> dict:
    return {"op": op, "case": name, "ok": ok, "max_error": max_error, "worst_ratio": worst_ratio}


# K and N of the default model (576 wide, MLP 1536); M picks the kernel configuration.
SIZES = {"decode": 1, "middle": 70, "prefill": 1024}
K, N = 576, 1536


def quantize_cases(device) -> list[dict]:
    """The activation quantizer, bit for bit: every config, input dtype, scale rule, pre-op."""
    import itertools

    import torch

    cases = []
    for (size, m), dtype, mode, with_pre_op in itertools.product(
        (("decode", SIZES["decode"]), ("prefill", SIZES["prefill"])), (torch.float32, torch.bfloat16),
        ("floor", "rceil"), (False, True),
    ):
        x = random_activations(m, K, seed=m, special=True).to(dtype)
        scale_inv, perm = pre_op(K, seed=m) if with_pre_op else (None, None)
        inputs = (x, mode, scale_inv, perm)
        expected = torch.ops.serq.quantize_activation_mxfp4(*inputs)
        got = torch.ops.serq.quantize_activation_mxfp4(*to_device(inputs, device))
        mismatches = sum(int((g.cpu() != e).sum()) for g, e in zip(got, expected))
        name = f"{size} M={m} K={K} {str(dtype).removeprefix('torch.')} {mode}{' pre-op' if with_pre_op else ''}"
        cases.append(case("quantize_activation_mxfp4", name, mismatches == 0, float(mismatches), float(mismatches)))
    return cases


def gemm_cases(device) -> list[dict]:
    """The GEMM over Kp + r: every config (decode, middle, prefill), fp32 and bf16 outputs,
    with and without bias, and one case without correction (r = 0)."""
    import itertools

    import torch

    from serq_ao.formats.mxfp4 import quantize_mxfp4

    cases = []
    dtypes, biases = (torch.float32, torch.bfloat16), (False, True)
    plan = [(*combo, RANK) for combo in itertools.product(SIZES.items(), dtypes, biases)]
    plan.append((("middle", SIZES["middle"]), torch.float32, True, 0))
    for (size, m), out_dtype, with_bias, rank in plan:
        a_codes, a_scales = quantize_mxfp4(random_activations(m, K, seed=m))
        weight = packed_weight(N, K, rank, seed=m)
        bias = torch.randn(N, generator=torch.Generator().manual_seed(m)) if with_bias else None
        inputs = (a_codes, a_scales, weight.qdata, weight.scale, K, rank, bias, out_dtype)
        expected = torch.ops.serq.mxfp4_gemm(*inputs)
        got = torch.ops.serq.mxfp4_gemm(*to_device(inputs, device))
        magnitude = gemm_magnitude(a_codes, a_scales, weight.qdata, weight.scale, K, rank, bias)
        error, ratio = closeness(got, expected, magnitude, bf16=out_dtype == torch.bfloat16)
        name = f"{size} M={m} K={K}+{rank} N={N} {str(out_dtype).removeprefix('torch.')}{' bias' if with_bias else ''}"
        cases.append(case("mxfp4_gemm", name, ratio <= 1, error, ratio))
    return cases


def linear_cases(device) -> list[dict]:
    """The whole linear (quantize + GEMM), as the packed model calls it: 2-D and 3-D inputs,
    fp32 and bf16, with and without pre-op, the down_proj shape at prefill."""
    import torch

    cases = []
    for shape, n, dtype, with_pre_op in (
        ((1, K), N, torch.float32, False),
        ((3, 7, K), N, torch.float32, True),
        ((70, K), N, torch.bfloat16, True),
        ((SIZES["prefill"], N), K, torch.float32, True),
        ((2, 512, N), K, torch.bfloat16, False),
    ):
        d_in, seed = shape[-1], sum(shape)
        x = random_activations(math.prod(shape[:-1]), d_in, seed=seed).reshape(shape).to(dtype)
        scale_inv, perm = pre_op(d_in, seed) if with_pre_op else (None, None)
        weight = packed_weight(n, d_in, RANK, seed, scale_inv, perm)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
        inputs = (x, weight.qdata, weight.scale, d_in, RANK, "floor", weight.input_scale_inv, weight.input_perm, bias)
        expected = torch.ops.serq.linear_mxfp4(*inputs)
        got = torch.ops.serq.linear_mxfp4(*to_device(inputs, device))
        # the magnitude of the GEMM that follows the (bit-exact) activation quantization
        codes, scales = torch.ops.serq.quantize_activation_mxfp4(x, "floor", weight.input_scale_inv, weight.input_perm)
        kp = codes.shape[-1] * 2
        magnitude = gemm_magnitude(codes, scales, weight.qdata, weight.scale, kp, RANK, bias)
        error, ratio = closeness(got, expected, magnitude, bf16=dtype == torch.bfloat16)
        name = f"x {tuple(shape)} N={n} r={RANK} {str(dtype).removeprefix('torch.')}{' pre-op' if with_pre_op else ''}"
        cases.append(case("linear_mxfp4", name, ratio <= 1, error, ratio))
    return cases


def kernel_cases(device) -> list[dict]:
    """Every comparison of the ops on ``device`` against the same ops on CPU."""
    return [*quantize_cases(device), *gemm_cases(device), *linear_cases(device)]


def check_kernel_ops(args) -> Outcome:
    import torch

    cases = kernel_cases(torch.device(args.device))
    failed = [c for c in cases if not c["ok"]]
    numeric = [c["worst_ratio"] for c in cases if c["op"] != "quantize_activation_mxfp4"]
    figure = (f"{len(cases) - len(failed)}/{len(cases)} cases match; quantize bit-exact, "
              f"worst GEMM/linear error {max(numeric):.2g} x tolerance")
    if failed:
        figure += f"; first failure: {failed[0]['op']} {failed[0]['case']}"
    return Outcome("failed" if failed else "passed", figure, {"cases": cases})


# ----------------------------------------------------------------------------- the default model


class LogitsDiff:
    """Running comparison of a model's logits with a reference's, window after window:
    max |diff|, ||diff|| / ||reference|| and the fraction of positions whose argmax agrees.
    A NaN or inf in either makes the differences inf."""

    def __init__(self):
        self.max_abs = 0.0
        self.diff_sq = 0.0
        self.reference_sq = 0.0
        self.agree = 0
        self.positions = 0

    def add(self, reference, other) -> None:
        """Logits (..., V) of the same positions, any device (compared on the CPU in float64)."""
        reference, other = reference.detach().cpu().double(), other.detach().cpu().double()
        if reference.shape != other.shape:
            raise ValueError(f"logits shapes differ: {tuple(reference.shape)} and {tuple(other.shape)}")
        diff = (other - reference).nan_to_num(nan=math.inf)
        self.max_abs = max(self.max_abs, diff.abs().max().item())
        self.diff_sq += diff.square().sum().item()
        self.reference_sq += reference.square().sum().item()
        self.agree += int((reference.argmax(-1) == other.argmax(-1)).sum())
        self.positions += reference[..., 0].numel()

    def summary(self) -> dict:
        finite = math.isfinite(self.diff_sq) and math.isfinite(self.reference_sq) and self.reference_sq > 0
        rel = math.sqrt(self.diff_sq / self.reference_sq) if finite else math.inf
        return {"max_abs_diff": self.max_abs, "rel_diff": rel,
                "argmax_agreement": self.agree / self.positions if self.positions else math.nan,
                "positions": self.positions}


def logits_agree(summary: dict) -> bool:
    return summary["rel_diff"] <= LOGITS_MAX_REL_DIFF and summary["argmax_agreement"] >= LOGITS_MIN_ARGMAX_AGREEMENT


def quantized_default_model():
    """(FP model, packed SERQ model, tokenizer) of smollm2-135m, float32 on the CPU."""
    import copy

    import serq_ao
    from serq_ao.data import calibration_batches
    from serq_ao.models import load_model

    fp_model, tokenizer = load_model(MODEL)
    model = copy.deepcopy(fp_model)
    config = serq_ao.SERQConfig(method="serq", format="mxfp4", rank=RANK)
    serq_ao.quantize_(model, config, calibration_batches(tokenizer, "wiki", n_windows=CALIBRATION_WINDOWS))
    return fp_model, model, tokenizer


def check_logits(args) -> Outcome:
    import copy

    import torch

    from serq_ao.data import evaluation_windows

    fp_model, model, tokenizer = quantized_default_model()
    on_device = copy.deepcopy(model).to(args.device)
    kernels, quantization = LogitsDiff(), LogitsDiff()
    with torch.no_grad():
        for window in evaluation_windows(tokenizer, "wiki", n_windows=args.windows).split(1):
            cpu = model(window, use_cache=False).logits
            kernels.add(cpu, on_device(window.to(args.device), use_cache=False).logits)
            quantization.add(fp_model(window, use_cache=False).logits, cpu)
    got, scale = kernels.summary(), quantization.summary()
    figure = (f"rel diff {got['rel_diff']:.2e}, max |diff| {got['max_abs_diff']:.3g}, argmax agree "
              f"{got['argmax_agreement']:.4f} over {got['positions']} positions "
              f"(FP vs quantized: rel {scale['rel_diff']:.2f})")
    details = {"cuda_vs_cpu": got, "quantized_vs_fp_on_cpu": scale, "windows": args.windows,
               "calibration_windows": CALIBRATION_WINDOWS}
    return Outcome("passed" if logits_agree(got) else "failed", figure, details)


def serq_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "serq_ao.cli.main", *argv]


def run_json(what: str, cmd: list[str]) -> dict:
    """Run a ``serq ... --json`` command; its JSON record, or a CheckError with its output."""
    ran = run_command(cmd, CLI_TIMEOUT)
    if ran.returncode != 0:
        raise ran_error(what, ran, CLI_TIMEOUT)
    try:
        return {**json.loads(ran.stdout), "wall_seconds": ran.seconds}
    except ValueError:
        raise CheckError(f"{what}: its --json output is not JSON", {"stdout_tail": tail(ran.stdout)}) from None


def check_cli_ppl(args) -> Outcome:
    import shutil

    devices = {"device": args.device, "cpu": "cpu"}  # role -> where it runs
    work = Path(tempfile.mkdtemp(prefix="gpu_check_cli_"))
    try:
        quantize, ppl = {}, {}
        for role, device in devices.items():
            quantize[role] = run_json(f"serq quantize --device {device}", serq_command(
                "quantize", MODEL, "--method", "serq", "--format", "mxfp4", "--rank", str(RANK),
                "--calib-windows", str(CALIBRATION_WINDOWS), "--no-diagnostics", "--device", device,
                "--out", str(work / role), "--json", "--quiet"))
        # (quantized on, evaluated on); the cross pair tells quantization from kernel differences
        for made, evaluated in (("device", "device"), ("cpu", "cpu"), ("device", "cpu")):
            ppl[f"{made}/{evaluated}"] = run_json(f"serq eval ppl --device {devices[evaluated]}", serq_command(
                "eval", "ppl", str(work / made), "--windows", str(args.windows), "--device", devices[evaluated],
                "--json", "--quiet"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    on_device, on_cpu = ppl["device/device"]["ppl"], ppl["cpu/cpu"]["ppl"]
    rel = on_device / on_cpu - 1
    figure = (f"ppl {on_device:.3f} (quantized and evaluated on {args.device}) vs {on_cpu:.3f} (cpu), {rel:+.2%}; "
              f"{ppl['device/cpu']['ppl']:.3f} for the {args.device} quantization on cpu; {args.windows} windows")
    details = {"device": args.device, "ppl": {pair: record["ppl"] for pair, record in ppl.items()},
               "rel_diff": rel, "windows": args.windows, "calibration_windows": CALIBRATION_WINDOWS,
               "quantize": quantize, "eval": ppl}
    return Outcome("passed" if abs(rel) <= PPL_MAX_REL_DIFF else "failed", figure, details)


def kernel_mentions(codes: Iterable[str], names: Iterable[str]) -> dict[str, list[str]]:
    """For each kernel name, the lines of Inductor's output code that name it (as a whole
    word: ``triton_gemm_kernel`` is not ``gemm_kernel``), stripped."""
    lines = [line.strip() for code in codes for line in code.splitlines()]
    return {name: [line for line in lines if re.search(rf"(?<![\w]){re.escape(name)}(?![a-zA-Z])", line)]
            for name in names}


def check_inductor(args) -> Outcome:
    import torch
    from torch._inductor.utils import run_and_get_code

    from serq_ao.data import evaluation_windows

    _, model, tokenizer = quantized_default_model()
    model = model.to(args.device)
    ids = evaluation_windows(tokenizer, "wiki", n_windows=1)[:, :COMPILE_TOKENS].to(args.device)

    def forward(ids):
        return model(ids, use_cache=False).logits

    with torch.no_grad():
        eager = forward(ids)
        started = time.perf_counter()
        compiled, codes = run_and_get_code(torch.compile(forward, fullgraph=True), ids)
        compile_seconds = time.perf_counter() - started
    mentions = kernel_mentions(codes, KERNEL_NAMES)
    diff = LogitsDiff()
    diff.add(eager, compiled)
    missing = [name for name, lines in mentions.items() if not lines]
    # an op Inductor could not see into would stay a call of torch.ops.serq.*: worth knowing
    fallbacks = sum(code.count("torch.ops.serq.") for code in codes)
    agreement = diff.summary()
    figure = (", ".join(f"{name} in {len(lines)} lines" for name, lines in mentions.items())
              + f"; compiled vs eager rel {agreement['rel_diff']:.1e}; first call {compile_seconds:.0f} s")
    if missing:
        figure = f"not in Inductor's output code: {', '.join(missing)}; " + figure
    details = {"kernel_lines": {name: lines[:5] for name, lines in mentions.items()},
               "serq_op_fallback_calls": fallbacks, "compiled_vs_eager": agreement, "tokens": COMPILE_TOKENS,
               "first_call_seconds": compile_seconds, "code_modules": len(codes),
               "code_chars": sum(len(code) for code in codes)}
    return Outcome("passed" if not missing and logits_agree(agreement) else "failed", figure, details)


def latency_json(out: Path) -> Path:
    return out.parent / "linear_latency_cuda.json"


def check_linear_latency(args) -> Outcome:
    out = latency_json(args.out)
    cmd = [sys.executable, "benchmarks/linear_latency.py", "--device", "cuda", "--models", "smollm2",
           "--repeats", str(LATENCY_REPEATS), "--out", str(out)]
    ran = run_command(cmd, LATENCY_TIMEOUT, env=cuda_env(args.device, os.environ))
    if ran.returncode != 0:
        raise ran_error("benchmarks/linear_latency.py", ran, LATENCY_TIMEOUT)
    rows = json.loads(out.read_text())["rows"]
    ratios = [r["serq_over_mxfp4"] for r in rows]
    within = sum(r["within_budget"] for r in rows)
    figure = (f"{len(rows)} cases, SERQ / MXFP4 {min(ratios):.2f} to {max(ratios):.2f}, "
              f"{within}/{len(rows)} within r/K + 3 %; {out.name}")
    # the benchmark's table: what its stdout ends with
    table = ran.stdout[ran.stdout.find("One linear"):] if "One linear" in ran.stdout else tail(ran.stdout)
    return Outcome("passed", figure, {"json": str(out), "command": " ".join(cmd[1:]), "table": table,
                                      "seconds": ran.seconds})


def check_vllm(args) -> Outcome:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    python, env = Path(args.vllm_python), cuda_env(args.device, os.environ)
    if not python.exists():
        return Outcome("skipped", f"no vLLM environment at {python} (--vllm-python)")
    probe = run_command([str(python), "-c", "import torch, vllm; print(torch.cuda.is_available())"], 120, env=env)
    if probe.returncode != 0 or probe.stdout.strip().splitlines()[-1:] != ["True"]:
        return Outcome("skipped", f"the vLLM of {python} has no CUDA ({tail(probe.stdout + probe.stderr, 200)!r})")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_vllm_"))
    try:
        folder, out, prompts = work / "serq", work / "vllm.json", work / "prompts.json"
        run_json("serq quantize", serq_command("quantize", MODEL, "--calib-windows", str(CALIBRATION_WINDOWS),
                                               "--no-diagnostics", "--out", str(folder), "--json", "--quiet"))
        prompts.write_text(json.dumps(VLLM_PROMPTS))
        ran = run_command([str(python), str(ROOT / "tests" / "vllm_driver.py"), str(folder), str(out), "--prompts",
                           str(prompts), "--max-tokens", "16", "--memory-share", "0.5"], VLLM_TIMEOUT, env=env)
        if ran.returncode != 0:
            raise ran_error("vLLM's offline engine", ran, VLLM_TIMEOUT)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(args.device).eval()
        steps = agree = 0
        max_diff = 0.0
        for result in json.loads(out.read_text()):
            prompt, tokens = result["prompt_ids"], result["tokens"]
            with torch.no_grad():
                ids = torch.tensor([prompt + tokens], device=args.device)
                logprobs = torch.log_softmax(model(ids).logits.float(), -1)[0].cpu()
            for k, token in enumerate(tokens):
                row = logprobs[len(prompt) - 1 + k]
                steps, agree = steps + 1, agree + int(row.argmax().item() == token)
                max_diff = max(max_diff, abs(row[token].item() - result["top"][k][str(token)]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figure = f"argmax agree {agree}/{steps} steps, max |logprob diff| {max_diff:.2e} (vLLM vs serq on {args.device})"
    details = {"steps": steps, "argmax_agreement": agree / steps, "max_logprob_diff": max_diff,
               "vllm_seconds": ran.seconds}
    return Outcome("passed" if agree >= LOGITS_MIN_ARGMAX_AGREEMENT * steps else "failed", figure, details)


# ----------------------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True)
class Check:
    run: Callable[[argparse.Namespace], Outcome]
    time_limit: int  # seconds for its whole process
    what: str


CHECKS: dict[str, Check] = {
    "kernel-tests": Check(check_kernel_tests, KERNEL_TESTS_TIMEOUT + 20,
                          "tests/kernels_interpret on the real Triton backend"),
    "sm90a-tests": Check(check_sm90a_tests, PYTEST_TIMEOUT + 20, "tests/kernels/test_gpu_compile.py"),
    "kernel-ops": Check(check_kernel_ops, 240, "the serq ops on CUDA against their CPU reference"),
    "logits": Check(check_logits, 240, f"packed {MODEL}, CUDA against CPU logits"),
    "cli-ppl": Check(check_cli_ppl, 5 * CLI_TIMEOUT, "serq quantize + eval ppl, CUDA against CPU"),
    "inductor": Check(check_inductor, 360, "torch.compile of the packed model: the kernels in Inductor's code"),
    "linear-latency": Check(check_linear_latency, LATENCY_TIMEOUT + 20, "benchmarks/linear_latency.py --device cuda"),
    "vllm": Check(check_vllm, CLI_TIMEOUT + VLLM_TIMEOUT + 120, "vLLM's engine with serq's plugin on CUDA"),
}


def run_in_child(args) -> int:
    """The child's side: run the one check named by --only, write its Outcome to --child-result."""
    import torch

    import serq_ao  # noqa: F401  (registers the serq ops; quiets torchao)
    from serq_ao.files import strict_json

    name = args.only[0]
    try:
        if device_index(args.device) is not None:  # Triton launches on the current device, not the tensors'
            torch.cuda.set_device(device_index(args.device))
        outcome = CHECKS[name].run(args)
    except Exception as error:  # recorded, not raised: the parent reports it as this check's failure
        details = error.details if isinstance(error, CheckError) else {}
        outcome = Outcome("failed", one_line(error), {**details, "traceback": tail(traceback.format_exc(), 4000)})
    Path(args.child_result).write_text(strict_json(dataclasses.asdict(outcome)))
    return 0


def run_isolated(name: str, args, time_limit: float, result_path: Path) -> Outcome:
    """The parent's side: this script again, in a process of its own, for the one check."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", name, "--device", args.device,
           "--windows", str(args.windows), "--out", str(args.out), "--vllm-python", args.vllm_python,
           "--child-result", str(result_path)]
    result_path.unlink(missing_ok=True)
    ran = run_command(cmd, time_limit, own_group=True)
    if ran.returncode == 0 and result_path.is_file():
        return Outcome(**json.loads(result_path.read_text()))
    error = ran_error(f"the {name} process", ran, time_limit)  # a crash (segfault) or the time limit
    return Outcome("failed", str(error), error.details)


# ----------------------------------------------------------------------------- arguments


def cuda_device(value: str) -> str:
    try:
        device_index(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be cuda or cuda:N (N = 0, 1, ...), got {value!r}") from None
    return value


def check_names(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown check(s) {unknown or [value]}; choose from {', '.join(CHECKS)}")
    return [n for n in CHECKS if n in names]  # the checks' own order


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return number


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=check_names, default=list(CHECKS), metavar="CHECK[,CHECK]",
                        help=f"run these checks only, of: {', '.join(CHECKS)} (default: all)")
    parser.add_argument("--windows", type=positive_int, default=4,
                        help="evaluation windows (1,024 tokens) for logits and cli-ppl (default 4)")
    parser.add_argument("--device", type=cuda_device, default="cuda", help="cuda or cuda:N (default cuda)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json", help="the JSON result")
    parser.add_argument("--time-limit", type=positive_int, default=TIME_LIMIT,
                        help=f"seconds after which no further check starts (default {TIME_LIMIT})")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                        help="a Python with a CUDA build of vLLM and serq-ao, for the vllm check (default .venv-vllm)")
    parser.add_argument("--child-result", help=argparse.SUPPRESS)  # internal: run one check, write its outcome here
    return parser.parse_args(argv)


def cuda_problem(device: str, available: bool, count: int) -> str | None:
    """Why ``device`` cannot be used here (one line), or None."""
    if not available:
        return f"--device {device}: CUDA is not available here (torch.cuda.is_available() is False)"
    index = device_index(device)
    if index is not None and index >= count:
        return f"--device {device}: this machine has {count} CUDA device(s), numbered from 0"
    return None


def check_out(path: Path) -> None:
    """Refuse a bad --out before any work, by the rules write_json applies at the end."""
    from serq_ao.bench import check_json_result_path
    from serq_ao.files import check_destination

    check_destination(path, option="--out", folder=False, overwrite=True)
    check_json_result_path(path, option="--out")


# ----------------------------------------------------------------------------- the run


def gpu_info(device: str) -> dict:
    import torch
    import triton

    properties = torch.cuda.get_device_properties(torch.device(device))
    return {"name": properties.name, "capability": f"{properties.major}.{properties.minor}",
            "memory_gib": round(properties.total_memory / 2**30, 1), "cuda": torch.version.cuda,
            "triton": triton.__version__}


def print_table(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    colors = {"passed": "green", "failed": "red", "skipped": "yellow"}
    table = Table(title=f"GPU check on {record['gpu']['name']} ({record['device']}), "
                        f"{record['windows']} evaluation windows")
    for column, justify in (("check", "left"), ("result", "left"), ("key figure", "left"), ("seconds", "right")):
        table.add_column(column, justify=justify)
    for r in record["checks"]:
        table.add_row(r["name"], f"[{colors[r['status']]}]{r['status']}[/]", r["figure"], f"{r['seconds']:.0f}")
    console = Console(width=200)
    latency = next((r for r in record["checks"] if r["name"] == "linear-latency" and r["details"].get("table")), None)
    if latency:
        console.print(latency["details"]["table"], markup=False, highlight=False)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_result:
        return run_in_child(args)

    import torch

    problem = cuda_problem(args.device, torch.cuda.is_available(),
                           torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if problem is None:
        import serq_ao  # noqa: F401  (quiets torchao's logs before anything imports it)
        from serq_ao.files import OutputError

        try:
            check_out(args.out)
        except OutputError as error:
            problem = str(error)
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    from serq_ao.bench import machine_info, write_json

    record = {"model": MODEL, "rank": RANK, "device": args.device, "gpu": gpu_info(args.device),
              "windows": args.windows, "calibration_windows": CALIBRATION_WINDOWS,
              "thresholds": {"accumulation_rtol": ACCUMULATION_RTOL, "logits_max_rel_diff": LOGITS_MAX_REL_DIFF,
                             "logits_min_argmax_agreement": LOGITS_MIN_ARGMAX_AGREEMENT,
                             "ppl_max_rel_diff": PPL_MAX_REL_DIFF},
              "checks": [], "complete": False, "passed": None, "machine": machine_info(),
              "command": " ".join(["benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])}
    deadline = time.monotonic() + args.time_limit
    scratch = tempfile.TemporaryDirectory(prefix="gpu_check_")
    result_path = Path(scratch.name) / "outcome.json"
    try:
        for number, name in enumerate(args.only, 1):
            print(f"[{number}/{len(args.only)}] {name}: {CHECKS[name].what}", file=sys.stderr, flush=True)
            started, remaining = time.perf_counter(), deadline - time.monotonic()
            if remaining < MIN_SECONDS_TO_START:
                outcome = Outcome("skipped", f"not started: --time-limit {args.time_limit} s was spent")
            else:
                outcome = run_isolated(name, args, min(CHECKS[name].time_limit, remaining), result_path)
            seconds = time.perf_counter() - started
            record["checks"].append({"name": name, **dataclasses.asdict(outcome), "seconds": seconds})
            print(f"    {outcome.status} in {seconds:.0f} s: {outcome.figure}", file=sys.stderr, flush=True)
            write_json(args.out, record)  # after every check: a killed run keeps what it finished
    except KeyboardInterrupt:  # run_command has already ended the running check's processes
        print("gpu_check: interrupted", file=sys.stderr)
        return 130
    finally:
        scratch.cleanup()
    record["complete"] = True
    record["passed"] = not any(c["status"] == "failed" for c in record["checks"])
    write_json(args.out, record)
    print_table(record)
    print(f"wrote {args.out}")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
