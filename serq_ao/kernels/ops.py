"""``serq::linear_mxfp4``: one op for a whole SERQ linear, so compile and export keep it one node.

``Y = Q(X^) W^q^T + Q(X^)[..., :r] R^T (+ bias)`` with ``X^ = (X * input_scale_inv)[..., perm]``
when the group kept a pre-op. The weight is ``[W^q | R]`` packed as MXFP4: ``qdata`` (N, K'/2)
uint8 codes and ``scale`` (N, K'/32) uint8 E8M0 with ``K' = Kp + r``, Kp being d_in padded to
a multiple of 32. The body here is the plain-PyTorch reference (the kernels issue adds the
Triton path for CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from serq_ao.formats.mxfp4 import BLOCK_SIZE, dequantize_mxfp4, fake_quantize_mxfp4


def padded_in_features(in_features: int) -> int:
    return -(-in_features // BLOCK_SIZE) * BLOCK_SIZE


def split_weight(qdata: Tensor, scale: Tensor, in_features: int, rank: int) -> tuple[Tensor, Tensor | None]:
    """Dequantize ``[W^q | R]`` into W^q (N, d_in) and R (N, r) or None, float32."""
    weight = dequantize_mxfp4(qdata, scale)  # (N, Kp + r)
    kp = padded_in_features(in_features)
    return weight[:, :in_features], (weight[:, kp : kp + rank] if rank else None)


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
    if input_scale_inv is not None:
        x = x * input_scale_inv.to(x.dtype)
    if input_perm is not None:
        x = x.index_select(-1, input_perm)
    main, correction = split_weight(qdata, scale, in_features, rank)
    x_q = fake_quantize_mxfp4(x.float(), scale_mode)
    y = F.linear(x_q, main)
    if correction is not None:
        y = y + F.linear(x_q[..., :rank], correction)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@serq_linear_mxfp4.register_fake
def _(x, qdata, scale, in_features, rank, scale_mode, input_scale_inv=None, input_perm=None, bias=None):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))
