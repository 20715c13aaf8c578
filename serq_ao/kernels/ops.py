"""SERQ's linear as one custom op per format, so that compile and export keep it one node.

``Y = Q_a(X^) W^q^T + Q_a(X^)[..., :r] R^T (+ bias)`` with ``X^ = (X * input_scale_inv)[..., perm] H``
(:func:`serq_ao.kernels.reference.apply_pre_op`; each part may be absent: the scale and order
where the group's transform was folded into its producer, H, the block Hadamard rotation of
``rotation`` columns, where ``rotation`` is 0).

- ``serq::linear_mxfp4``: the weight is ``[W^q | R]`` packed as MXFP4: ``qdata`` (N, K'/2)
  uint8 codes and ``scale`` (N, K'/32) uint8 E8M0 with ``K' = Kp + r``, Kp being d_in padded
  to a multiple of 32. Activations are quantized to MXFP4 with ``scale_mode``.
- ``serq::linear_int``: W^q as symmetric INT4 codes (N, Kp/2) with fp32 scales per group of
  ``group_size`` (N, Kp/group_size), Kp being d_in padded to the group size; R as INT4 codes
  (N, r/2) with one fp32 scale per row (N, 1). Activations are quantized asymmetrically per
  token in groups of ``group_size`` to ``activation_bits``.
- ``serq::linear_int8_weights``: ``(x qdata^T) * scale + bias`` with float activations and an
  int8 weight (N, K) with one float scale per row (N,): a tied LM head / embedding table stored
  as int8. No pre-op, no activation quantization; on an x86-64 CPU the native kernel, elsewhere
  the reference in float32, a slice of rows of the weight at a time.

The MXFP4 ops are ``torch.library.triton_op``s: on CUDA their bodies launch the Triton
kernels (:mod:`serq_ao.kernels.triton_quantize`, :mod:`serq_ao.kernels.triton_gemm`), which
Inductor sees and schedules. On an x86-64 CPU both linears run the native kernels
(:mod:`serq_ao.kernels.cpu_native`: integer block dot products; the activation codes bitwise
the reference's, the outputs equal up to the order of a float32 sum, within the bound its doc
derives). Elsewhere, or with ``SERQ_CPU_KERNEL=reference``, they run the plain-PyTorch
reference, which computes what the evaluation mode computes, through the same functions
(:mod:`serq_ao.kernels.reference`): the same numbers, bit for bit. The two MXFP4 kernels are
also ops of their own (``serq::quantize_activation_mxfp4``, ``serq::mxfp4_gemm``; on the CPU
the second is the reference's).
"""

from __future__ import annotations

import logging
import platform

import torch
from torch import Tensor

from serq_ao.extras import require
from serq_ao.formats.integer import dequantize_int4_groups, fake_quantize_int
from serq_ao.formats.mxfp4 import BLOCK_SIZE, _tracing, dequantize_mxfp4, fake_quantize_mxfp4, quantize_mxfp4
from serq_ao.kernels import cpu_native
from serq_ao.kernels.reference import RowWeights, apply_pre_op, linear_on_weights

try:
    import triton  # noqa: F401  (torch.library.triton_op below imports it anyway when installed)
except ImportError:
    # triton is a dependency only on Linux; elsewhere torch would warn once per op below
    # that it found no kernels in the bodies, which is expected: they launch kernels only on CUDA
    logging.getLogger("torch._library.triton").setLevel(logging.ERROR)


# a library this machine built already is loaded now (no compiling), so that ahead-of-time
# compiled programs that call its ops run in a fresh process
if platform.machine().lower() in ("x86_64", "amd64"):
    cpu_native.load_if_built()


def _require_triton() -> None:
    require("triton", None, "running the serq MXFP4 ops on CUDA",
            install="pip install triton (torch's CUDA wheels for Linux bring it)")


def padded_in_features(in_features: int, multiple: int = BLOCK_SIZE) -> int:
    return -(-in_features // multiple) * multiple


def split_mxfp4_weight(qdata: Tensor, scale: Tensor, in_features: int, rank: int) -> tuple[Tensor, Tensor | None]:
    """Dequantize rows of ``[W^q | R]`` into W^q (rows, d_in) and R (rows, r) or None,
    float32 and contiguous (the layout the evaluation mode multiplies with)."""
    kp = padded_in_features(in_features)
    main = dequantize_mxfp4(qdata[:, : kp // 2], scale[:, : kp // BLOCK_SIZE], k=in_features).contiguous()
    if not rank:
        return main, None
    return main, dequantize_mxfp4(qdata[:, kp // 2 :], scale[:, kp // BLOCK_SIZE :]).contiguous()


def mxfp4_row_weights(qdata: Tensor, scale: Tensor, in_features: int, rank: int) -> RowWeights:
    return lambda start, stop: split_mxfp4_weight(qdata[start:stop], scale[start:stop], in_features, rank)


def int_row_weights(qdata: Tensor, scale: Tensor, in_features: int, correction_qdata: Tensor | None,
                    correction_scale: Tensor | None) -> RowWeights:
    def weights(start: int, stop: int):
        main = dequantize_int4_groups(qdata[start:stop], scale[start:stop], in_features).contiguous()
        if correction_qdata is None:
            return main, None
        rank = 2 * correction_qdata.shape[1]
        return main, dequantize_int4_groups(correction_qdata[start:stop], correction_scale[start:stop], rank).contiguous()

    return weights


_GEMM_OUT_DTYPES = (torch.float32, torch.bfloat16)


def triton_quantize_activation_mxfp4(
    x: Tensor, scale_mode: str, input_scale_inv: Tensor | None, input_perm: Tensor | None, launcher=None,
    rotation: int = 0,
) -> tuple[Tensor, Tensor]:
    """The Triton path of ``serq::quantize_activation_mxfp4``: x (..., K) -> codes, scales."""
    _require_triton()
    from serq_ao.kernels.triton_quantize import launch_quantize_activation

    x2d = x.reshape(-1, x.shape[-1])  # (M, K)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    kp = padded_in_features(x.shape[-1])
    codes = x.new_empty((x2d.shape[0], kp // 2), dtype=torch.uint8)
    scales = x.new_empty((x2d.shape[0], kp // BLOCK_SIZE), dtype=torch.uint8)
    if x2d.shape[0]:
        launch_quantize_activation(x2d, input_scale_inv, input_perm, codes, scales, rceil=scale_mode == "rceil",
                                   launcher=launcher, rotation=rotation)
    return codes.view(*x.shape[:-1], -1), scales.view(*x.shape[:-1], -1)


def triton_mxfp4_gemm(
    a_codes: Tensor, a_scales: Tensor, w_codes: Tensor, w_scales: Tensor, in_features_padded: int, rank: int,
    bias: Tensor | None, out_dtype: torch.dtype, launcher=None,
) -> Tensor:
    """The Triton path of ``serq::mxfp4_gemm``: activation codes (..., Kp/2) times ``[W^q | R]``."""
    _require_triton()
    from serq_ao.kernels.triton_gemm import launch_serq_mxfp4_gemm

    codes2d = a_codes.reshape(-1, a_codes.shape[-1])  # (M, Kp/2)
    scales2d = a_scales.reshape(-1, a_scales.shape[-1])
    gemm_dtype = out_dtype if out_dtype in _GEMM_OUT_DTYPES else torch.float32
    out = a_codes.new_empty((codes2d.shape[0], w_codes.shape[0]), dtype=gemm_dtype)
    if codes2d.shape[0]:
        launch_serq_mxfp4_gemm(codes2d, scales2d, w_codes, w_scales, in_features_padded, rank,
                               None if bias is None else bias.float().contiguous(), out, launcher=launcher)
    return out.to(out_dtype).view(*a_codes.shape[:-1], -1)


def triton_linear_mxfp4(x, qdata, scale, in_features, rank, scale_mode, input_scale_inv=None, input_perm=None,
                        bias=None, launcher=None, rotation=0) -> Tensor:
    """The Triton path of ``serq::linear_mxfp4``: quantize the activations, then one GEMM over
    Kp + r. Runs on CPU tensors too under ``TRITON_INTERPRET=1`` (how it is tested here)."""
    codes, scales = triton_quantize_activation_mxfp4(x, scale_mode, input_scale_inv, input_perm, launcher, rotation)
    return triton_mxfp4_gemm(codes, scales, qdata, scale, padded_in_features(in_features), rank, bias, x.dtype, launcher)


@torch.library.triton_op("serq::quantize_activation_mxfp4", mutates_args=())
def serq_quantize_activation_mxfp4(
    x: Tensor, scale_mode: str, input_scale_inv: Tensor | None = None, input_perm: Tensor | None = None,
    rotation: int = 0,
) -> tuple[Tensor, Tensor]:
    """Pre-op (optional), then MXFP4 codes (..., Kp/2) and E8M0 scales (..., Kp/32), uint8."""
    if x.device.type == "cpu" and (isa := cpu_native.selected_isa()) is not None:
        return cpu_native.quantize_activation_mxfp4(x, scale_mode, input_scale_inv, input_perm, rotation, isa)
    if x.device.type != "cuda":
        return quantize_mxfp4(apply_pre_op(x, input_scale_inv, input_perm, rotation), scale_mode)
    return triton_quantize_activation_mxfp4(x, scale_mode, input_scale_inv, input_perm, torch.library.wrap_triton,
                                            rotation)


@torch.library.triton_op("serq::mxfp4_gemm", mutates_args=())
def serq_mxfp4_gemm(
    a_codes: Tensor, a_scales: Tensor, w_codes: Tensor, w_scales: Tensor, in_features_padded: int, rank: int,
    bias: Tensor | None, out_dtype: torch.dtype,
) -> Tensor:
    """``A [W^q | R]^T`` over Kp + r columns, the last r re-reading activation columns 0..r."""
    if a_codes.device.type != "cuda":
        a = dequantize_mxfp4(a_codes, a_scales)  # (..., Kp)
        weights = mxfp4_row_weights(w_codes, w_scales, in_features_padded, rank)
        return linear_on_weights(a, w_codes.shape[0], in_features_padded + rank, weights, bias).to(out_dtype)
    return triton_mxfp4_gemm(a_codes, a_scales, w_codes, w_scales, in_features_padded, rank, bias, out_dtype,
                             torch.library.wrap_triton)


@torch.library.triton_op("serq::linear_mxfp4", mutates_args=())
def serq_linear_mxfp4(
    x: Tensor,
    qdata: Tensor,
    scale: Tensor,
    in_features: int,
    rank: int,
    scale_mode: str,
    input_scale_inv: Tensor | None = None,
    input_perm: Tensor | None = None,
    bias: Tensor | None = None,
    rotation: int = 0,
) -> Tensor:
    if x.device.type == "cuda":
        return triton_linear_mxfp4(x, qdata, scale, in_features, rank, scale_mode, input_scale_inv, input_perm, bias,
                                   torch.library.wrap_triton, rotation)
    if x.device.type == "cpu" and (isa := cpu_native.selected_isa()) is not None:
        return cpu_native.linear_mxfp4(x, qdata, scale, in_features, rank, scale_mode, input_scale_inv, input_perm,
                                       bias, rotation, isa)
    x_q = fake_quantize_mxfp4(apply_pre_op(x, input_scale_inv, input_perm, rotation), scale_mode)  # (..., d_in) float32
    weights = mxfp4_row_weights(qdata, scale, in_features, rank)
    return linear_on_weights(x_q, qdata.shape[0], in_features + rank, weights, bias).to(x.dtype)


@torch.library.custom_op("serq::linear_int", mutates_args=())
def serq_linear_int(
    x: Tensor,
    qdata: Tensor,
    scale: Tensor,
    in_features: int,
    group_size: int,
    activation_bits: int,
    correction_qdata: Tensor | None = None,
    correction_scale: Tensor | None = None,
    input_scale_inv: Tensor | None = None,
    input_perm: Tensor | None = None,
    bias: Tensor | None = None,
    rotation: int = 0,
) -> Tensor:
    if x.device.type == "cpu" and (isa := cpu_native.int_isa(group_size)) is not None:
        return cpu_native.linear_int(x, qdata, scale, in_features, group_size, activation_bits, correction_qdata,
                                     correction_scale, input_scale_inv, input_perm, bias, rotation, isa)
    x_q = fake_quantize_int(apply_pre_op(x, input_scale_inv, input_perm, rotation), activation_bits, symmetric=False,
                            granularity=group_size)
    rank = 0 if correction_qdata is None else 2 * correction_qdata.shape[1]
    weights = int_row_weights(qdata, scale, in_features, correction_qdata, correction_scale)
    return linear_on_weights(x_q, qdata.shape[0], in_features + rank, weights, bias).to(x.dtype)


@serq_linear_int.register_fake
def _(x, qdata, scale, in_features, group_size, activation_bits, correction_qdata=None, correction_scale=None,
      input_scale_inv=None, input_perm=None, bias=None, rotation=0):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


def _eager_cpu_isa(x: Tensor) -> int | None:
    """The native kernel to call directly for ``x``, or None where the op must run: traced code
    (compile and export keep the op node), other devices, the reference."""
    if type(x) is not torch.Tensor or x.device.type != "cpu" or _tracing():
        return None
    return cpu_native.selected_isa()


def linear_mxfp4(x, qdata, scale, in_features, rank, scale_mode, input_scale_inv=None, input_perm=None, bias=None,
                 rotation=0) -> Tensor:
    """``serq::linear_mxfp4``, the native CPU kernel called directly in eager runs: the op's
    Python dispatch costs more than a decode-sized linear (same function, same numbers)."""
    if (isa := _eager_cpu_isa(x)) is not None:
        return cpu_native.linear_mxfp4(x, qdata, scale, in_features, rank, scale_mode, input_scale_inv, input_perm,
                                       bias, rotation, isa)
    return serq_linear_mxfp4(x, qdata, scale, in_features, rank, scale_mode, input_scale_inv, input_perm, bias,
                             rotation)


def linear_int(x, qdata, scale, in_features, group_size, activation_bits, correction_qdata=None, correction_scale=None,
               input_scale_inv=None, input_perm=None, bias=None, rotation=0) -> Tensor:
    """``serq::linear_int``, called as :func:`linear_mxfp4` is."""
    if not group_size % 32 and (isa := _eager_cpu_isa(x)) is not None:
        return cpu_native.linear_int(x, qdata, scale, in_features, group_size, activation_bits, correction_qdata,
                                     correction_scale, input_scale_inv, input_perm, bias, rotation, isa)
    return serq_linear_int(x, qdata, scale, in_features, group_size, activation_bits, correction_qdata,
                           correction_scale, input_scale_inv, input_perm, bias, rotation)


# rows of the int8 weight the reference widens to float32 at a time (a tied 49152 x 4096 head
# would be 800 MB as floats)
INT8_REFERENCE_ROWS = 4096


def int8_weights_reference(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``(F.linear(x.float(), qdata.float()) * scale.float() + bias).to(x.dtype)``, the weight
    widened :data:`INT8_REFERENCE_ROWS` rows at a time."""
    x32 = x.float()
    out = x32.new_empty((*x.shape[:-1], qdata.shape[0]))
    for start in range(0, qdata.shape[0], INT8_REFERENCE_ROWS):
        stop = start + INT8_REFERENCE_ROWS
        out[..., start:stop] = torch.nn.functional.linear(x32, qdata[start:stop].float())
    out = out * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@torch.library.custom_op("serq::linear_int8_weights", mutates_args=())
def serq_linear_int8_weights(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``(x qdata^T) * scale + bias``: x (..., K) float, qdata (N, K) int8, scale (N,) per row."""
    if x.device.type == "cpu" and (isa := cpu_native.selected_isa()) is not None:
        return cpu_native.linear_int8_weights(x, qdata, scale, bias, isa)
    return int8_weights_reference(x, qdata, scale, bias)


@serq_linear_int8_weights.register_fake
def _(x, qdata, scale, bias=None):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


def linear_int8_weights(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``serq::linear_int8_weights``, called as :func:`linear_mxfp4` is (the native kernel directly
    in eager CPU runs, the op otherwise: compile and export keep one node)."""
    if (isa := _eager_cpu_isa(x)) is not None:
        return cpu_native.linear_int8_weights(x, qdata, scale, bias, isa)
    return serq_linear_int8_weights(x, qdata, scale, bias)
