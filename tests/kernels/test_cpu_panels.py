"""Prepacked weights (cpu_native.prepack_weight, the *_panels ops) on every instruction-set path
this CPU runs that has them: bitwise the many-row kernel's outputs on the codes as stored,
within the derived bound of the reference, and bad input refused."""

import pytest
import torch

from serq_ao.kernels import cpu_native
from tests.kernels.native_cases import (
    GEMM_PANELS,
    available_kernels,
    packed_weight,
    prepacked,
    random_input,
    reference_and_bound,
    run_native,
)

PANEL_KERNELS = [k for k in available_kernels() if cpu_native.panel_columns(cpu_native.KERNELS.index(k)) > 1]


def isa_of(name: str) -> int:
    return cpu_native.KERNELS.index(name)


def test_every_vector_path_has_panels():
    assert PANEL_KERNELS == [k for k in available_kernels() if k != "portable"]
    assert cpu_native.panel_columns(isa_of("portable")) == 1


# (format, d_in, d_out, r, rotation): N not a multiple of a panel, rank 0, several INT groups
CASES = [("mxfp4", 576, 200, 64, 0), ("mxfp4", 100, 33, 32, 32), ("mxfp4", 64, 40, 0, 0),
         ("mxfp4", 1000, 70, 96, 128), ("w4a8", 1000, 70, 128, 0), ("w4a4", 96, 33, 64, 32), ("w4a8", 128, 40, 0, 0)]


@pytest.mark.parametrize("kernel", PANEL_KERNELS)
@pytest.mark.parametrize("fmt, d_in, d_out, rank, rotation", CASES)
def test_prepacked_outputs_are_the_many_row_kernels_bitwise(kernel, fmt, d_in, d_out, rank, rotation):
    packed = packed_weight(fmt, d_in, d_out, rank, rotation=rotation, seed=d_out)
    for rows in (1, 2, 5, 6, 7, 13, 37):  # tiles of every height, and their remainders
        bias = torch.randn(d_out) if rows % 2 else None
        x = random_input((rows,), d_in, seed=rows)
        got = run_native(packed, x, bias, isa_of(kernel), GEMM_PANELS)
        assert torch.equal(got, run_native(packed, x, bias, isa_of(kernel), cpu_native.GEMM_PREFILL)), rows
        reference, bound = reference_and_bound(packed, x, bias)
        assert ((got.double() - reference.double()).abs() <= bound).all(), rows


@pytest.mark.parametrize("kernel", PANEL_KERNELS)
def test_prepacked_scales_every_byte(kernel):
    """Subnormal E8M0 scales and 255 (NaN) read from the panel-ordered scales as from the rows."""
    packed = packed_weight("mxfp4", 520, 45, 64)
    scale = (torch.arange(packed.scale.numel()) * 7 % 200).to(torch.uint8).view(packed.scale.shape)
    scale[:, :3] = torch.tensor([0, 1, 2], dtype=torch.uint8)
    scale[4, 17] = scale[40, 2] = 255
    packed.scale = scale.contiguous()
    x = random_input((9,), 520, seed=5)
    got = run_native(packed, x, None, isa_of(kernel), GEMM_PANELS)
    expected = run_native(packed, x, None, isa_of(kernel), cpu_native.GEMM_PREFILL)
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan()[:, [4, 40]].all()
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("kernel", PANEL_KERNELS)
def test_threads_and_dtypes_do_not_change_prepacked_results(kernel):
    packed = packed_weight("mxfp4", 300, 90, 64)
    x = random_input((12,), 300)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run_native(packed, x, None, isa_of(kernel), GEMM_PANELS))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])
    x16 = x.to(torch.bfloat16)
    got = run_native(packed, x16.view(3, 4, 300), None, isa_of(kernel), GEMM_PANELS)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 4, 90)
    assert torch.equal(got.view(12, 90), run_native(packed, x16, None, isa_of(kernel), cpu_native.GEMM_PREFILL))


def test_prepacked_op_compiles_to_the_same_numbers():
    isa = cpu_native.selected_isa()
    packed = packed_weight("mxfp4", 192, 64, 32)
    panels, scales = prepacked(packed, isa), cpu_native.prepack_e8m0(packed.scale, isa)

    def linear(x):
        return torch.ops.serq_cpu.linear_mxfp4_panels(x, panels, scales, 64, 192, 32, False, packed.input_scale_inv,
                                                      packed.input_perm, None, 0, isa)

    x = random_input((2, 4), 192)
    compiled = torch.compile(linear, fullgraph=True)(x)
    torch._dynamo.reset()
    assert torch.equal(compiled, linear(x))


def test_prepacked_weights_of_another_path_or_shape_are_refused():
    isa = cpu_native.selected_isa()
    packed = packed_weight("mxfp4", 96, 40, 32)
    x = random_input((2,), 96)
    with pytest.raises(RuntimeError, match="path 0 has no prepacked GEMM"):
        prepacked(packed, isa_of("portable"))
    with pytest.raises(ValueError, match="'portable' path has no prepacked GEMM"):
        cpu_native.prepack_e8m0(packed.scale, isa_of("portable"))
    panels, scales = prepacked(packed, isa), cpu_native.prepack_e8m0(packed.scale, isa)
    run = lambda panels, scales, n=40, run_isa=isa: cpu_native.linear_mxfp4_panels(  # noqa: E731
        x, panels, scales, n, 96, 32, "floor", None, None, None, 0, run_isa)
    with pytest.raises(RuntimeError, match="panels must be a contiguous uint8"):
        run(panels[:, :-1], scales)
    with pytest.raises(RuntimeError, match="must be a contiguous uint8"):
        run(panels, scales, n=80)  # more rows than the panels and their scales hold
    with pytest.raises(RuntimeError, match="scales of a prepacked MXFP4 weight must be"):
        run(panels, packed.scale)  # the scales as stored
    if "avx2" in PANEL_KERNELS and isa != isa_of("avx2"):  # panels of 32 columns on a path of 16
        with pytest.raises(RuntimeError, match="must be a contiguous uint8"):
            run(panels, scales, run_isa=isa_of("avx2"))
    integer = packed_weight("w4a8", 96, 16, 32)
    int_panels = prepacked(integer, isa)
    with pytest.raises(RuntimeError, match="correction_scale is given exactly when rank > 0"):
        cpu_native.linear_int_panels(x, int_panels, integer.scale, 96, 128, 32, 8, None, None, None, None, 0, isa)
    with pytest.raises(RuntimeError, match="group_size must be a multiple of 32"):
        cpu_native.prepack_weight(integer.qdata, None, 48, isa)


@pytest.mark.parametrize("kernel", PANEL_KERNELS)
def test_int_groups_wider_than_the_exact_int32_span(kernel):
    """Groups over 4096 columns are summed 32 columns at a time (an int32 sum of a whole group
    could pass 2^24, where float32 stops being exact); each 32 keeps its group's scale."""
    packed = packed_weight("w4a8", 8300, 20, 64, group_size=8192, seed=3)
    x = random_input((7,), 8300, seed=4)
    bias = torch.randn(20)
    got = run_native(packed, x, bias, isa_of(kernel), GEMM_PANELS)
    assert torch.equal(got, run_native(packed, x, bias, isa_of(kernel), cpu_native.GEMM_PREFILL))
    reference, bound = reference_and_bound(packed, x, bias)
    assert ((got.double() - reference.double()).abs() <= bound).all()
    decode = run_native(packed, x[:2], bias, isa_of(kernel), cpu_native.GEMM_DECODE)
    assert ((decode.double() - reference[:2].double()).abs() <= bound[:2]).all()
