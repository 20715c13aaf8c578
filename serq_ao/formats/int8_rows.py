"""INT8 per row: the storage of an embedding table (``SERQConfig(embeddings="int8")``).

A table W (N, K) is stored as int8 codes q (N, K) and one float32 scale per row,
``scale_n = max_k |W[n, k]| / 127`` (symmetric, computed in float32): ``q = round(W / scale)``
(round half to even, |q| <= 127, so -128 never occurs and the grid is symmetric). A row of
zeros (padding tokens) gets scale 1 and codes 0. The value of an element is ``q * scale``,
one float32 product; its error is at most ``scale / 2 = max|row| / 254``.

Why per row: a lookup reads one row, so a row's scale is the one number it needs with its
codes; rows of an embedding table differ in norm (frequent tokens' rows are small), so one
scale per table would waste the grid on most rows. Why 8 bits: the table is also the tied
output head, whose logits every token's choice depends on; 8 bits per row keeps the head's
error far below the 4-bit linears' (docs/usage.md, The embedding table, measures it).
"""

from __future__ import annotations

import torch
from torch import Tensor

INT8_MAX = 127


def quantize_int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``weight`` (N, K), any float dtype -> (codes (N, K) int8, scales (N,) float32)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"an int8 row table needs a 2-D floating-point weight, got {weight.dim()}-D {weight.dtype}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("the embedding table has NaN or inf values: it cannot be quantized")
    amax = w.abs().amax(dim=1)  # (N,)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    codes = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes.contiguous(), scale.contiguous()


def dequantize_int8_rows(codes: Tensor, scale: Tensor) -> Tensor:
    """(N, K) float32 values of an int8 row table (or of any rows of it)."""
    return codes.float() * scale.float()[:, None]
