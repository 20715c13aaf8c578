"""benchmarks/gpu_check.py on a machine without CUDA: its command line (help, the clean refusal,
argument errors) and its pure helpers on real inputs. The checks themselves need a GPU."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)


def run_script(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- the command line


def test_help_lists_every_check():
    ran = run_script("--help")
    assert ran.returncode == 0, ran.stderr
    for option in ("--only", "--windows", "--out", "--device", "--time-limit"):
        assert option in ran.stdout
    for name in gpu_check.CHECKS:
        assert name in ran.stdout
    assert "--child-result" not in ran.stdout  # internal


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_refuses_cleanly_without_cuda(tmp_path):
    out = tmp_path / "gpu_check.json"
    ran = run_script("--out", str(out))
    assert ran.returncode == 2
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1, ran.stderr
    assert lines[0].startswith("gpu_check: --device cuda: CUDA is not available")
    assert "torch.cuda.is_available()" in lines[0]
    assert "Traceback" not in ran.stderr
    assert ran.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no JSON, no lock, no scratch file


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_refusal_names_the_device_asked_for(tmp_path):
    ran = run_script("--device", "cuda:1", "--only", "logits", "--out", str(tmp_path / "r.json"))
    assert ran.returncode == 2
    assert ran.stderr.startswith("gpu_check: --device cuda:1: CUDA is not available")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, option, words", [
    (["--device", "cpu"], "--device", "cuda or cuda:N"),
    (["--device", "cuda:x"], "--device", "cuda or cuda:N"),
    (["--device", "mps"], "--device", "cuda or cuda:N"),
    (["--only", "nosuch"], "--only", "nosuch"),
    (["--only", "logits,nosuch"], "--only", "kernel-tests"),  # lists the allowed names
    (["--only", ","], "--only", "choose from"),
    (["--windows", "0"], "--windows", "positive integer"),
    (["--windows", "two"], "--windows", "positive integer"),
    (["--time-limit", "-5"], "--time-limit", "positive integer"),
])
def test_bad_arguments_are_usage_errors(tmp_path, argv, option, words):
    out = tmp_path / "r.json"
    ran = run_script(*argv, "--out", str(out))
    assert ran.returncode == 2
    last = ran.stderr.strip().splitlines()[-1]
    assert f"argument {option}:" in last and words in last, ran.stderr
    assert "Traceback" not in ran.stderr
    assert not out.exists()


def test_only_keeps_the_checks_order_once_each():
    assert gpu_check.check_names("inductor,logits,inductor") == ["logits", "inductor"]
    assert gpu_check.parse_args([]).only == list(gpu_check.CHECKS)
    assert gpu_check.parse_args(["--device", "cuda:3"]).device == "cuda:3"


def test_cuda_problem():
    assert "torch.cuda.is_available() is False" in gpu_check.cuda_problem("cuda", False, 0)
    assert "has 1 CUDA device" in gpu_check.cuda_problem("cuda:1", True, 1)
    assert gpu_check.cuda_problem("cuda:0", True, 1) is None
    assert gpu_check.cuda_problem("cuda", True, 2) is None


def test_cuda_env_makes_plain_cuda_the_device_asked_for():
    assert "CUDA_VISIBLE_DEVICES" not in gpu_check.cuda_env("cuda", {"PATH": "/bin"})
    assert gpu_check.cuda_env("cuda:1", {})["CUDA_VISIBLE_DEVICES"] == "1"
    assert gpu_check.cuda_env("cuda:1", {"CUDA_VISIBLE_DEVICES": "4, 5"})["CUDA_VISIBLE_DEVICES"] == "5"
    assert gpu_check.cuda_env("cuda", {"CUDA_VISIBLE_DEVICES": "4,5"})["CUDA_VISIBLE_DEVICES"] == "4,5"


def test_check_out_refuses_what_write_json_would(tmp_path):
    from serq_ao.files import OutputError

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(OutputError, match="--out: .* not a JSON result"):
        gpu_check.check_out(notes)
    with pytest.raises(OutputError, match="--out: .* is a folder"):
        gpu_check.check_out(tmp_path)
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"checks": []}))
    gpu_check.check_out(earlier)  # an earlier result may be replaced
    gpu_check.check_out(tmp_path / "new.json")


# ----------------------------------------------------------------------------- processes


def process_gone(pid: int, wait: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_check_past_its_time_limit_goes_with_what_it_started(tmp_path):
    """own_group: the check's process and its children (a pytest, a serq) are killed together."""
    pid_file = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pid_file}; echo started; wait"
    ran = gpu_check.run_command(["bash", "-c", script], timeout=1, own_group=True)
    assert ran.returncode is None and ran.stdout == "started\n" and ran.seconds < 10
    assert process_gone(int(pid_file.read_text()))
    error = gpu_check.ran_error("the sleeper", ran, 1)
    assert str(error) == "the sleeper: timed out after 1 s" and error.details["stdout_tail"] == "started\n"


def test_a_failed_command_reports_its_last_error_line():
    ran = gpu_check.run_command([sys.executable, "-c", "import sys; sys.exit('serq: error: --out: bad')"], timeout=60)
    assert ran.returncode == 1
    assert str(gpu_check.ran_error("serq quantize", ran, 60)) == "serq quantize: exit status 1: serq: error: --out: bad"


# ----------------------------------------------------------------------------- pytest results


def write_tests(folder: Path, body: str) -> Path:
    path = folder / "test_sample.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_run_pytest_reads_passes_skips_and_failures(tmp_path):
    (tmp_path / "mixed").mkdir()
    mixed = write_tests(tmp_path / "mixed", """
        import pytest
        def test_a(): pass
        def test_b(): pass
        @pytest.mark.skip(reason="not here")
        def test_c(): pass
    """)
    outcome = gpu_check.run_pytest([str(mixed)])
    assert outcome.status == "passed" and outcome.details["counts"] == {"passed": 2, "skipped": 1}
    assert outcome.details["skip_reasons"] == ["not here"]

    (tmp_path / "skipped").mkdir()
    skipped = write_tests(tmp_path / "skipped", """
        import pytest
        pytest.skip("needs TRITON_INTERPRET=1", allow_module_level=True)
    """)
    outcome = gpu_check.run_pytest([str(skipped)])
    assert outcome.status == "skipped" and "needs TRITON_INTERPRET=1" in outcome.figure

    (tmp_path / "failing").mkdir()
    failing = write_tests(tmp_path / "failing", """
        import os
        def test_ok(): pass
        def test_interpreter_is_off(): assert os.environ.get("TRITON_INTERPRET") == "1", "interpreter off"
    """)
    outcome = gpu_check.run_pytest([str(failing)])
    assert outcome.status == "failed" and outcome.details["counts"] == {"passed": 1, "failed": 1}


def test_pytest_counts_of_summary_lines():
    assert gpu_check.pytest_counts("....\n48 passed in 7.70s\n") == {"passed": 48}
    assert gpu_check.pytest_counts("== 1 failed, 2 passed, 3 skipped, 1 error in 1.00s ==") == {
        "failed": 1, "passed": 2, "skipped": 3, "errors": 1}
    assert gpu_check.pytest_counts("no tests ran in 0.01s") == {}
    assert gpu_check.pytest_counts("Traceback ...") == {}


# ----------------------------------------------------------------------------- comparisons


def test_logits_diff_over_windows():
    diff = gpu_check.LogitsDiff()
    reference = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]])
    other = torch.tensor([[[1.0, 2.0, 3.5], [3.0, 4.0, 1.0]]])
    diff.add(reference, other)  # one window: argmax agrees at position 0 only
    diff.add(reference, reference)  # a second window, identical
    summary = diff.summary()
    assert summary["max_abs_diff"] == 2.0
    assert summary["rel_diff"] == pytest.approx(math.sqrt(0.25 + 4.0) / math.sqrt(2 * 28.0))
    assert summary["argmax_agreement"] == 0.75 and summary["positions"] == 4
    assert not gpu_check.logits_agree(summary)  # rel diff 0.28
    assert gpu_check.logits_agree(gpu_check.LogitsDiff().summary() | {"rel_diff": 0.01, "argmax_agreement": 0.99})


def test_logits_diff_nan_is_a_failure_and_shapes_must_match():
    diff = gpu_check.LogitsDiff()
    reference = torch.randn(1, 4, 10)
    broken = reference.clone()
    broken[0, 2, 3] = float("nan")
    diff.add(reference, broken)
    summary = diff.summary()
    assert summary["max_abs_diff"] == math.inf and summary["rel_diff"] == math.inf
    assert not gpu_check.logits_agree(summary)
    with pytest.raises(ValueError, match="shapes differ"):
        diff.add(reference, reference[:, :3])


def test_closeness_tolerates_accumulation_order_and_catches_a_dropped_correction():
    """The CPU reference GEMM against itself, a reordered sum, and the GEMM without R."""
    from serq_ao.formats.mxfp4 import dequantize_mxfp4, quantize_mxfp4

    m, k, n, rank = 5, 96, 48, 32
    a_codes, a_scales = quantize_mxfp4(gpu_check.random_activations(m, k, seed=0))
    weight = gpu_check.packed_weight(n, k, rank, seed=0)
    expected = torch.ops.serq.mxfp4_gemm(a_codes, a_scales, weight.qdata, weight.scale, k, rank, None, torch.float32)
    magnitude = gpu_check.gemm_magnitude(a_codes, a_scales, weight.qdata, weight.scale, k, rank, None)
    assert gpu_check.closeness(expected, expected, magnitude, bf16=False) == (0.0, 0.0)
    a = dequantize_mxfp4(a_codes, a_scales, dtype=torch.float64)
    w = dequantize_mxfp4(weight.qdata, weight.scale, dtype=torch.float64)
    exact = a @ w[:, :k].T + a[:, :rank] @ w[:, k:].T  # the same sums in float64
    assert gpu_check.closeness(expected, exact, magnitude, bf16=False)[1] <= 1
    # fp32 sums in another order differ by far less than 1e-5 of sum |a w|; 2e-5 is too much
    assert 0.09 < gpu_check.closeness(expected + 1e-6 * magnitude, exact, magnitude, bf16=False)[1] <= 0.11
    assert gpu_check.closeness(expected + 2e-5 * magnitude, exact, magnitude, bf16=False)[1] > 1.9
    no_correction = torch.ops.serq.mxfp4_gemm(a_codes, a_scales, weight.qdata[:, : k // 2].contiguous(),
                                              weight.scale[:, : k // 32].contiguous(), k, 0, None, torch.float32)
    assert gpu_check.closeness(no_correction, expected, magnitude, bf16=False)[1] > 100
    # bf16: one ulp apart passes, two do not
    value = torch.tensor([[1.5]])
    one_ulp, two_ulps = value + 2.0**-7, value + 2.0**-6
    assert gpu_check.closeness(one_ulp, value, torch.zeros(1, 1), bf16=True)[1] <= 1
    assert gpu_check.closeness(two_ulps, value, torch.zeros(1, 1), bf16=True)[1] > 1
    nan = expected.clone()
    nan[0, 0] = float("nan")
    assert gpu_check.closeness(nan, expected, magnitude, bf16=False)[1] == math.inf


def test_quantize_cases_run_on_cpu():
    """The bit-exact comparison's plumbing, CPU against CPU: every case present and matching."""
    cases = gpu_check.quantize_cases(torch.device("cpu"))
    assert len(cases) == 16 and all(c["ok"] and c["max_error"] == 0 for c in cases)
    assert any("rceil pre-op" in c["case"] for c in cases)


# ----------------------------------------------------------------------------- Inductor's code

INDUCTOR_CODE = """
# kernel path: /tmp/torchinductor_root/ab/cabc.py
_quantize_activation_mxfp4_kernel_0 = async_compile.triton('_quantize_activation_mxfp4_kernel', '''
@triton.jit
def _quantize_activation_mxfp4_kernel(x_ptr, scale_inv_ptr, perm_ptr, codes_ptr, scales_ptr, M, K):
    pass
''', device_str='cuda')
triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', '''...''')
def call(args):
    _quantize_activation_mxfp4_kernel_0.run(buf0, arg1_1, arg2_1, buf1, buf2, 128, 576, stream=stream0)
    my_serq_mxfp4_gemm_kernel_2.run(buf1, buf2)  # another kernel whose name contains ours
    _serq_mxfp4_gemm_kernelX.run(buf1, buf2)
"""


def test_kernel_mentions_finds_user_defined_kernels_by_whole_name():
    mentions = gpu_check.kernel_mentions([INDUCTOR_CODE], gpu_check.KERNEL_NAMES)
    quantize = mentions["_quantize_activation_mxfp4_kernel"]
    assert len(quantize) == 3  # the definition, the def line, the launch
    assert any(line.startswith("_quantize_activation_mxfp4_kernel_0.run(") for line in quantize)
    assert mentions["_serq_mxfp4_gemm_kernel"] == []


def test_kernel_names_are_the_kernels_entry_points():
    from serq_ao.kernels import triton_gemm, triton_quantize

    modules = (triton_quantize, triton_gemm)
    for module, name in zip(modules, gpu_check.KERNEL_NAMES):
        assert getattr(module, name).fn.__name__ == name


def test_latency_json_lies_beside_out():
    out = Path("/x/results/gpu_check.json")
    assert gpu_check.latency_json(out) == Path("/x/results/linear_latency_cuda.json")
    assert os.path.basename(gpu_check.latency_json(gpu_check.RESULTS / "gpu_check.json")) == "linear_latency_cuda.json"
