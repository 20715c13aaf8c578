"""MXFP4 (OCP Microscaling Formats v1.0): E2M1 elements with one E8M0 scale per 32.

Layout, along the last dimension of a tensor of any leading shape:

- ``codes``: uint8, two E2M1 codes per byte, element ``2i`` in the low nibble and ``2i + 1``
  in the high nibble (torchao's ``pack_uint4`` order). Each code is ``sign << 3 | magnitude``
  with magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} for codes 0..7.
- ``scales``: uint8 holding the E8M0 biased exponent (value ``2 ** (byte - 127)``), one per
  block of 32; ``0xFF`` is E8M0's NaN. Stored as uint8, not ``torch.float8_e8m0fnu``,
  because Inductor on CPU cannot handle that dtype.

A last dimension K that is not a multiple of 32 is padded with zeros to the next multiple;
``dequantize_mxfp4(..., k=K)`` drops the padding again.

Scale rules (``scale_mode``):

- ``"floor"``: ``e = floor(log2(amax)) - 2``, the OCP spec's rule and the SERQ reference code's.
  Elements of magnitude above ``6 * 2**e`` saturate to 6.
- ``"rceil"``: ``e = ceil(log2(amax / 6))`` (``amax / 6`` rounded to fp32 first), torchao's
  and cuBLAS's rule, which never clips. We compute the ceiling exactly from the fp32 bits,
  as the hardware instruction ``cvt.rp.satfinite.ue8m0x2.f32`` does; torchao's CPU fallback
  uses ``ceil(log2(.))`` in floating point, which can differ when ``amax / 6`` lies within a
  few ulps above a power of two.

Both are clamped to E8M0's range, ``-127 <= e <= 127``.

For weights, which are quantized once, offline, :func:`quantize_mxfp4_by_error` chooses each
block's exponent by its reconstruction error instead: FLOOR's ``e`` or ``e + 1``, whichever
gives the smaller sum of squared errors over the block (a tie keeps FLOOR's). The first may
clip the block's largest elements to 6, the second never clips but rounds on a grid twice
as coarse; RCEIL's choice is always one of the two, so the searched block error is at most
that of FLOOR and of RCEIL. The result is ordinary OCP MXFP4 (one E8M0 byte per block), so
packing and kernels do not change.

Special values, defined here because the spec leaves them to the implementation:

- an all-zero block gets scale byte 0 (``2**-127``) and all-zero codes (exact zeros back);
- a block that contains NaN or +-inf gets the NaN scale ``0xFF`` and zero codes, and
  dequantizes to NaN: E2M1 has no encoding for either, and silently saturating an infinity to
  ``6 * 2**e`` would hide the problem;
- negative zero and negatives that round to zero keep their sign bit (code 8), like torchao.

Where torchao differs (documented, not copied): for blocks whose scale clamps to ``2**-127``
(``amax < 2**-124``) torchao divides by ``2**-126`` (FLOOR) or by 1 (RCEIL) instead of the
stored scale, so its codes no longer match its scale there. We always quantize with the
scale we store.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch import Tensor

# defined where the command line reads them without importing torch
from serq_ao.options import MXFP4_BLOCK_SIZE as BLOCK_SIZE, SCALE_MODES  # noqa: F401

E8M0_BIAS = 127
E8M0_NAN = 255
# Largest E2M1 magnitude is 6 = 1.5 * 2**2, hence the "- 2" of the FLOOR rule.
E2M1_MAX = 6.0
E2M1_EMAX = 2
# Magnitude of each 3-bit code; the sign is bit 3.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Rounding thresholds between neighbouring magnitudes. Round-half-to-even means a value
# exactly on a threshold goes to the neighbour with an even code (mantissa bit 0), so the
# thresholds whose upper neighbour is even are inclusive (>=), the others exclusive (>).
_THRESHOLDS_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)  # upper neighbour odd: a tie stays below
_THRESHOLDS_TIE_UP = (0.75, 1.75, 3.5)  # upper neighbour even: a tie goes up

_FP32_BITS_OF_2_POW_MINUS_127 = 0x00400000  # the subnormal 2**-127
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_scale_mode(scale_mode: str) -> None:
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")


def _blocks(x: Tensor) -> Tensor:
    """(..., K) float -> (..., n_blocks, 32) float32, zero-padded at the end of K."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be a float16, bfloat16, float32 or float64 tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    x = x.float()
    pad = (-x.shape[-1]) % BLOCK_SIZE
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.unflatten(-1, (-1, BLOCK_SIZE))


def _fp32_exponent(x: Tensor) -> Tensor:
    """Unbiased exponent field of a non-negative fp32 tensor (subnormals and 0 give -127)."""
    return ((x.view(torch.int32) >> 23) & 0xFF) - E8M0_BIAS


def _shared_exponent(amax: Tensor, scale_mode: str) -> Tensor:
    """Block max (fp32, finite, >= 0) -> unbiased scale exponent, int32, in [-127, 127]."""
    if scale_mode == "floor":
        # floor(log2(amax)) is the exponent field for normal numbers; subnormals and 0 read
        # as -127 and clamp to -127 below, which is where they belong anyway.
        exponent = _fp32_exponent(amax) - E2M1_EMAX
    else:
        descale = amax / E2M1_MAX
        # ceil(log2(d)) = exponent(d) + 1 unless d is an exact power of two. A subnormal d
        # reads exponent -127 and would round up to -126, which is right for
        # 2**-127 < d < 2**-126 only; d <= 2**-127 must stay at -127 (the clamp floor).
        bits = descale.view(torch.int32)
        round_up = ((bits & 0x7FFFFF) != 0) & (bits > _FP32_BITS_OF_2_POW_MINUS_127)
        exponent = _fp32_exponent(descale) + round_up.to(torch.int32)
    return exponent.clamp(-E8M0_BIAS, E8M0_BIAS)


_CONSTANTS: dict[tuple, Tensor] = {}


def _tracing() -> bool:
    """Under dynamo, or any dispatch mode (fake tensors, make_fx): constants must be made
    afresh there, and what is made there must not be kept."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def cached_constant(name: str, values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, cached outside of tracing (building one per call costs more
    than using it on a decode-sized input)."""
    key = (name, dtype, torch.device(device))
    if not _tracing() and key in _CONSTANTS:
        return _CONSTANTS[key]
    tensor = values() if callable(values) else torch.tensor(values, dtype=dtype, device=device)
    if not _tracing() and type(tensor) is torch.Tensor:
        _CONSTANTS[key] = tensor
    return tensor


# Below this many elements one bucketize per threshold set beats seven comparisons (fewer
# kernel launches); above it the vectorized comparisons win by ~5x.
_BUCKETIZE_MAX_NUMEL = 8192


def _e2m1_magnitude_code(v: Tensor) -> Tensor:
    """|v| (fp32) -> nearest E2M1 magnitude code 0..7, ties to even, saturating at 6.

    The code is the number of midpoints below v, counting a tie as below where the upper
    neighbour is even (``v >= t``) and as above where it is odd (``v > t``)."""
    if v.numel() <= _BUCKETIZE_MAX_NUMEL:
        tie_down = cached_constant("tie_down", _THRESHOLDS_TIE_DOWN, v.dtype, v.device)
        tie_up = cached_constant("tie_up", _THRESHOLDS_TIE_UP, v.dtype, v.device)
        # bucketize counts boundaries < v (right=False) or <= v (right=True)
        code = torch.bucketize(v, tie_down, right=False) + torch.bucketize(v, tie_up, right=True)
        return code.to(torch.uint8)
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for threshold in _THRESHOLDS_TIE_DOWN:
        code += (v > threshold).to(torch.uint8)
    for threshold in _THRESHOLDS_TIE_UP:
        code += (v >= threshold).to(torch.uint8)
    return code


def pack_uint4(codes: Tensor) -> Tensor:
    """(..., 2n) uint8 nibbles -> (..., n) uint8, element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_uint4(packed: Tensor) -> Tensor:
    """(..., n) uint8 -> (..., 2n) uint8 nibbles; inverse of :func:`pack_uint4`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def quantize_mxfp4(x: Tensor, scale_mode: str = "floor") -> tuple[Tensor, Tensor]:
    """Quantize ``x`` (..., K) to MXFP4 along the last dimension.

    Returns ``(codes, scales)``: codes (..., ceil(K/32) * 16) uint8, two E2M1 per byte;
    scales (..., ceil(K/32)) uint8 E8M0. fp16/bf16/fp64 inputs are converted to fp32 first
    (exact for fp16 and bf16).
    """
    _check_scale_mode(scale_mode)
    blocks = _blocks(x)  # (..., B, 32)
    magnitude = blocks.abs()
    amax = magnitude.amax(dim=-1, keepdim=True)  # (..., B, 1), NaN if the block has a NaN
    finite = torch.isfinite(amax)
    amax = torch.where(finite, amax, torch.zeros_like(amax))

    exponent = _shared_exponent(amax, scale_mode)  # (..., B, 1) int32
    # 2**-e built from its bits (biased exponent 127 - e): a finite block has e <= 126, so
    # the reciprocal is a normal fp32 number and multiplying by it is exact.
    reciprocal = ((E8M0_BIAS - exponent) << 23).view(torch.float32)
    code = _e2m1_magnitude_code(magnitude * reciprocal)
    sign = (blocks.view(torch.int32) < 0).to(torch.uint8) << 3
    code = torch.where(finite, code | sign, torch.zeros_like(code))

    scales = torch.where(finite, exponent + E8M0_BIAS, E8M0_NAN).to(torch.uint8)
    codes = pack_uint4(code.flatten(-2))
    return codes, scales.squeeze(-1)


def quantize_mxfp4_by_error(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`quantize_mxfp4` with each block's exponent chosen among FLOOR's ``e`` and
    ``e + 1`` by the block's sum of squared errors (ties: ``e``); see the module doc. Same
    layout, same special values (zero and non-finite blocks as with FLOOR)."""
    if x.dim() < 2 or x.numel() == 0:
        return _by_error_rows(x)  # nothing to split (and _blocks' errors for what it refuses)
    rows = x.reshape(-1, x.shape[-1])
    # a few rows at a time: the float64 and int64 temporaries of a large weight stay small
    step = max(1, _SEARCH_CHUNK_ELEMENTS // max(rows.shape[1], 1))
    parts = [_by_error_rows(rows[start:start + step]) for start in range(0, rows.shape[0], step)]
    codes, scales = torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
    return codes.reshape(*x.shape[:-1], codes.shape[-1]), scales.reshape(*x.shape[:-1], scales.shape[-1])


_SEARCH_CHUNK_ELEMENTS = 1 << 22


def _by_error_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`quantize_mxfp4_by_error` in one piece, x (..., K)."""
    blocks = _blocks(x)  # (..., B, 32)
    magnitude = blocks.abs()
    amax = magnitude.amax(dim=-1, keepdim=True)
    finite = torch.isfinite(amax)
    magnitude = torch.where(finite, magnitude, torch.zeros_like(magnitude))
    floor = _shared_exponent(torch.where(finite, amax, torch.zeros_like(amax)), "floor")  # (..., B, 1)
    values = cached_constant("e2m1_values", E2M1_VALUES, torch.float32, x.device)
    candidates = []
    for exponent in (floor, (floor + 1).clamp(max=E8M0_BIAS - 1)):  # FLOOR's e <= 125: e + 1 stays finite
        reciprocal = ((E8M0_BIAS - exponent) << 23).view(torch.float32)  # exact 2**-e
        code = _e2m1_magnitude_code(magnitude * reciprocal)
        scale = e8m0_to_float32((exponent + E8M0_BIAS).to(torch.uint8))  # 2**e
        error = (values[code.long()] * scale - magnitude).double().square().sum(dim=-1, keepdim=True)
        candidates.append((exponent, code, error))
    (low, low_code, low_error), (high, high_code, high_error) = candidates
    take_high = high_error < low_error  # (..., B, 1)
    exponent = torch.where(take_high, high, low)
    code = torch.where(take_high, high_code, low_code)
    sign = (blocks.view(torch.int32) < 0).to(torch.uint8) << 3
    code = torch.where(finite, code | sign, torch.zeros_like(code))
    scales = torch.where(finite, exponent + E8M0_BIAS, E8M0_NAN).to(torch.uint8)
    return pack_uint4(code.flatten(-2)), scales.squeeze(-1)


def e8m0_to_float32(scales: Tensor) -> Tensor:
    """uint8 E8M0 bytes -> fp32 powers of two (byte 0 -> 2**-127, 0xFF -> NaN)."""
    as_int = scales.to(torch.int32)
    value = (as_int << 23).view(torch.float32)
    value = torch.where(as_int == 0, torch.full_like(value, 2.0**-127), value)
    return torch.where(as_int == E8M0_NAN, torch.full_like(value, float("nan")), value)


def _byte_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """(256, 2): the two E2M1 values (low nibble first) that each byte of packed codes holds."""

    def build():
        values = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=dtype, device=device)
        byte = torch.arange(256, device=device)
        return torch.stack((values[byte & 0xF], values[byte >> 4]), dim=-1)

    return cached_constant("byte_table", build, dtype, device)


def dequantize_mxfp4(
    codes: Tensor, scales: Tensor, k: int | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of :func:`quantize_mxfp4`: (..., K) in ``dtype`` (K = ``k``, else padded K)."""
    if codes.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"codes and scales must be uint8, got {codes.dtype} and {scales.dtype}")
    if codes.shape[-1] != scales.shape[-1] * BLOCK_SIZE // 2:
        raise ValueError(
            f"codes last dim ({codes.shape[-1]}) must be 16 x scales last dim ({scales.shape[-1]})"
        )
    # fp32 is exact for every MXFP4 value except those rounded past fp32's max (e.g. RCEIL of
    # a block at fp32 max gives 4 * 2**126 = 2**128), which become inf unless dtype is fp64.
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # One lookup per byte (both of its codes at once) instead of unpacking the nibbles: the
    # packed linears dequantize their weight on every call, and this is 5-8x faster on CPU.
    values = F.embedding(codes.to(torch.int32), _byte_table(compute_dtype, codes.device))  # (..., K/2, 2)
    values = values.reshape(*codes.shape[:-1], -1, BLOCK_SIZE)  # (..., B, 32)
    scale = e8m0_to_float32(scales).to(compute_dtype).unsqueeze(-1)
    values = (values * scale).flatten(-2)
    if k is not None:
        if not 0 < k <= values.shape[-1]:
            raise ValueError(f"k must be in [1, {values.shape[-1]}], got {k}")
        values = values[..., :k]
    return values.to(dtype)


def fake_quantize_mxfp4(x: Tensor, scale_mode: str = "floor") -> Tensor:
    """Quantize and dequantize: the MXFP4 value of every element, in ``x``'s dtype and shape."""
    codes, scales = quantize_mxfp4(x, scale_mode)
    return dequantize_mxfp4(codes, scales, k=x.shape[-1], dtype=x.dtype)


def mxfp4_block_scales(x: Tensor, scale_mode: str = "floor") -> Tensor:
    """The fp32 block scales ``2**e`` that :func:`quantize_mxfp4` would choose, (..., n_blocks)."""
    return e8m0_to_float32(quantize_mxfp4(x, scale_mode)[1])
