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

The bodies here are the plain-PyTorch references (the kernels issue adds the Triton path for
CUDA); they compute exactly what :class:`serq_ao.simulate.FakeQuantLinear` computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from serq_ao.formats.integer import fake_quantize_int, unpack_int4
from serq_ao.formats.mxfp4 import BLOCK_SIZE, cached_constant, dequantize_mxfp4, fake_quantize_mxfp4


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


@torch.library.custom_op("serq::linear_mxfp4", mutates_args=())
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
    x_hat = _apply_pre_op(x, input_scale_inv, input_perm)
    main, correction = split_mxfp4_weight(qdata, scale, in_features, rank)
    x_q = fake_quantize_mxfp4(x_hat, scale_mode)
    return _corrected_linear(x_q, main, correction, bias).to(x.dtype)


@serq_linear_mxfp4.register_fake
def _(x, qdata, scale, in_features, rank, scale_mode, input_scale_inv=None, input_perm=None, bias=None):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


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
    main = dequantize_int4_groups(qdata, scale, in_features)
    correction = None
    if correction_qdata is not None:
        correction = dequantize_int4_groups(correction_qdata, correction_scale, 2 * correction_qdata.shape[1])
    x_q = fake_quantize_int(x_hat, activation_bits, symmetric=False, granularity=group_size)
    return _corrected_linear(x_q, main, correction, bias).to(x.dtype)


@serq_linear_int.register_fake
def _(x, qdata, scale, in_features, group_size, activation_bits, correction_qdata=None, correction_scale=None,
      input_scale_inv=None, input_perm=None, bias=None):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))
