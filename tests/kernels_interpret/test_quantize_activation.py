"""The Triton activation quantizer against quantize_mxfp4 of the fp32 pre-op, bit for bit.

Two ways to run it (inputs are made on the CPU either way; references stay on the CPU):

- under the Triton interpreter, on CPU tensors, in its own process (TRITON_INTERPRET must be
  set before triton is imported):
  ``TRITON_INTERPRET=1 python -m pytest -p no:logging tests/kernels_interpret``;
- on a CUDA machine, against the real Triton backend (inputs moved to the GPU):
  ``python -m pytest tests/kernels_interpret``.

Skipped otherwise.
"""

import pytest

from tests.kernels_interpret.device import DEVICE, on_device, skip_unless_runnable

skip_unless_runnable()

import torch  # noqa: E402

from serq_ao.formats.hadamard import block_hadamard  # noqa: E402
from serq_ao.formats.mxfp4 import quantize_mxfp4  # noqa: E402
from serq_ao.kernels.triton_quantize import (  # noqa: E402
    CONFIGS,
    QuantizeConfig,
    launch_quantize_activation,
    quantize_activation_mxfp4,
)

POISON = 0xAB
SMALL_CONFIG = QuantizeConfig(block_m=2, block_k=64, num_warps=1)  # several tiles per row and column


def reference(x, scale_mode, scale_inv=None, perm=None, rotation=0):
    x_hat = x.float()
    if scale_inv is not None:
        x_hat = x_hat * scale_inv
    if perm is not None:
        x_hat = x_hat[..., perm.long()]
    return quantize_mxfp4(block_hadamard(x_hat, rotation), scale_mode)


def random_input(m, k, dtype, seed):
    """Normal data with a per-row magnitude spread and a few outlier channels (x 1e3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g) * 2)
    outlier_channels = torch.randperm(k, generator=g)[: max(1, k // 32)]
    x[:, outlier_channels] *= 1e3
    return x.to(dtype)


def random_pre_op(k, with_scale, perm_dtype, seed):
    g = torch.Generator().manual_seed(seed + 1)
    scale_inv = torch.exp(torch.randn(k, generator=g)) if with_scale else None
    perm = torch.randperm(k, generator=g).to(perm_dtype) if perm_dtype is not None else None
    return scale_inv, perm


def quantize_poisoned(x2d, scale_mode, scale_inv=None, perm=None, config=SMALL_CONFIG, rotation=0):
    """The kernel on DEVICE (the inputs moved there, if not there already), into outputs
    filled with POISON; (codes, scales) back on the CPU."""
    m, k = x2d.shape
    n_blocks = -(-k // 32)
    codes = torch.full((m, n_blocks * 16), POISON, dtype=torch.uint8, device=DEVICE)
    scales = torch.full((m, n_blocks), POISON, dtype=torch.uint8, device=DEVICE)
    launch_quantize_activation(on_device(x2d), on_device(scale_inv), on_device(perm), codes, scales,
                               rceil=scale_mode == "rceil", config=config, rotation=rotation)
    return codes.cpu(), scales.cpu()


def assert_bit_exact(actual, expected):
    codes, scales = actual
    ref_codes, ref_scales = expected
    assert codes.shape == ref_codes.shape and scales.shape == ref_scales.shape
    assert torch.equal(scales, ref_scales), (scales != ref_scales).nonzero()[:8]
    assert torch.equal(codes, ref_codes), (codes != ref_codes).nonzero()[:8]


@pytest.mark.parametrize("scale_mode", ["floor", "rceil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 32), (3, 96), (17, 100), (3, 200)])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("perm_dtype", [None, torch.int16, torch.int32])
def test_random_matches_reference(scale_mode, dtype, m, k, with_scale, perm_dtype):
    seed = hash((m, k, str(dtype))) % 2**31
    x = random_input(m, k, dtype, seed)
    scale_inv, perm = random_pre_op(k, with_scale, perm_dtype, seed)
    assert_bit_exact(quantize_poisoned(x, scale_mode, scale_inv, perm),
                     reference(x, scale_mode, scale_inv, perm))


@pytest.mark.parametrize("rotation", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 576), (3, 100), (17, 200), (2, 7)])
@pytest.mark.parametrize("pre_op", [False, True])
def test_rotated_matches_reference(rotation, dtype, m, k, pre_op):
    """The block Hadamard inside the kernel: full blocks, binary tail blocks (576 = 4 x 128 +
    64; 100 = 3 x 32 + 4; 7 = 4 + 2 + 1), padding columns; tiles of 128 and 64 columns."""
    seed = hash((m, k, rotation, str(dtype))) % 2**31
    x = random_input(m, k, dtype, seed)
    scale_inv, perm = random_pre_op(k, pre_op, torch.int16 if pre_op else None, seed)
    expected = reference(x, "floor", scale_inv, perm, rotation)
    for config in (*CONFIGS, QuantizeConfig(block_m=2, block_k=max(64, rotation), num_warps=1)):
        assert_bit_exact(quantize_poisoned(x, "floor", scale_inv, perm, config=config, rotation=rotation), expected)


def test_rotated_special_values():
    """inf and NaN spread over their whole rotation block (which then reads NaN: scale 0xFF);
    RCEIL and FLOOR alike."""
    x = special_rows()
    for mode in ("floor", "rceil"):
        for rotation in (32, 64):
            assert_bit_exact(quantize_poisoned(x, mode, rotation=rotation, config=CONFIGS[1]),
                             reference(x, mode, rotation=rotation))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("scale_mode", ["floor", "rceil"])
def test_shipped_configs(config, scale_mode):
    x = random_input(17, 200, torch.bfloat16, seed=5)
    scale_inv, perm = random_pre_op(200, True, torch.int16, seed=5)
    assert_bit_exact(quantize_poisoned(x, scale_mode, scale_inv, perm, config=config),
                     reference(x, scale_mode, scale_inv, perm))


def special_rows():
    """(4, 192) fp32: E2M1 ties, all-zero, inf, NaN, -0.0, tiny and huge blocks."""
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = torch.zeros(4, 192)
    for row, power in enumerate((0, -3, 5, -20)):
        scale = 2.0**power
        block = torch.cat([ties, -ties, ties * 1.0000001, -ties * 0.9999999, torch.tensor([6.0, -6.0, 0.5, 4.0])])
        x[row, :32] = block * scale  # max 6 * 2**p: both rules pick scale 2**p, so ties stay ties
    x[:, 40] = 1.5  # block 1 is non-zero but mostly zero; block 2 (64..95) stays all zero
    x[:, 96:128] = torch.linspace(-1, 1, 32)
    x[0, 100], x[1, 101], x[2, 102] = float("inf"), float("-inf"), float("nan")
    x[3, 96:128] = -0.0
    x[:, 128:144] = torch.linspace(-1, 1, 16) * 1e-39  # subnormals: scale clamps to 2**-127
    x[0, 144:160] = 3.0e38  # RCEIL picks 2**126, the largest finite-block scale
    # RCEIL's subnormal corner: descale amax / 6 just above 2**-127 rounds up to 2**-126,
    # exactly 2**-127 or below stays at the floor
    x[1, 144] = 6 * 1.5 * 2.0**-127
    x[2, 144] = 6 * 2.0**-127
    x[3, 144] = 6 * 0.75 * 2.0**-127
    # amax one ulp either side of 6 * 2**p: RCEIL's scale must round up above, not below
    # (an approximate division could land on the power of two)
    six = torch.tensor([6.0, 6.0 * 2.0**-10])
    x[0:2, 160:192] = torch.nextafter(six, torch.tensor(float("inf"))).unsqueeze(-1) * torch.linspace(-1, 1, 32)
    x[2:4, 160:192] = torch.nextafter(six, torch.tensor(0.0)).unsqueeze(-1) * torch.linspace(1, -1, 32)
    return x


@pytest.mark.parametrize("scale_mode", ["floor", "rceil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_special_values(scale_mode, dtype):
    x = special_rows()
    if dtype != torch.float32:  # keep what the dtype represents (inf/NaN/ties survive)
        x[:, 128:160] = x[:, 128:160].clamp(-1e4, 1e4)
    x = x.to(dtype)
    actual = quantize_poisoned(x, scale_mode)
    expected = reference(x, scale_mode)
    assert_bit_exact(actual, expected)
    scales = actual[1]
    assert (scales[:, 2] == 0).all()  # all-zero block
    assert scales[0, 3] == 0xFF and scales[1, 3] == 0xFF and scales[2, 3] == 0xFF  # inf, -inf, NaN
    assert (actual[0][:3, 48:64] == 0).all()  # their codes are zero


def test_ties_through_power_of_two_pre_op():
    """Ties reached through scale_inv (powers of two keep the product exact) and a permutation."""
    x = special_rows()
    scale_inv = 2.0 ** torch.randint(-3, 4, (192,), generator=torch.Generator().manual_seed(3)).float()
    x = x / scale_inv  # exact, so x * scale_inv restores the ties
    perm = torch.arange(192, dtype=torch.int32).flip(0)
    for mode in ("floor", "rceil"):
        assert_bit_exact(quantize_poisoned(x, mode, scale_inv, perm), reference(x, mode, scale_inv, perm))


@pytest.mark.parametrize("scale_mode", ["floor", "rceil"])
def test_3d_input_and_row_stride(scale_mode):
    g = torch.Generator().manual_seed(11)
    x = random_input(10, 100, torch.float16, seed=11).view(2, 5, 100)
    scale_inv = torch.exp(torch.randn(100, generator=g))
    perm = torch.randperm(100, generator=g).to(torch.int16)
    codes, scales = quantize_activation_mxfp4(*map(on_device, (x, scale_mode, scale_inv, perm)))
    codes, scales = codes.cpu(), scales.cpu()
    assert codes.shape == (2, 5, 64) and scales.shape == (2, 5, 4)
    assert_bit_exact((codes, scales), reference(x, scale_mode, scale_inv, perm))
    # a column slice: row stride 150, last dim still contiguous (sliced on DEVICE: moving a
    # slice would copy it into a contiguous tensor)
    wide = random_input(7, 150, torch.float32, seed=12)
    view = on_device(wide)[:, 20:120]
    assert view.stride() == (150, 1)
    assert_bit_exact(quantize_poisoned(view, scale_mode), reference(wide[:, 20:120], scale_mode))


def test_validation():
    x = torch.randn(2, 64).to(DEVICE)
    with pytest.raises(ValueError, match="scale_mode"):
        quantize_activation_mxfp4(x, "ceil")
    with pytest.raises(ValueError, match="x must be"):
        quantize_activation_mxfp4(x.double(), "floor")
    with pytest.raises(ValueError, match="input_scale_inv"):
        quantize_activation_mxfp4(x, "floor", input_scale_inv=torch.ones(63, device=DEVICE))
    with pytest.raises(ValueError, match="input_scale_inv"):
        quantize_activation_mxfp4(x, "floor", input_scale_inv=torch.ones(64, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="input_perm"):
        quantize_activation_mxfp4(x, "floor", input_perm=torch.arange(64, device=DEVICE))  # int64
    with pytest.raises(ValueError, match="block_k"):
        quantize_activation_mxfp4(x, "floor", block_k=48)
    with pytest.raises(ValueError, match="rotation must be one of"):
        quantize_activation_mxfp4(x, "floor", rotation=16)
    with pytest.raises(ValueError, match="block_k must be at least the rotation"):
        quantize_activation_mxfp4(x, "floor", block_k=64, rotation=128)


@pytest.mark.parametrize("perm_dtype", [torch.int16, torch.int32])
def test_out_of_range_order_ids_read_nothing(perm_dtype):
    """Memory safety: an order id outside [0, K) (a damaged checkpoint that bypassed the load
    checks) gathers nothing and counts as 0, never a read past the row."""
    x = random_input(3, 96, torch.float32, seed=21)
    scale_inv, perm = random_pre_op(96, True, perm_dtype, seed=21)
    bad = perm.clone()
    bad[5], bad[40], bad[95] = 30000, -7, 96
    x_hat = (x * scale_inv)[..., perm.long()]
    x_hat[..., [5, 40, 95]] = 0.0
    assert_bit_exact(quantize_poisoned(x, "floor", scale_inv, bad), quantize_mxfp4(x_hat, "floor"))
