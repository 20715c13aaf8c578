"""SERQ's MXFP4 linear as one Triton GEMM: ``out = A [W^q | R]^T`` over ``K = Kp + r``.

Layout (see :mod:`serq_ao.formats.mxfp4`), all row-major with unit stride along K:

- activations, already quantized: ``a_codes`` (M, Kp/2) uint8, two E2M1 codes per byte (element
  2i in the low nibble), ``a_scales`` (M, Kp/32) uint8 E8M0;
- weight ``[W^q | R]``: ``w_codes`` (N, (Kp + r)/2), ``w_scales`` (N, (Kp + r)/32); Kp is d_in
  padded to a multiple of 32 and r, the correction rank, a multiple of 32 (possibly 0).

Weight column ``k`` multiplies activation column ``k`` for ``k < Kp`` and ``k - Kp`` after it:
the correction R re-reads the first r (most salient) activation columns, so the whole linear is
one GEMM over ``Kp + r``, run as a main loop over Kp and a correction loop over r.

Both operands are decoded in registers: the E2M1 nibble into fp32 bits, the E8M0 byte shifted
into an fp32 exponent. The sum over K does not depend on order, so instead of interleaving the
two nibbles of a byte each K step does two dots, one over the even (low-nibble) columns and one
over the odd (high-nibble) columns; a byte column ``j`` of a step belongs to block ``j // 16``.
The dot inputs are bf16 on GPU (Hopper has no 4-bit MMA; E2M1 times a power of two is exact in
bf16) and fp32 under ``TRITON_INTERPRET=1``, whose bf16 dot and add are wrong (fp32 dots on a
GPU spill registers: interpreter only). Accumulation is fp32. Products below 2**-126 (blocks
with scale byte 0 or 1) are bf16 subnormals, which the tensor cores may flush to zero.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from serq_ao.formats.mxfp4 import BLOCK_SIZE


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int  # a multiple of 32: whole MX blocks per step
    num_warps: int
    num_stages: int


# Decode (M <= 16) streams the weight: narrow N tiles so that N = 4096 still gives 128 programs,
# and long K steps, 4 stages deep, to keep ~16 KB of loads in flight per SM. Middle and prefill
# (M >= 512): wgmma tiles. None spills on sm_90a (ptxas: at most 150, 195 and 241 registers).
CONFIGS: list[GemmConfig] = [
    GemmConfig(block_m=16, block_n=32, block_k=256, num_warps=4, num_stages=4),
    GemmConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3),
    GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
]


def pick_config(m: int) -> GemmConfig:
    """Config for M rows of activations (decode, middle, prefill)."""
    if m <= 16:
        return CONFIGS[0]
    return CONFIGS[1] if m < 512 else CONFIGS[2]


@triton.jit
def _e2m1_to_float32(nibble):
    """E2M1 codes (sign << 3 | magnitude code) in an int tensor -> exact fp32 values."""
    nibble = nibble.to(tl.int32)
    magnitude = nibble & 7
    # Normal codes 2..7 (exponent code >> 1 with bias 1, mantissa bit code & 1) land in fp32's
    # exponent and top mantissa bit as (code + 252) << 22; the subnormal code 1 (0.5) is
    # 252 << 22, and code 0 is zero. The sign moves from bit 3 to bit 31.
    bits = (magnitude + 252 - (magnitude == 1).to(tl.int32)) << 22
    bits = tl.where(magnitude == 0, 0, bits) | ((nibble & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_to_float32(byte):
    """E8M0 bytes -> fp32 2**(byte - 127); byte 0 -> 2**-127 (subnormal), 255 -> NaN."""
    byte = byte.to(tl.int32)
    bits = tl.where(byte == 0, 0x00400000, byte << 23)
    bits = tl.where(byte == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _accumulate_range(acc, a_codes_ptr, a_scales_ptr, w_codes_ptr, w_scales_ptr,
                      offs_m, offs_n, mask_m, mask_n, stride_am, stride_asm, stride_wn, stride_wsn,
                      w_block_start, n_blocks,
                      BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc += A[:, blocks 0..n_blocks) W[:, blocks w_block_start + (0..n_blocks))^T, decoded."""
    STEP_BLOCKS: tl.constexpr = BLOCK_K // 32  # MX blocks per K step
    HALF_K: tl.constexpr = BLOCK_K // 2  # code bytes per row per K step
    # Tiles are loaded as (..., block, byte within block) so that each scale is loaded once and
    # broadcast over its 16 bytes, instead of one gathered load (and address) per byte.
    offs_b = tl.arange(0, STEP_BLOCKS)
    offs_byte = tl.arange(0, 16)
    for block in range(0, n_blocks, STEP_BLOCKS):
        blocks = block + offs_b
        mask_b = blocks < n_blocks  # Kp and r are whole blocks but need not be whole steps
        a_mask = mask_m[:, None] & mask_b[None, :]  # (BLOCK_M, STEP_BLOCKS)
        a_bytes = tl.load(a_codes_ptr + offs_m[:, None, None] * stride_am + blocks[None, :, None] * 16
                          + offs_byte[None, None, :], mask=a_mask[:, :, None], other=0)  # (BLOCK_M, STEP_BLOCKS, 16)
        a_scale = _e8m0_to_float32(tl.load(a_scales_ptr + offs_m[:, None] * stride_asm + blocks[None, :],
                                           mask=a_mask, other=0))[:, :, None]  # (BLOCK_M, STEP_BLOCKS, 1)
        w_blocks = w_block_start + blocks
        w_mask = mask_b[:, None] & mask_n[None, :]  # (STEP_BLOCKS, BLOCK_N)
        w_bytes = tl.load(w_codes_ptr + offs_n[None, None, :] * stride_wn + w_blocks[:, None, None] * 16
                          + offs_byte[None, :, None], mask=w_mask[:, None, :], other=0)  # (STEP_BLOCKS, 16, BLOCK_N)
        w_scale = _e8m0_to_float32(tl.load(w_scales_ptr + offs_n[None, :] * stride_wsn + w_blocks[:, None],
                                           mask=w_mask, other=0))[:, None, :]  # (STEP_BLOCKS, 1, BLOCK_N)
        a_even = tl.reshape(_e2m1_to_float32(a_bytes & 0xF) * a_scale, (acc.shape[0], HALF_K))
        a_odd = tl.reshape(_e2m1_to_float32(a_bytes >> 4) * a_scale, (acc.shape[0], HALF_K))
        w_even = tl.reshape(_e2m1_to_float32(w_bytes & 0xF) * w_scale, (HALF_K, acc.shape[1]))
        w_odd = tl.reshape(_e2m1_to_float32(w_bytes >> 4) * w_scale, (HALF_K, acc.shape[1]))
        if DOT_FP32:
            acc = tl.dot(a_even, w_even, acc, input_precision="ieee")
            acc = tl.dot(a_odd, w_odd, acc, input_precision="ieee")
        else:
            acc = tl.dot(a_even.to(tl.bfloat16), w_even.to(tl.bfloat16), acc)
            acc = tl.dot(a_odd.to(tl.bfloat16), w_odd.to(tl.bfloat16), acc)
    return acc


@triton.jit
def _serq_mxfp4_gemm_kernel(
    a_codes_ptr, a_scales_ptr, w_codes_ptr, w_scales_ptr, bias_ptr, out_ptr,
    M, N, KP, RANK,
    stride_am, stride_asm, stride_wn, stride_wsn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # Program id 0 (the M tile) varies fastest, so neighbouring programs share a weight tile.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Main part: activation columns [0, Kp) times weight columns [0, Kp).
    acc = _accumulate_range(acc, a_codes_ptr, a_scales_ptr, w_codes_ptr, w_scales_ptr,
                            offs_m, offs_n, mask_m, mask_n, stride_am, stride_asm, stride_wn, stride_wsn,
                            0, KP // 32, BLOCK_K, DOT_FP32)
    # Correction: activation columns [0, r) again, times weight columns [Kp, Kp + r) (R).
    acc = _accumulate_range(acc, a_codes_ptr, a_scales_ptr, w_codes_ptr, w_scales_ptr,
                            offs_m, offs_n, mask_m, mask_n, stride_am, stride_asm, stride_wn, stride_wsn,
                            KP // 32, RANK // 32, BLOCK_K, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_OUT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_inputs(a_codes: Tensor, a_scales: Tensor, w_codes: Tensor, w_scales: Tensor,
                  in_features_padded: int, rank: int, bias: Tensor | None) -> None:
    kp, r = in_features_padded, rank
    if kp <= 0 or kp % BLOCK_SIZE or r < 0 or r % BLOCK_SIZE or r > kp:
        raise ValueError(f"in_features_padded ({kp}) must be a positive multiple of {BLOCK_SIZE} and "
                         f"rank ({r}) a multiple of {BLOCK_SIZE} in [0, in_features_padded]")
    for name, t in (("a_codes", a_codes), ("a_scales", a_scales), ("w_codes", w_codes), ("w_scales", w_scales)):
        if t.dtype != torch.uint8 or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D uint8 tensor, got {t.dtype} of shape {tuple(t.shape)}")
        if t.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along K, got strides {t.stride()}")
        if t.numel() >= 2**31:
            raise ValueError(f"{name} is too large for the kernel's int32 offsets ({t.numel()} elements)")
    m, n = a_codes.shape[0], w_codes.shape[0]
    expected = {"a_codes": (m, kp // 2), "a_scales": (m, kp // BLOCK_SIZE),
                "w_codes": (n, (kp + r) // 2), "w_scales": (n, (kp + r) // BLOCK_SIZE)}
    for name, t in (("a_codes", a_codes), ("a_scales", a_scales), ("w_codes", w_codes), ("w_scales", w_scales)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} for Kp={kp}, r={r}, got {tuple(t.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,) or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous float32 tensor of shape ({n},), "
                         f"got {bias.dtype} of shape {tuple(bias.shape)}")
    devices = {t.device for t in (a_codes, a_scales, w_codes, w_scales) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if a_codes.device.type != "cuda" and not _interpreting():
        raise ValueError("the Triton GEMM needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")


def launch_serq_mxfp4_gemm(
    a_codes: Tensor, a_scales: Tensor, w_codes: Tensor, w_scales: Tensor,
    in_features_padded: int, rank: int, bias: Tensor | None, out: Tensor,
    config: GemmConfig | None = None, launcher: Callable | None = None, dot_fp32: bool | None = None,
) -> Tensor:
    """Write the SERQ MXFP4 GEMM into ``out`` (M, N), fp32 or bf16, and return it.

    ``launcher`` wraps the kernel before ``[grid](...)``, e.g. ``torch.library.wrap_triton``;
    ``dot_fp32`` defaults to True exactly when interpreting or not on CUDA.
    """
    _check_inputs(a_codes, a_scales, w_codes, w_scales, in_features_padded, rank, bias)
    m, n = a_codes.shape[0], w_codes.shape[0]
    if out.dtype not in _OUT_DTYPES or tuple(out.shape) != (m, n) or out.stride(1) != 1:
        raise ValueError(f"out must be a float32 or bfloat16 tensor of shape ({m}, {n}) with unit column "
                         f"stride, got {out.dtype} of shape {tuple(out.shape)}, strides {out.stride()}")
    if out.device != a_codes.device:
        raise ValueError(f"out is on {out.device}, the inputs on {a_codes.device}")
    config = config or pick_config(m)
    if config.block_k % BLOCK_SIZE:
        raise ValueError(f"block_k must be a multiple of {BLOCK_SIZE}, got {config.block_k}")
    if dot_fp32 is None:
        dot_fp32 = _interpreting() or a_codes.device.type != "cuda"
    kernel = (launcher or (lambda fn: fn))(_serq_mxfp4_gemm_kernel)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n))
    kernel[grid](
        a_codes, a_scales, w_codes, w_scales, bias, out,
        m, n, in_features_padded, rank,
        a_codes.stride(0), a_scales.stride(0), w_codes.stride(0), w_scales.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT_FP32=dot_fp32, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def serq_mxfp4_gemm(
    a_codes: Tensor, a_scales: Tensor, w_codes: Tensor, w_scales: Tensor,
    in_features_padded: int, rank: int, bias: Tensor | None, out_dtype: torch.dtype,
    config: GemmConfig | None = None,
) -> Tensor:
    """``Q(X^) W^q^T + Q(X^)[:, :r] R^T (+ bias)``, (M, N) in ``out_dtype`` (fp32 or bf16)."""
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    out = torch.empty((a_codes.shape[0], w_codes.shape[0]), dtype=out_dtype, device=a_codes.device)
    return launch_serq_mxfp4_gemm(a_codes, a_scales, w_codes, w_scales, in_features_padded, rank, bias, out, config)


class CompileSpec(NamedTuple):
    """What ``triton.compile`` needs to build the kernel without a device:
    ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=..., options=options)``."""

    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    attrs: dict[tuple[int, ...], list]
    options: dict[str, int]


def compile_spec(config: GemmConfig, *, has_bias: bool, out_dtype: torch.dtype,
                 dot_fp32: bool = False) -> CompileSpec:
    """The signature, constexprs and options a launch with ``config`` specializes to; ``attrs``
    carries the 16-divisibility hints the runtime would find (pointers from the caching
    allocator; code strides Kp/2 and (Kp + r)/2 are multiples of 16)."""
    signature = {
        "a_codes_ptr": "*u8", "a_scales_ptr": "*u8", "w_codes_ptr": "*u8", "w_scales_ptr": "*u8",
        "bias_ptr": "*fp32" if has_bias else "constexpr", "out_ptr": f"*{_OUT_DTYPES[out_dtype]}",
        "M": "i32", "N": "i32", "KP": "i32", "RANK": "i32",
        "stride_am": "i32", "stride_asm": "i32", "stride_wn": "i32", "stride_wsn": "i32", "stride_om": "i32",
        "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
        "DOT_FP32": "constexpr",
    }
    constexprs = {"HAS_BIAS": has_bias, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                  "BLOCK_K": config.block_k, "DOT_FP32": dot_fp32}
    if not has_bias:
        constexprs["bias_ptr"] = None
    divisible = ["a_codes_ptr", "a_scales_ptr", "w_codes_ptr", "w_scales_ptr", "out_ptr", "KP",
                 "stride_am", "stride_wn"] + (["bias_ptr"] if has_bias else [])
    arg_names = _serq_mxfp4_gemm_kernel.arg_names
    attrs = {(arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return CompileSpec(_serq_mxfp4_gemm_kernel, signature, constexprs, attrs, options)
