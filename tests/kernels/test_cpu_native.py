"""The native CPU kernels against the plain-PyTorch reference, on every instruction-set path
this CPU runs (each forced by the ops' ``isa`` argument): activation codes bitwise, outputs
within the bound derived in :mod:`serq_ao.kernels.cpu_native`."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from serq_ao.formats.integer import quantize_int
from serq_ao.formats.mxfp4 import quantize_mxfp4
from serq_ao.kernels import cpu_native
from serq_ao.kernels.reference import apply_pre_op
from serq_ao.options import ROTATION_SIZES
from serq_ao.quant.packing import packed_linear
from tests.kernels.native_cases import GEMM_PANELS, available_kernels, packed_weight, random_input, reference_and_bound, run_native

KERNELS = available_kernels()
GEMMS = {"decode": cpu_native.GEMM_DECODE, "prefill": cpu_native.GEMM_PREFILL}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def isa_of(name: str) -> int:
    return cpu_native.KERNELS.index(name)


def test_this_machine_runs_a_vector_path():
    # an x86-64 machine without AVX2 would be news: every CPU this project has seen has AVX-512
    assert cpu_native.cpu_best() in ("avx2", "avx512", "avx512_vnni"), cpu_native.cpu_best()
    assert cpu_native.kernel_info()["native"]


# ---- activation codes: bitwise serq_ao.formats ----------------------------------------------

def outlier_rows(m: int, k: int, dtype, seed: int) -> torch.Tensor:
    x = random_input((m,), k, torch.float32, seed)
    x[0, : min(k, 40)] = 0.0  # an all-zero block
    if m > 2:
        x[1] *= 1e-38  # subnormal block maxima
        x[2] *= 1e30
    return x.to(dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", [64, 100, 576])
@pytest.mark.parametrize("rotation", ROTATION_SIZES)
@pytest.mark.parametrize("scale_mode", ["floor", "rceil"])
def test_mxfp4_activation_codes_are_the_formats_bitwise(kernel, k, rotation, scale_mode):
    g = torch.Generator().manual_seed(k + rotation)
    for dtype in DTYPES:
        x = outlier_rows(5, k, dtype, seed=k)
        scale_inv, perm = torch.rand(k, generator=g) + 0.5, torch.randperm(k, generator=g)
        for scale_inv, perm in ((None, None), (scale_inv, perm), (scale_inv, None), (None, perm)):
            expected = quantize_mxfp4(apply_pre_op(x, scale_inv, perm, rotation), scale_mode)
            got = cpu_native.quantize_activation_mxfp4(x, scale_mode, scale_inv, perm, rotation, isa_of(kernel))
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), (dtype, perm is None)


@pytest.mark.parametrize("kernel", KERNELS)
def test_mxfp4_codes_on_the_rounding_boundaries(kernel):
    """E2M1's thresholds (ties to even), one float either side of each, and signed zeros: the
    vector variants compare lane by lane as the scalar code does."""
    thresholds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    values = torch.cat([thresholds, thresholds.nextafter(torch.tensor(0.0)), thresholds.nextafter(torch.tensor(9.0)),
                        torch.tensor([6.0, 0.0, -0.0])])  # 24 values; 6 makes the block's scale 1
    block = torch.cat([values, -values[:8]])  # 32: a block
    x = torch.stack([block, block.flip(0), block * 2.0**-130, block * 2.0**100])  # also subnormal, large
    for mode in ("floor", "rceil"):
        expected = quantize_mxfp4(x, mode)
        got = cpu_native.quantize_activation_mxfp4(x, mode, None, None, 0, isa_of(kernel))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), mode


@pytest.mark.parametrize("kernel", KERNELS)
def test_mxfp4_codes_of_non_finite_blocks(kernel):
    x = random_input((3,), 96)
    x[0, 5], x[1, 40], x[2, 70] = float("nan"), float("inf"), -float("inf")
    for mode in ("floor", "rceil"):
        expected = quantize_mxfp4(x, mode)
        got = cpu_native.quantize_activation_mxfp4(x, mode, None, None, 0, isa_of(kernel))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert (got[1] == 255).sum() == 3


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size, k", [(128, 200), (32, 96), (64, 64), (128, 1000)])
@pytest.mark.parametrize("rotation", [0, 64])
def test_int_activation_codes_are_the_formats_bitwise(kernel, bits, group_size, k, rotation):
    g = torch.Generator().manual_seed(k)
    for dtype in DTYPES:
        x = outlier_rows(4, k, dtype, seed=k + bits)
        scale_inv, perm = torch.rand(k, generator=g) + 0.5, torch.randperm(k, generator=g)
        expected = quantize_int(apply_pre_op(x, scale_inv, perm, rotation), bits, symmetric=False,
                                granularity=group_size)
        q, scale, zero = cpu_native.quantize_activation_int(x, bits, group_size, scale_inv, perm, rotation,
                                                            isa_of(kernel))
        finite = expected.scale.isfinite()  # a group with inf (fp16 overflow) has a NaN scale, its codes unused
        rows = finite.all(dim=1)
        assert torch.equal(q[rows, :k], expected.q[rows]), dtype
        # the padding of the last group is zeros, whose code is the zero point
        assert torch.equal(q[rows, k:], zero[rows].repeat_interleave(group_size, dim=1)[:, k:].to(torch.uint8))
        torch.testing.assert_close(scale, expected.scale, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(zero[finite], expected.zero_point[finite]), dtype


# ---- outputs: the reference up to float32 summation order -------------------------------------

def assert_within_bound(got: torch.Tensor, packed, x: torch.Tensor, bias):
    reference, bound = reference_and_bound(packed, x, bias)
    error = (got.double() - reference.double()).abs()
    worst = (error - bound).max().item()
    assert worst <= 0, f"exceeds the derived bound by {worst:.3g} (largest error {error.max().item():.3g})"
    return reference


MXFP4_SHAPES = [(64, 40, 0), (100, 33, 32), (576, 200, 64), (1000, 70, 96)]  # (d_in, d_out, r)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("d_in, d_out, rank", MXFP4_SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 8, 37])
def test_mxfp4_linear_within_the_bound(kernel, gemm, d_in, d_out, rank, rows):
    for rotation, scale_mode in zip(ROTATION_SIZES, ("floor", "rceil") * len(ROTATION_SIZES)):  # every rotation
        packed = packed_weight("mxfp4", d_in, d_out, rank, rotation=rotation, scale_mode=scale_mode, seed=rows)
        bias = torch.randn(d_out) if rows % 2 else None
        x = random_input((rows,), d_in, seed=d_in + rows)
        got = run_native(packed, x, bias, isa_of(kernel), GEMMS[gemm])
        assert got.dtype == torch.float32 and got.shape == (rows, d_out)
        assert_within_bound(got, packed, x, bias)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("gemm", GEMMS)
def test_every_weight_scale_byte(kernel, gemm):
    """E8M0 weight scales 2^-127 (subnormal as floats) to 2^72, and 255 (NaN), as the reference
    reads them: the kernels convert them a vector at a time, with a scalar tail."""
    packed = packed_weight("mxfp4", 520, 23, 64)  # 19 blocks a row: a vector's worth and a tail
    scale = (torch.arange(packed.scale.numel()) * 7 % 200).to(torch.uint8).view(packed.scale.shape)
    scale[:, :3] = torch.tensor([0, 1, 2], dtype=torch.uint8)  # every subnormal exponent, in each row
    packed.scale = scale.contiguous()
    x = random_input((3,), 520, seed=5)
    assert_within_bound(run_native(packed, x, None, isa_of(kernel), GEMMS[gemm]), packed, x, None)
    packed.scale[4, 17] = packed.scale[9, 2] = 255
    got = run_native(packed, x, None, isa_of(kernel), GEMMS[gemm])
    reference, _ = reference_and_bound(packed, x, None)
    assert torch.equal(got.isnan(), reference.isnan()) and got.isnan()[:, [4, 9]].all()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("fmt", ["w4a8", "w4a4"])
@pytest.mark.parametrize("d_in, d_out, rank", [(200, 48, 32), (128, 40, 0), (96, 33, 64), (1000, 70, 128)])
def test_int_linear_within_the_bound(kernel, gemm, fmt, d_in, d_out, rank):
    for rows in (1, 6, 19):
        packed = packed_weight(fmt, d_in, d_out, rank, seed=rows, rotation=32 if rows == 6 else 0)
        bias = torch.randn(d_out)
        x = random_input((rows,), d_in, seed=rows)
        assert_within_bound(run_native(packed, x, bias, isa_of(kernel), GEMMS[gemm]), packed, x, bias)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8"])
def test_dtypes_batch_dimensions_and_strided_inputs(kernel, fmt):
    packed = packed_weight(fmt, 160, 24, 32)
    bias = torch.randn(24)
    for dtype in DTYPES:
        base = random_input((2, 3), 320, dtype)
        x = base[..., ::2]  # (2, 3, 160), every other column: not contiguous
        assert not x.is_contiguous()
        got = run_native(packed, x, bias, isa_of(kernel), cpu_native.GEMM_BY_ROWS)
        assert got.dtype == dtype and got.shape == (2, 3, 24)
        reference, bound = reference_and_bound(packed, x, bias)
        # the op rounds its float32 result to x's dtype, as the reference does: one more half ulp
        half_ulp = reference.abs() * (2.0**-8 if dtype == torch.bfloat16 else 2.0**-11 if dtype == torch.float16 else 0)
        assert ((got.double() - reference.to(dtype).double()).abs() <= bound + 2 * half_ulp.double()).all()


def same_bits_or_both_nan(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bitwise equal where not NaN (torch itself encodes a NaN differently by code path)."""
    nan = expected.isnan()
    return torch.equal(got.isnan(), nan) and torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def magnitudes_rows(k: int, dtype) -> torch.Tensor:
    """Rows whose outputs are ordinary, tiny (float16 subnormals), large, NaN."""
    x = random_input((6,), k, torch.float32, seed=k)
    x[1] *= 2.0**-16
    x[2] *= 2.0**-24
    x[3] *= 2.0**6
    x[4, 9] = float("nan")
    return x.to(dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("gemm", [*GEMMS, "panels"])
@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_outputs_are_the_float32_results_rounded(kernel, gemm, fmt, dtype):
    """The kernels round their float32 sums to x's dtype as they store them: bitwise the
    float32 output of the same values .to(dtype), over ordinary, subnormal, overflowing (a
    bias past float16's range) and NaN outputs."""
    if gemm == "panels" and cpu_native.panel_columns(isa_of(kernel)) == 1:
        pytest.skip("this path has no prepacked GEMM")
    packed = packed_weight(fmt, 160, 40, 32)
    bias = torch.zeros(40)  # leaves the tiny rows tiny
    bias[5], bias[6] = 7.0e4, -3.0
    x = magnitudes_rows(160, dtype)
    how = GEMM_PANELS if gemm == "panels" else GEMMS[gemm]
    got = run_native(packed, x, bias, isa_of(kernel), how)
    expected = run_native(packed, x.float(), bias, isa_of(kernel), how).to(dtype)
    assert got.dtype == dtype and same_bits_or_both_nan(got, expected)
    assert got.isinf().any() == (dtype == torch.float16) and got.isnan()[4].all()
    if dtype == torch.float16:
        assert ((got.abs() < 2.0**-14) & (got != 0)).any()  # subnormals were written


@pytest.mark.parametrize("kernel", KERNELS)
def test_decode_and_prefill_kernels_agree_closely_and_threads_do_not_change_results(kernel):
    packed = packed_weight("mxfp4", 300, 90, 64)
    x = random_input((12,), 300)
    results = {}
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results[threads] = {g: run_native(packed, x, None, isa_of(kernel), v) for g, v in GEMMS.items()}
        finally:
            torch.set_num_threads(previous)
    for gemm in GEMMS:  # each output is summed by one thread, in one order, however rows are split
        assert torch.equal(results[1][gemm], results[2][gemm])
    assert_within_bound(results[1]["decode"], packed, x, None)
    assert_within_bound(results[1]["prefill"], packed, x, None)


def test_every_path_gives_the_same_codes_and_close_outputs():
    packed = packed_weight("w4a8", 256, 64, 32)
    x = random_input((3,), 256)
    outputs = [run_native(packed, x, None, isa_of(k), cpu_native.GEMM_BY_ROWS) for k in KERNELS]
    reference, bound = reference_and_bound(packed, x, None)
    for out in outputs:
        assert ((out.double() - reference.double()).abs() <= bound).all()


# ---- the ops and modules run the native kernels -------------------------------------------

@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8", "w4a4"])
def test_packed_linear_runs_native_and_compiles_to_the_same_numbers(fmt, monkeypatch):
    monkeypatch.delenv(cpu_native.ENVIRONMENT_VARIABLE, raising=False)
    weight = packed_weight(fmt, 192, 64, 32)
    bias = torch.randn(64)
    module = packed_linear(weight, nn.Parameter(bias, requires_grad=False))
    x = random_input((2, 4), 192)
    with torch.no_grad():
        eager = module(x)
        compiled = torch.compile(module, fullgraph=True)(x)
        torch._dynamo.reset()
    assert torch.equal(eager, compiled)
    assert torch.equal(eager, run_native(weight, x, bias, cpu_native.selected_isa(), cpu_native.GEMM_BY_ROWS))
    monkeypatch.setenv(cpu_native.ENVIRONMENT_VARIABLE, "reference")
    with torch.no_grad():
        reference = module(x)
    expected, bound = reference_and_bound(weight, x, bias)
    assert torch.equal(reference, expected)  # the reference path is the reference, bit for bit
    assert ((eager.double() - reference.double()).abs() <= bound).all()


def test_export_keeps_one_op_node():
    module = packed_linear(packed_weight("mxfp4", 128, 32, 32), None)
    program = torch.export.export(module, (random_input((3,), 128),))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert "serq.linear_mxfp4.default" in targets and not any("serq_cpu" in t for t in targets), targets


def test_an_ahead_of_time_compiled_program_runs_in_a_fresh_process(tmp_path):
    # AOTInductor lowers the serq op to the serq_cpu ops, which a fresh process must find
    module = packed_linear(packed_weight("mxfp4", 128, 32, 32), None)
    x = random_input((3,), 128)
    program = torch.export.export(module, (x,))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "linear.pt2"))
    with torch.no_grad():
        torch.save((x, module(x)), tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        import serq_ao  # noqa: F401
        x, expected = torch.load({str(tmp_path / "io.pt")!r})
        got = torch._inductor.aoti_load_package({package!r})(x)
        assert torch.equal(got, expected), (got - expected).abs().max()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ---- bad input is an error, never a read outside the tensors ------------------------------

def test_forged_order_and_short_tensors_are_errors():
    weight = packed_weight("mxfp4", 96, 16, 32)
    x = random_input((2,), 96)
    isa = cpu_native.selected_isa()
    forged = weight.input_perm.clone().to(torch.int32)
    forged[5] = 96
    with pytest.raises(RuntimeError, match="perm\\[5\\] = 96 is not a column"):
        cpu_native.linear_mxfp4(x, weight.qdata, weight.scale, 96, 32, "floor", weight.input_scale_inv, forged, None,
                                0, isa)
    forged[5] = -1
    with pytest.raises(RuntimeError, match="is not a column"):
        cpu_native.quantize_activation_mxfp4(x, "floor", None, forged, 0, isa)
    with pytest.raises(RuntimeError, match="qdata must be a uint8"):
        cpu_native.linear_mxfp4(x, weight.qdata[:, :-1], weight.scale, 96, 32, "floor", None, None, None, 0, isa)
    with pytest.raises(RuntimeError, match="scale must be a uint8"):
        cpu_native.linear_mxfp4(x, weight.qdata, weight.scale[:-1], 96, 32, "floor", None, None, None, 0, isa)
    with pytest.raises(RuntimeError, match="columns, the weight"):
        cpu_native.linear_mxfp4(x[:, :64], weight.qdata, weight.scale, 96, 32, "floor", None, None, None, 0, isa)
    integer = packed_weight("w4a8", 96, 16, 32)
    with pytest.raises(RuntimeError, match="correction_qdata must be"):
        cpu_native.linear_int(x, integer.qdata, integer.scale, 96, 128, 8, integer.correction_qdata[:3],
                              integer.correction_scale, None, None, None, 0, isa)


def test_the_environment_variable_is_checked(monkeypatch):
    monkeypatch.setenv(cpu_native.ENVIRONMENT_VARIABLE, "avx1024")
    with pytest.raises(ValueError, match="SERQ_CPU_KERNEL must be one of .*'avx512_vnni'.*got 'avx1024'"):
        cpu_native.selected_isa()
    for kernel in KERNELS:
        monkeypatch.setenv(cpu_native.ENVIRONMENT_VARIABLE, kernel)
        assert cpu_native.selected_isa() == isa_of(kernel)
    monkeypatch.setenv(cpu_native.ENVIRONMENT_VARIABLE, "reference")
    assert cpu_native.selected_isa() is None and cpu_native.kernel_info()["path"] == "reference"


@pytest.mark.skipif(cpu_native.cpu_best() == "avx512_vnni", reason="this CPU has every path")
def test_a_path_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setenv(cpu_native.ENVIRONMENT_VARIABLE, "avx512_vnni")
    with pytest.raises(ValueError, match="this CPU supports at most"):
        cpu_native.selected_isa()


def test_int_group_sizes_the_kernels_lack_run_the_reference_with_one_warning():
    weight = packed_weight("w4a8", 96, 16, 32, group_size=48)
    assert weight.group_size == 48
    cpu_native._warn_int_group.cache_clear()
    module = packed_linear(weight, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            module(random_input((2,), 96))
            module(random_input((2,), 96))
    messages = [str(w.message) for w in caught if "group_size 48" in str(w.message)]
    assert len(messages) == 1, messages


def test_without_a_compiler_the_reference_runs_with_one_warning(tmp_path):
    script = textwrap.dedent("""
        import warnings, torch
        warnings.simplefilter("always")
        from tests.kernels.native_cases import packed_weight, random_input, reference_and_bound
        from serq_ao.quant.packing import packed_linear
        weight = packed_weight("mxfp4", 96, 16, 32)
        module = packed_linear(weight, None)
        x = random_input((2,), 96)
        with warnings.catch_warnings(record=True) as caught:
            with torch.no_grad():
                got = module(x); module(x)
        native = [str(w.message) for w in caught if "native CPU kernels unavailable" in str(w.message)]
        assert len(native) == 1, native
        assert "no C++ compiler ('/nonexistent/c++'" in native[0], native[0]
        assert torch.equal(got, reference_and_bound(weight, x, None)[0])
        print("ok")
    """)
    env = {**os.environ, "CXX": "/nonexistent/c++", "SERQ_KERNEL_CACHE": str(tmp_path)}
    env.pop(cpu_native.ENVIRONMENT_VARIABLE, None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_one_waited_for(tmp_path, caplog):
    """torch's builder waits without end for a lock it did not take: a build killed outright would
    hang every later process (it did: a fresh process waited on such a lock past 25 s)."""
    import threading
    import time

    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - cpu_native.STALE_BUILD_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING", logger=cpu_native.__name__):
        cpu_native.wait_for_build_lock(tmp_path)
    assert not lock.exists() and "did not finish" in caplog.text

    lock.touch()  # a live build: its process removes the lock when done
    threading.Timer(0.5, lock.unlink).start()
    start = time.monotonic()
    cpu_native.wait_for_build_lock(tmp_path, poll=0.05)
    assert 0.4 < time.monotonic() - start < 10 and "waiting for another process" in caplog.text
