"""SERQ's linear as one custom op per format, so that compile and export keep it one node.

``Y = Q_a(X^) W^q^T + Q_a(X^)[..., :r] R^T (+ bias)`` with ``X^ = (X * input_scale_inv)[..., perm]``
when the group kept a pre-op (either part may be absent).

- ``serq::linear_mxfp4``: the weight is ``[W^q | R]`` packed as MXFP4: ``qdata`` (N, K'/2)
  uint8 codes and ``scale`` (N, K'/32) uint8 E8M0 with ``K' = Kp + r``, Kp being d_in padded
  to a multiple of 32. Activations are quantized to MXFP4 with ``scale_mode``.
- ``serq::linear_int``: W^q as symmetric INT4 codes (N, Kp/2) with fp32 scales per group of
  ``group_size`` (N, Kp/group_size), Kp being d_in padded to the group size; R as INT4 codes
  (N, r/2) with one fp32 scale per row (N, 1). Activations are quantized asymmetrically per
  token in groups of ``group_size`` to ``activation_bits``.

The MXFP4 ops are ``torch.library.triton_op``s: on CUDA their bodies launch the Triton
kernels (:mod:`serq_ao.kernels.triton_quantize`, :mod:`serq_ao.kernels.triton_gemm`), which
Inductor sees and schedules; elsewhere they run the plain-PyTorch reference, which computes
exactly what :class:`serq_ao.simulate.FakeQuantLinear` computes. ``serq::linear_int`` has
only the reference. The two kernels are also ops of their own
(``serq::quantize_activation_mxfp4``, ``serq::mxfp4_gemm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from serq_ao.formats.integer import fake_quantize_int, unpack_int4
from serq_ao.formats.mxfp4 import BLOCK_SIZE, cached_constant, dequantize_mxfp4, fake_quantize_mxfp4, quantize_mxfp4


def padded_in_features(in_features: int, multiple: int = BLOCK_SIZE) -> int:
    return -(-in_features // multiple) * multiple


def _apply_pre_op(x: Tensor, input_scale_inv: Tensor | None, input_perm: Tensor | None) -> Tensor:
    """In float32 whatever x's dtype: flattening maps each channel's maximum to just above 1.0,
    where the MXFP4 block scale jumps, and a bf16 product would land on either side of it."""
    x = x.float()
    if input_scale_inv is not None:
        x = x * input_scale_inv.float()
    if input_perm is not None:
        x = x.index_select(-1, input_perm.to(torch.int32))  # stored as int16 where it fits
    return x


def _corrected_linear(x_q: Tensor, main: Tensor, correction: Tensor | None, bias: Tensor | None) -> Tensor:
    y = F.linear(x_q, main)
    if correction is not None:
        y = y + F.linear(x_q[..., : correction.shape[1]], correction)
    if bias is not None:
        y = y + bias.float()
    return y


# The CPU reference dequantizes the weight on every call. A whole large weight in fp32 (69 MB
# for 4096 x 4224) is a fresh allocation each time, paid in page faults; slices of ~4 MB are
# reused from cache: 3-5x faster on a 4096-wide decode, same numbers.
DEQUANTIZE_CHUNK_ELEMENTS = 1 << 20


def _by_row_chunks(rows: int, columns: int, compute) -> Tensor:
    """``compute(start, stop)`` -> outputs (..., stop - start) for weight rows start:stop,
    over chunks of at most DEQUANTIZE_CHUNK_ELEMENTS weights, concatenated."""
    step = max(1, DEQUANTIZE_CHUNK_ELEMENTS // columns)
    if rows <= step:
        return compute(0, rows)
    return torch.cat([compute(start, min(start + step, rows)) for start in range(0, rows, step)], dim=-1)


def _one_gemm(x_q: Tensor, qdata: Tensor, scale: Tensor, rank: int, bias: Tensor | None) -> Tensor:
    """``[X | X[..., :r]] [W^q | R]^T (+ bias)`` with ``[W^q | R]`` packed as MXFP4: the whole
    SERQ linear as one matmul over Kp + r, as the kernel computes it (one GEMM beats a main
    and a thin correction GEMM)."""
    x_ext = torch.cat([x_q, x_q[..., :rank]], dim=-1) if rank else x_q  # (..., Kp + r)
    bias = None if bias is None else bias.float()

    def rows(start: int, stop: int) -> Tensor:
        weight = dequantize_mxfp4(qdata[start:stop], scale[start:stop])  # (rows, Kp + r)
        return F.linear(x_ext, weight, None if bias is None else bias[start:stop])

    return _by_row_chunks(qdata.shape[0], x_ext.shape[-1], rows)


def split_mxfp4_weight(qdata: Tensor, scale: Tensor, in_features: int, rank: int) -> tuple[Tensor, Tensor | None]:
    """Dequantize ``[W^q | R]`` into W^q (N, d_in) and R (N, r) or None, float32."""
    weight = dequantize_mxfp4(qdata, scale)  # (N, Kp + r)
    kp = padded_in_features(in_features)
    return weight[:, :in_features], (weight[:, kp : kp + rank] if rank else None)


def _signed_int4_byte_table(device: torch.device) -> Tensor:
    """(256, 2) float32: the two signed INT4 codes (low nibble first) of each byte."""

    def build():
        return unpack_int4(torch.arange(256, dtype=torch.uint8, device=device), signed=True).float().view(256, 2)

    return cached_constant("signed_int4_byte_table", build, torch.float32, device)


def dequantize_int4_groups(qdata: Tensor, scale: Tensor, columns: int) -> Tensor:
    """(N, G * g / 2) packed signed INT4 codes and (N, G) scales -> (N, columns) float32.

    One table lookup per byte (see formats.mxfp4.dequantize_mxfp4): this runs on every call."""
    codes = F.embedding(qdata.to(torch.int32), _signed_int4_byte_table(qdata.device))  # (N, G * g / 2, 2)
    groups = codes.reshape(qdata.shape[0], scale.shape[-1], -1) * scale.unsqueeze(-1)  # (N, G, g)
    return groups.flatten(-2)[:, :columns]


_GEMM_OUT_DTYPES = (torch.float32, torch.bfloat16)


def triton_quantize_activation_mxfp4(
    x: Tensor, scale_mode: str, input_scale_inv: Tensor | None, input_perm: Tensor | None, launcher=None
) -> tuple[Tensor, Tensor]:
    """The Triton path of ``serq::quantize_activation_mxfp4``: x (..., K) -> codes, scales."""
    from serq_ao.kernels.triton_quantize import launch_quantize_activation

    x2d = x.reshape(-1, x.shape[-1])  # (M, K)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    kp = padded_in_features(x.shape[-1])
    codes = x.new_empty((x2d.shape[0], kp // 2), dtype=torch.uint8)
    scales = x.new_empty((x2d.shape[0], kp // BLOCK_SIZE), dtype=torch.uint8)
    if x2d.shape[0]:
        launch_quantize_activation(x2d, input_scale_inv, input_perm, codes, scales, rceil=scale_mode == "rceil",
                                   launcher=launcher)
    return codes.view(*x.shape[:-1], -1), scales.view(*x.shape[:-1], -1)


def triton_mxfp4_gemm(
    a_codes: Tensor, a_scales: Tensor, w_codes: Tensor, w_scales: Tensor, in_features_padded: int, rank: int,
    bias: Tensor | None, out_dtype: torch.dtype, launcher=None,
) -> Tensor:
    """The Triton path of ``serq::mxfp4_gemm``: activation codes (..., Kp/2) times ``[W^q | R]``."""
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
                        bias=None, launcher=None) -> Tensor:
    """The Triton path of ``serq::linear_mxfp4``: quantize the activations, then one GEMM over
    Kp + r. Runs on CPU tensors too under ``TRITON_INTERPRET=1`` (how it is tested here)."""
    codes, scales = triton_quantize_activation_mxfp4(x, scale_mode, input_scale_inv, input_perm, launcher)
    return triton_mxfp4_gemm(codes, scales, qdata, scale, padded_in_features(in_features), rank, bias, x.dtype, launcher)


@torch.library.triton_op("serq::quantize_activation_mxfp4", mutates_args=())
def serq_quantize_activation_mxfp4(
    x: Tensor, scale_mode: str, input_scale_inv: Tensor | None = None, input_perm: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Pre-op (optional), then MXFP4 codes (..., Kp/2) and E8M0 scales (..., Kp/32), uint8."""
    if x.device.type != "cuda":
        return quantize_mxfp4(_apply_pre_op(x, input_scale_inv, input_perm), scale_mode)
    return triton_quantize_activation_mxfp4(x, scale_mode, input_scale_inv, input_perm, torch.library.wrap_triton)


@torch.library.triton_op("serq::mxfp4_gemm", mutates_args=())
def serq_mxfp4_gemm(
    a_codes: Tensor, a_scales: Tensor, w_codes: Tensor, w_scales: Tensor, in_features_padded: int, rank: int,
    bias: Tensor | None, out_dtype: torch.dtype,
) -> Tensor:
    """``A [W^q | R]^T`` over Kp + r columns, the last r re-reading activation columns 0..r."""
    if a_codes.device.type != "cuda":
        a = dequantize_mxfp4(a_codes, a_scales)  # (..., Kp)
        return _one_gemm(a, w_codes, w_scales, rank, bias).to(out_dtype)
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
) -> Tensor:
    if x.device.type == "cuda":
        return triton_linear_mxfp4(x, qdata, scale, in_features, rank, scale_mode, input_scale_inv, input_perm, bias,
                                   torch.library.wrap_triton)
    x_hat = _apply_pre_op(x, input_scale_inv, input_perm)  # (..., d_in) float32
    kp = padded_in_features(in_features)
    # zero padding to Kp changes no block: the last block is zero-padded by the quantizer anyway
    x_q = fake_quantize_mxfp4(F.pad(x_hat, (0, kp - in_features)), scale_mode)  # (..., Kp)
    return _one_gemm(x_q, qdata, scale, rank, bias).to(x.dtype)


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
) -> Tensor:
    x_hat = _apply_pre_op(x, input_scale_inv, input_perm)
    x_q = fake_quantize_int(x_hat, activation_bits, symmetric=False, granularity=group_size)

    def rows(start: int, stop: int) -> Tensor:
        main = dequantize_int4_groups(qdata[start:stop], scale[start:stop], in_features)
        correction = None
        if correction_qdata is not None:
            rank = 2 * correction_qdata.shape[1]
            correction = dequantize_int4_groups(correction_qdata[start:stop], correction_scale[start:stop], rank)
        return _corrected_linear(x_q, main, correction, None if bias is None else bias[start:stop])

    return _by_row_chunks(qdata.shape[0], in_features, rows).to(x.dtype)


@serq_linear_int.register_fake
def _(x, qdata, scale, in_features, group_size, activation_bits, correction_qdata=None, correction_scale=None,
      input_scale_inv=None, input_perm=None, bias=None):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))
