"""Triton kernel: SERQ's activation pre-op and MXFP4 quantization in one pass.

``x_hat = (x * input_scale_inv)[..., perm] H`` in float32, then :func:`quantize_mxfp4` of
``x_hat`` along the last dimension, bit for bit (see ``serq_ao.formats.mxfp4`` for the layout,
the FLOOR / RCEIL scale rules and the special values; ``kernels.reference.apply_pre_op`` for
the pre-op; ``serq_ao.formats.hadamard`` for H, the block Hadamard rotation). Each part of the
pre-op may be absent.

Layout, for x viewed as (M, K) with the last dimension contiguous and Kp = K rounded up to 32:

- ``codes``: (M, Kp / 2) uint8, element ``2i`` in the low nibble, ``sign << 3 | magnitude``;
- ``scales``: (M, Kp / 32) uint8 E8M0, 0 for an all-zero block, 0xFF for a block with NaN/inf.

Each program quantizes a (BLOCK_M, BLOCK_K) tile: BLOCK_K / 32 MX blocks of BLOCK_M rows. The
gather ``x[m, perm[k]]`` reads the permuted columns directly, so x_hat is never materialized.

The kernel registers nothing with torch.library: :func:`launch_quantize_activation` takes a
``launcher`` (e.g. ``torch.library.wrap_triton``) so that a ``triton_op`` can launch it, and
:func:`compile_spec` gives what ``triton.compile`` needs to build it ahead of time.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from serq_ao.formats.hadamard import check_rotation, inverse_sqrt_table
from serq_ao.formats.mxfp4 import BLOCK_SIZE, SCALE_MODES, _check_scale_mode

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PERM_DTYPES = (torch.int16, torch.int32)
_TRITON_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                      torch.int16: "i16", torch.int32: "i32"}


@triton.jit
def _block_hadamard(x, cols, K, inverse_sqrt_ptr, LOG_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """x (BLOCK_M, BLOCK_K) times the block Hadamard of 2**LOG_SIZE columns, as
    ``serq_ao.formats.hadamard.block_hadamard`` computes it (tile starts are multiples of
    BLOCK_K, itself a multiple of the size, so no block straddles two tiles)."""
    # each column's block size (a power of two; 1 leaves it alone, as for padding columns)
    full = K - K % (1 << LOG_SIZE)
    tail_bits = (K - full) ^ (cols - full)  # (BLOCK_K,), meaningful for full <= cols < K
    tail_log = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for i in tl.static_range(1, LOG_SIZE):
        tail_log = tl.where(tail_bits >= (1 << i), i, tail_log)  # highest set bit
    log = tl.where(cols < full, LOG_SIZE, tl.where(cols < K, tail_log, 0))
    for i in tl.static_range(0, LOG_SIZE):
        # stage h = 2**i: groups of 2h columns, as (2, h) to pair column c with c + h
        pairs = tl.permute(tl.reshape(x, (BLOCK_M, BLOCK_K >> (i + 1), 2, 1 << i)), (0, 1, 3, 2))
        first, second = tl.split(pairs)  # (BLOCK_M, BLOCK_K / 2h, h): columns c and c + h
        stage = tl.reshape(tl.permute(tl.join(first + second, first - second), (0, 1, 3, 2)), (BLOCK_M, BLOCK_K))
        x = tl.where((log > i)[None, :], stage, x)  # stage h applies to blocks of 2h or more
    inverse_sqrt = tl.load(inverse_sqrt_ptr + log)  # (BLOCK_K,) 1/sqrt(block size), float32
    return x * inverse_sqrt[None, :]


@triton.jit
def _quantize_activation_mxfp4_kernel(
    x_ptr, scale_inv_ptr, perm_ptr, inverse_sqrt_ptr, codes_ptr, scales_ptr,
    M, K, stride_x_m, stride_codes_m, stride_scales_m,
    HAS_SCALE: tl.constexpr, HAS_PERM: tl.constexpr, RCEIL: tl.constexpr, ROTATION_LOG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    N_BLOCKS: tl.constexpr = BLOCK_K // 32
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,) columns of x_hat
    row_in = rows < M
    col_in = cols < K  # columns K..Kp-1 are padding: loaded as +0.0

    if HAS_PERM:
        source_cols = tl.load(perm_ptr + cols, mask=col_in, other=0).to(tl.int32)
        # memory safety whatever the order holds (loading checks it is a permutation): an id
        # outside [0, K) reads nothing and counts as 0
        source_in = col_in & (source_cols >= 0) & (source_cols < K)
    else:
        source_cols = cols
        source_in = col_in
    # int64 row offsets: M * stride can pass 2**31 on prefill-sized inputs
    offsets = rows.to(tl.int64)[:, None] * stride_x_m + source_cols[None, :]
    mask = row_in[:, None] & source_in[None, :]
    # All arithmetic is fp32, as in the reference. bf16 widens by placing its bits in the high
    # half of an fp32, which is exact (subnormals included); the interpreter's bf16 -> fp32
    # cast turns bf16 subnormals into wrong values.
    if x_ptr.dtype.element_ty == tl.bfloat16:
        bits16 = tl.load(x_ptr.to(tl.pointer_type(tl.uint16)) + offsets, mask=mask, other=0)
        x = (bits16.to(tl.uint32) << 16).to(tl.float32, bitcast=True)  # (BLOCK_M, BLOCK_K)
    else:
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_K)
    if HAS_SCALE:
        # scale_inv is indexed by the source channel: product first, gather second
        scale_inv = tl.load(scale_inv_ptr + source_cols, mask=source_in, other=0.0)  # (BLOCK_K,)
        if ROTATION_LOG:
            # the select keeps the product from fusing with the butterfly's first add into
            # an FMA, which the float32 reference does not do (masked lanes are 0 either way)
            x = tl.where(mask, x * scale_inv[None, :], 0.0)  # (BLOCK_M, BLOCK_K)
        else:
            x = x * scale_inv[None, :]  # (BLOCK_M, BLOCK_K)
    if ROTATION_LOG:  # the block Hadamard rotation of 2**ROTATION_LOG columns
        x = _block_hadamard(x, cols, K, inverse_sqrt_ptr, ROTATION_LOG, BLOCK_M, BLOCK_K)

    blocks = tl.reshape(x, (BLOCK_M, N_BLOCKS, 32))
    magnitude = tl.abs(blocks)
    # NaN fails every comparison, so "not <= fp32 max" catches NaN and +-inf alike.
    not_finite = (magnitude <= 3.4028234663852886e38) == 0
    finite = tl.max(not_finite.to(tl.int32), axis=2) == 0  # (BLOCK_M, N_BLOCKS)
    amax = tl.max(tl.where(not_finite, 0.0, magnitude), axis=2)  # (BLOCK_M, N_BLOCKS)

    # Exponents from the fp32 bits, exactly as _shared_exponent does (no log2).
    if RCEIL:
        # div_rn: plain "/" compiles to an approximate division on NVIDIA GPUs
        descale = tl.div_rn(amax, 6.0)
        bits = descale.to(tl.int32, bitcast=True)
        # ceil(log2(d)) = exponent(d) + 1 unless d is a power of two; subnormal d at or
        # below 2**-127 (bits 0x00400000) stays at the clamp floor -127
        round_up = ((bits & 0x7FFFFF) != 0) & (bits > 0x00400000)
        exponent = ((bits >> 23) & 0xFF) - 127 + round_up.to(tl.int32)
    else:
        bits = amax.to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) - 127 - 2  # floor(log2(amax)) - emax of E2M1
    exponent = tl.minimum(tl.maximum(exponent, -127), 127)  # (BLOCK_M, N_BLOCKS)

    # 2**-e from its bits; a finite block has e <= 126, so it is normal and the product exact
    reciprocal = ((127 - exponent) << 23).to(tl.float32, bitcast=True)
    v = magnitude * reciprocal[:, :, None]  # (BLOCK_M, N_BLOCKS, 32)
    # E2M1 magnitude code = number of rounding thresholds below v; ties go to the even code,
    # so thresholds whose upper neighbour is even count on ">=", the others on ">".
    code = ((v > 0.25).to(tl.int32) + (v >= 0.75).to(tl.int32) + (v > 1.25).to(tl.int32)
            + (v >= 1.75).to(tl.int32) + (v > 2.5).to(tl.int32) + (v >= 3.5).to(tl.int32)
            + (v > 5.0).to(tl.int32))
    sign = (blocks.to(tl.int32, bitcast=True) < 0).to(tl.int32) << 3  # keeps -0.0's sign
    code = tl.where(finite[:, :, None], code | sign, 0)

    pairs = tl.reshape(code, (BLOCK_M, BLOCK_K // 2, 2))
    low, high = tl.split(pairs)  # (BLOCK_M, BLOCK_K // 2) each: elements 2i and 2i + 1
    packed = (low | (high << 4)).to(tl.uint8)
    scale_bytes = tl.where(finite, exponent + 127, 255).to(tl.uint8)  # (BLOCK_M, N_BLOCKS)

    k_padded = tl.cdiv(K, 32) * 32
    byte_cols = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    codes_mask = row_in[:, None] & (byte_cols < k_padded // 2)[None, :]
    tl.store(codes_ptr + rows.to(tl.int64)[:, None] * stride_codes_m + byte_cols[None, :],
             packed, mask=codes_mask)
    block_cols = pid_k * N_BLOCKS + tl.arange(0, N_BLOCKS)
    scales_mask = row_in[:, None] & (block_cols < k_padded // 32)[None, :]
    tl.store(scales_ptr + rows.to(tl.int64)[:, None] * stride_scales_m + block_cols[None, :],
             scale_bytes, mask=scales_mask)


class QuantizeConfig(NamedTuple):
    block_m: int
    block_k: int
    num_warps: int


DECODE_CONFIG = QuantizeConfig(block_m=1, block_k=128, num_warps=1)  # M <= 16: K-parallel
PREFILL_CONFIG = QuantizeConfig(block_m=16, block_k=128, num_warps=4)  # M >= 512
CONFIGS = (DECODE_CONFIG, PREFILL_CONFIG)


def config_for(m: int) -> QuantizeConfig:
    return DECODE_CONFIG if m <= 16 else PREFILL_CONFIG


def launch_quantize_activation(
    x2d: Tensor,
    scale_inv: Tensor | None,
    perm: Tensor | None,
    codes: Tensor,
    scales: Tensor,
    rceil: bool,
    config: QuantizeConfig | None = None,
    launcher: Callable | None = None,
    rotation: int = 0,
) -> None:
    """Quantize x2d (M, K) into preallocated ``codes`` (M, Kp/2) and ``scales`` (M, Kp/32).

    No validation (see :func:`quantize_activation_mxfp4`). ``launcher`` wraps the kernel
    before launching, e.g. ``torch.library.wrap_triton`` inside a ``triton_op``.
    """
    m, k = x2d.shape
    config = config or config_for(m)
    kernel = _quantize_activation_mxfp4_kernel if launcher is None else launcher(_quantize_activation_mxfp4_kernel)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(k, config.block_k))
    # Absent parts of the pre-op get x as a placeholder pointer, never read (HAS_* False).
    inverse_sqrt = inverse_sqrt_table(torch.float32, x2d.device) if rotation else x2d
    kernel[grid](
        x2d, x2d if scale_inv is None else scale_inv, x2d if perm is None else perm, inverse_sqrt, codes, scales,
        m, k, x2d.stride(0), codes.stride(0), scales.stride(0),
        HAS_SCALE=scale_inv is not None, HAS_PERM=perm is not None, RCEIL=rceil,
        ROTATION_LOG=rotation.bit_length() - 1 if rotation else 0,
        BLOCK_M=config.block_m, BLOCK_K=config.block_k, num_warps=config.num_warps,
    )


def quantize_activation_mxfp4(
    x: Tensor,
    scale_mode: str,
    input_scale_inv: Tensor | None = None,
    input_perm: Tensor | None = None,
    block_m: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    rotation: int = 0,
) -> tuple[Tensor, Tensor]:
    """``quantize_mxfp4(block_hadamard((x.float() * input_scale_inv)[..., input_perm], rotation),
    scale_mode)`` in one kernel: codes (..., Kp/2) and scales (..., Kp/32), uint8. Tile sizes
    default by M."""
    _check_scale_mode(scale_mode)
    check_rotation(rotation)
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if input_scale_inv is not None:
        if input_scale_inv.dtype != torch.float32 or input_scale_inv.shape != (k,):
            raise ValueError(f"input_scale_inv must be float32 of shape ({k},), got "
                             f"{input_scale_inv.dtype} {tuple(input_scale_inv.shape)}")
        if input_scale_inv.device != x.device:
            raise ValueError(f"input_scale_inv is on {input_scale_inv.device}, x on {x.device}")
        input_scale_inv = input_scale_inv.contiguous()
    if input_perm is not None:
        if input_perm.dtype not in _PERM_DTYPES or input_perm.shape != (k,):
            raise ValueError(f"input_perm must be int16 or int32 of shape ({k},), got "
                             f"{input_perm.dtype} {tuple(input_perm.shape)}")
        if input_perm.device != x.device:
            raise ValueError(f"input_perm is on {input_perm.device}, x on {x.device}")
        input_perm = input_perm.contiguous()
    if block_k is not None and (block_k <= 0 or block_k % BLOCK_SIZE or block_k & (block_k - 1)):
        raise ValueError(f"block_k must be a power of two multiple of {BLOCK_SIZE}, got {block_k}")
    if block_k is not None and block_k < rotation:
        raise ValueError(f"block_k must be at least the rotation's block ({rotation}), got {block_k}")
    if block_m is not None and (block_m <= 0 or block_m & (block_m - 1)):
        raise ValueError(f"block_m must be a power of two, got {block_m}")

    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m = x2d.shape[0]
    default = config_for(m)
    config = QuantizeConfig(block_m or default.block_m, block_k or default.block_k,
                            num_warps or default.num_warps)
    n_blocks = triton.cdiv(k, BLOCK_SIZE)
    codes = torch.empty((m, n_blocks * BLOCK_SIZE // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((m, n_blocks), dtype=torch.uint8, device=x.device)
    if m:
        launch_quantize_activation(x2d, input_scale_inv, input_perm, codes, scales,
                                   rceil=scale_mode == "rceil", config=config, rotation=rotation)
    lead = x.shape[:-1]
    return codes.view(*lead, -1), scales.view(*lead, -1)


class CompileSpec(NamedTuple):
    """Arguments for ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
    target=..., options=options)`` (the same fields as the GEMM's)."""

    fn: triton.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, int | bool]
    attrs: dict[tuple[int, ...], list]
    options: dict[str, int]


def compile_spec(
    config: QuantizeConfig,
    x_dtype: torch.dtype,
    scale_mode: str,
    has_scale: bool,
    perm_dtype: torch.dtype | None,
    rotation: int = 0,
) -> CompileSpec:
    """What ``triton.compile`` needs to build the kernel for one variant without a device.

    ``perm_dtype`` None means no permutation. Absent pre-op pointers keep a typed slot (the
    launcher passes x there), so every variant has the same argument list.
    """
    _check_scale_mode(scale_mode)
    if x_dtype not in _X_DTYPES:
        raise ValueError(f"x_dtype must be one of {_X_DTYPES}, got {x_dtype}")
    if perm_dtype is not None and perm_dtype not in _PERM_DTYPES:
        raise ValueError(f"perm_dtype must be one of {_PERM_DTYPES} or None, got {perm_dtype}")
    x_type = "*" + _TRITON_TYPE_NAMES[x_dtype]
    signature = {
        "x_ptr": x_type,
        "scale_inv_ptr": "*fp32" if has_scale else x_type,
        "perm_ptr": "*" + _TRITON_TYPE_NAMES[perm_dtype] if perm_dtype is not None else x_type,
        "inverse_sqrt_ptr": "*fp32" if rotation else x_type,
        "codes_ptr": "*u8",
        "scales_ptr": "*u8",
        "M": "i32", "K": "i32", "stride_x_m": "i32", "stride_codes_m": "i32", "stride_scales_m": "i32",
        # constexprs appear in the signature too, typed "constexpr"
        "HAS_SCALE": "constexpr", "HAS_PERM": "constexpr", "RCEIL": "constexpr", "ROTATION_LOG": "constexpr",
        "BLOCK_M": "constexpr", "BLOCK_K": "constexpr",
    }
    constexprs = {
        "HAS_SCALE": has_scale, "HAS_PERM": perm_dtype is not None, "RCEIL": scale_mode == "rceil",
        "ROTATION_LOG": check_rotation(rotation).bit_length() - 1 if rotation else 0,
        "BLOCK_M": config.block_m, "BLOCK_K": config.block_k,
    }
    return CompileSpec(_quantize_activation_mxfp4_kernel, signature, constexprs, {},
                       {"num_warps": config.num_warps})


__all__ = ["CONFIGS", "SCALE_MODES", "CompileSpec", "QuantizeConfig", "compile_spec", "config_for",
           "launch_quantize_activation", "quantize_activation_mxfp4"]
