"""``linear_int8_weights`` (float activations times an int8 weight with one scale per row) on every
instruction-set path this CPU runs and on the plain-PyTorch reference: within the float32 bound of
:func:`serq_ao.kernels.cpu_native.int8_weights_error_bound` of the float64 result, for every tile
shape and its remainders, dtypes, strides and threads; compiled as eager; bad input refused."""

import pytest
import torch

from serq_ao.kernels import cpu_native, ops
from tests.kernels.native_cases import available_kernels

KERNELS = available_kernels()
PATHS = [*KERNELS, "reference"]
LOW_PRECISION_BITS = {torch.bfloat16: 8, torch.float16: 11}  # significand bits


def run(path: str, x, qdata, scale, bias=None):
    if path == "reference":
        return ops.int8_weights_reference(x, qdata, scale, bias)
    return cpu_native.linear_int8_weights(x, qdata, scale, bias, cpu_native.KERNELS.index(path))


def random_case(m, n, k, dtype=torch.float32, bias=True, seed=0):
    """x with a salient channel, int8 codes in [-127, 127], positive scales, a bias or None."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    x[:, 5 % k] *= 30
    qdata = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.02 + 0.001
    return x.to(dtype), qdata, scale, torch.randn(n, generator=g) if bias else None


def check(got, x, qdata, scale, bias):
    """got against the float64 result of x's values: within the bound in float32; for a
    bfloat16/float16 output, against that result rounded to the dtype, within one of its ulps
    more (the op's final rounding to x's dtype)."""
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], qdata.shape[0])
    xd, qd, sd = x.double(), qdata.double(), scale.double()
    exact = xd @ qd.T * sd
    products = xd.abs() @ qd.abs().T * sd
    if bias is not None:
        exact = exact + bias.double()
        products = products + bias.double().abs()
    bound = cpu_native.int8_weights_error_bound(products, qdata.shape[1], sd)
    if x.dtype in LOW_PRECISION_BITS:
        expected = exact.to(x.dtype).double()
        ulp = torch.maximum(got.double().abs(), expected.abs()) * 2.0 ** (1 - LOW_PRECISION_BITS[x.dtype])
        bound = bound + ulp + torch.finfo(x.dtype).smallest_normal * 2.0 ** (1 - LOW_PRECISION_BITS[x.dtype])
    else:
        expected = exact
    error = (got.double() - expected).abs()
    assert (error <= bound).all(), (error - bound).max()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_tile_and_remainder_within_the_bound(path, dtype):
    # rows: whole tiles of 4 (AVX-512) and 2 (AVX2) and every remainder; columns: tiles of 4 and
    # remainders; K: no whole vector, whole vectors of 8 and 16, and a scalar tail
    seed = 0
    for m in (1, 2, 3, 5, 8, 17):
        for n in (1, 3, 4, 7, 33, 128):
            for k in (1, 15, 16, 17, 64, 576):
                seed += 1
                for bias in (True, False):
                    x, qdata, scale, b = random_case(m, n, k, dtype, bias, seed)
                    check(run(path, x, qdata, scale, b), x, qdata, scale, b)


@pytest.mark.parametrize("path", PATHS)
def test_batch_dims_strides_and_dtypes_of_the_other_arguments(path):
    x, qdata, scale, bias = random_case(6, 37, 100, seed=3)
    x = x.view(2, 3, 100)
    check(run(path, x, qdata, scale, bias), x, qdata, scale, bias)
    # x not contiguous (every other column of a wider tensor), qdata rows with a stride (a column
    # slice of a wider table), scale and bias in other float dtypes
    wide = torch.randn(2, 3, 200)
    strided_x = wide[..., ::2]
    table = torch.randint(-127, 128, (37, 130), dtype=torch.int8)
    strided_q = table[:, 10:110]
    assert not strided_x.is_contiguous() and strided_q.stride() == (130, 1)
    scale16, bias16 = scale.to(torch.bfloat16), bias.to(torch.float16)
    got = run(path, strided_x, strided_q, scale16, bias16)
    check(got, strided_x, strided_q, scale16.float(), bias16.float())
    # float64 x: its float32 values, a float64 output
    x64 = torch.randn(4, 100, dtype=torch.float64)
    got = run(path, x64, qdata, scale, bias)
    assert got.dtype == torch.float64
    check(got.float(), x64.float(), qdata, scale, bias)


@pytest.mark.parametrize("path", PATHS)
def test_no_rows_and_no_columns(path):
    x, qdata, scale, bias = random_case(3, 8, 32)
    assert run(path, x[:0].view(0, 2, 32)[:, :1], qdata, scale, bias).shape == (0, 1, 8)
    assert run(path, x, qdata[:0], scale[:0], bias[:0]).shape == (3, 0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_threads_and_rows_do_not_change_results(kernel):
    x, qdata, scale, bias = random_case(9, 1001, 300, seed=5)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(kernel, x, qdata, scale, bias))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])
    check(results[0], x, qdata, scale, bias)
    # many rows widen the weights to floats once per tile of columns, exactly: the same sums as
    # one row at a time, bit for bit
    one_by_one = torch.cat([run(kernel, x[i : i + 1], qdata, scale, bias) for i in range(x.shape[0])])
    assert torch.equal(results[0], one_by_one)


def test_the_reference_widens_a_slice_of_rows_at_a_time(monkeypatch):
    x, qdata, scale, bias = random_case(5, 70, 48, seed=7)
    monkeypatch.setattr(ops, "INT8_REFERENCE_ROWS", 16)  # 4 slices of 16 rows and one of 6
    widened = []
    float_of = torch.Tensor.float

    def spy(t):
        if t.dtype == torch.int8:
            widened.append(t.shape[0])
        return float_of(t)

    monkeypatch.setattr(torch.Tensor, "float", spy)
    got = ops.int8_weights_reference(x, qdata, scale, bias)
    monkeypatch.undo()
    assert widened == [16, 16, 16, 16, 6]
    check(got, x, qdata, scale, bias)


def test_the_op_runs_native_or_the_reference(monkeypatch):
    monkeypatch.delenv(cpu_native.ENVIRONMENT_VARIABLE, raising=False)
    x, qdata, scale, bias = random_case(3, 40, 96, torch.bfloat16, seed=9)
    native = cpu_native.linear_int8_weights(x, qdata, scale, bias, cpu_native.selected_isa())
    assert torch.equal(ops.serq_linear_int8_weights(x, qdata, scale, bias), native)
    assert torch.equal(ops.linear_int8_weights(x, qdata, scale, bias), native)
    monkeypatch.setenv(cpu_native.ENVIRONMENT_VARIABLE, "reference")
    reference = ops.int8_weights_reference(x, qdata, scale, bias)
    assert torch.equal(ops.serq_linear_int8_weights(x, qdata, scale, bias), reference)
    assert torch.equal(ops.linear_int8_weights(x, qdata, scale, bias), reference)


def test_compiled_equals_eager():
    x, qdata, scale, bias = random_case(6, 50, 80, seed=11)
    x = x.view(2, 3, 80)

    def head(x):
        return ops.linear_int8_weights(x, qdata, scale, bias)

    try:
        compiled = torch.compile(head, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, head(x))


def test_bad_input_is_refused():
    isa = cpu_native.selected_isa()
    x, qdata, scale, bias = random_case(2, 8, 32)
    with pytest.raises(RuntimeError, match="x has 31 columns, qdata 32"):
        cpu_native.linear_int8_weights(x[:, :31], qdata, scale, bias, isa)
    with pytest.raises(RuntimeError, match="qdata must be a 2-D int8"):
        cpu_native.linear_int8_weights(x, qdata.to(torch.uint8), scale, bias, isa)
    with pytest.raises(RuntimeError, match="qdata must be a 2-D int8"):
        cpu_native.linear_int8_weights(x, qdata.view(2, 4, 32), scale, bias, isa)
    with pytest.raises(RuntimeError, match="qdata's rows must be contiguous"):
        cpu_native.linear_int8_weights(x, qdata.T.contiguous().T, scale, bias, isa)
    with pytest.raises(RuntimeError, match=r"scale must be a floating \(8,\) tensor"):
        cpu_native.linear_int8_weights(x, qdata, scale[:7], bias, isa)
    with pytest.raises(RuntimeError, match=r"bias must be a floating \(8,\) tensor"):
        cpu_native.linear_int8_weights(x, qdata, scale, bias[:5], isa)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16, float16 or float64"):
        cpu_native.linear_int8_weights(x.to(torch.int32), qdata, scale, bias, isa)
    with pytest.raises(RuntimeError, match="isa must be 0..3"):
        cpu_native.linear_int8_weights(x, qdata, scale, bias, 7)


@pytest.mark.parametrize("kernel", KERNELS)
def test_float16_outputs_are_the_float32_results_rounded(kernel):
    """The kernel rounds as it stores: bitwise its float32 output for the same values
    .to(float16), over ordinary, subnormal, overflowing and NaN outputs (float16 activations are
    read as float32, so both calls make the same sums)."""
    x, qdata, scale, _ = random_case(5, 37, 100, torch.float32, seed=11)
    x[1] *= 2.0**-20  # float16 subnormal outputs
    scale[0] = 1e3  # column 0 past float16's range
    x[3, 7] = float("nan")
    x = x.to(torch.float16)
    isa = cpu_native.KERNELS.index(kernel)
    got = cpu_native.linear_int8_weights(x, qdata, scale, None, isa)
    expected = cpu_native.linear_int8_weights(x.float(), qdata, scale, None, isa).to(torch.float16)
    nan = expected.isnan()
    assert nan[3].all() and got.isinf().any() and ((got.abs() < 2.0**-14) & (got != 0)).any()
    assert torch.equal(got.isnan(), nan) and torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))
