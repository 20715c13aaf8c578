"""The plain-PyTorch arithmetic of a SERQ linear, shared by every path that computes one.

The evaluation mode (:class:`serq_ao.quant.fake_quant.FakeQuantLinear`), the CPU bodies of
the custom ops (:mod:`serq_ao.kernels.ops`), the transformed float model
(:class:`serq_ao.passes.PreOpLinear`) and GPTQ's Hessians all call these functions, so they
compute the same numbers bit for bit in every model dtype:

- :func:`apply_pre_op`: ``X^ = (X * input_scale_inv)[..., perm] H`` in float32 whatever X's
  dtype, H the block Hadamard rotation of ``rotation`` columns (:mod:`serq_ao.formats.hadamard`;
  0: none). Flattening maps each channel's calibration maximum to just above 1.0, where the
  MXFP4 FLOOR block scale jumps by 2; a bf16 or fp16 product would land on either side.
- :func:`linear_on_weights`: ``Y = X_q W^q^T (+ b) + X_q[..., :r] R^T`` in float32, over row
  chunks of the weight so that a caller that dequantizes per call allocates ~4 MB at a time.
  The main GEMM and the thin correction GEMM are two matmuls, as the evaluation mode has
  always computed them (the accuracy tables were measured this way).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from serq_ao.formats.hadamard import block_hadamard

# The CPU reference dequantizes the weight on every call. A whole large weight in fp32 (69 MB
# for 4096 x 4224) is a fresh allocation each time, paid in page faults; slices of ~4 MB are
# reused from cache: 3-5x faster on a 4096-wide decode, same numbers.
DEQUANTIZE_CHUNK_ELEMENTS = 1 << 20

# weights of rows [start, stop): (main (rows, d_in), correction (rows, r) or None), float32
RowWeights = Callable[[int, int], tuple[Tensor, Tensor | None]]


def apply_pre_op(x: Tensor, input_scale_inv: Tensor | None, input_perm: Tensor | None, rotation: int = 0) -> Tensor:
    """The pre-op of a linear's input, in float32 (see the module doc); each part may be absent."""
    x = x.float()
    if input_scale_inv is not None:
        x = x * input_scale_inv.float()
    if input_perm is not None:
        x = x.index_select(-1, input_perm.to(torch.int32))  # stored as int16 where it fits
    return block_hadamard(x, rotation)


def chunk_rows(rows: int, columns: int) -> int:
    """Rows per chunk for a weight with ``columns`` columns (all rows when it is small)."""
    return max(1, DEQUANTIZE_CHUNK_ELEMENTS // max(columns, 1))


def linear_on_weights(x_q: Tensor, rows: int, columns: int, weights: RowWeights, bias: Tensor | None) -> Tensor:
    """``X_q W^q^T (+ bias) + X_q[..., :r] R^T`` in float32, chunk by chunk of output rows.

    ``x_q`` (..., d_in) float32, already quantized; ``columns`` = d_in + r fixes the chunking,
    so that every caller of the same linear splits it alike."""
    bias = None if bias is None else bias.float()
    step = chunk_rows(rows, columns)

    def compute(start: int, stop: int) -> Tensor:
        main, correction = weights(start, stop)
        y = F.linear(x_q, main, None if bias is None else bias[start:stop])
        if correction is not None:
            y = y + F.linear(x_q[..., : correction.shape[1]], correction)
        return y

    if rows <= step:
        return compute(0, rows)
    return torch.cat([compute(start, min(start + step, rows)) for start in range(0, rows, step)], dim=-1)


def rows_of(main: Tensor, correction: Tensor | None) -> RowWeights:
    """``weights`` for :func:`linear_on_weights` from whole dequantized tensors."""
    return lambda start, stop: (main[start:stop], None if correction is None else correction[start:stop])
