"""The MXFP4 format family: MXFP4 weights, correction and activations (W4A4).

Numerics in :mod:`serq_ao.formats.mxfp4`. Weights and R use the same block-scale rule as the
activations (``scale_mode``), or with ``weight_scales="search"`` each block's exponent chosen
by its reconstruction error (:func:`~serq_ao.formats.mxfp4.quantize_mxfp4_by_error`;
activations, quantized at run time, keep the rule). GPTQ fixes every block scale from the
weight before the sweep, by the same choice (a block's scale cannot follow the columns it
has not reached yet), then rounds each column to the E2M1 grid times its block's scale.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from serq_ao.formats.base import FormatName, Quantized, QuantFormat, ScaleMode, WeightScales, enum_value
from serq_ao.formats.mxfp4 import (
    BLOCK_SIZE,
    E2M1_VALUES,
    _e2m1_magnitude_code,
    cached_constant,
    fake_quantize_mxfp4,
    e8m0_to_float32,
    mxfp4_block_scales,
    pack_uint4,
    quantize_mxfp4,
    quantize_mxfp4_by_error,
)

BITS_PER_ELEMENT = 4.25  # 4-bit code + one 8-bit scale per 32


@dataclasses.dataclass(frozen=True)
class MXFP4Format(QuantFormat):
    scale_mode: ScaleMode = ScaleMode.FLOOR
    weight_scales: WeightScales = WeightScales.RULE

    name = FormatName.MXFP4
    activation_bits = 4
    weight_group_size = BLOCK_SIZE
    label = "MXFP4 W4A4"

    def __post_init__(self):
        object.__setattr__(self, "scale_mode", enum_value(ScaleMode, self.scale_mode, "scale_mode"))
        object.__setattr__(self, "weight_scales", enum_value(WeightScales, self.weight_scales, "weight_scales"))

    def _quantize(self, weight: Tensor) -> Quantized:
        if self.weight_scales is WeightScales.SEARCH:
            codes, scales = quantize_mxfp4_by_error(weight.float())
        else:
            codes, scales = quantize_mxfp4(weight.float(), self.scale_mode.value)
        return Quantized(codes, scales, weight.shape[-1], BLOCK_SIZE, "mxfp4")

    def quantize_weight(self, weight: Tensor) -> Quantized:
        return self._quantize(weight)

    def quantize_correction(self, correction: Tensor) -> Quantized:
        return self._quantize(correction)

    def fake_quantize_activation(self, x: Tensor) -> Tensor:
        return fake_quantize_mxfp4(x, self.scale_mode.value)

    def gptq_frozen_scales(self, weight: Tensor) -> Tensor:
        if self.weight_scales is WeightScales.SEARCH:
            return e8m0_to_float32(quantize_mxfp4_by_error(weight.float())[1])
        return mxfp4_block_scales(weight.float(), self.scale_mode.value)  # (d_out, n_blocks) powers of two

    def gptq_group_scale(self, group: Tensor) -> Tensor:
        raise NotImplementedError("MXFP4 block scales are frozen before the GPTQ sweep")

    def gptq_round(self, column: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        # the column is rounded to fp32 first, as every MXFP4 quantizer here computes in fp32
        x32 = column.float()
        magnitude_code = _e2m1_magnitude_code(x32.abs() / scale).long()
        table = cached_constant("e2m1_values", E2M1_VALUES, torch.float32, column.device)  # once, not per column
        negative = x32 < 0
        value = torch.where(negative, -table[magnitude_code], table[magnitude_code]) * scale
        codes = magnitude_code | (negative.long() << 3)
        return codes.to(torch.int16), value.to(column.dtype)

    def gptq_record(self, codes: Tensor, scales: Tensor, columns: int) -> Quantized:
        padded = F.pad(codes, (0, -columns % BLOCK_SIZE)).to(torch.uint8)
        # a power of two's fp32 exponent field is its E8M0 byte (2**-127, a subnormal, reads 0)
        scale_bytes = ((scales.float().contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
        return Quantized(pack_uint4(padded), scale_bytes, columns, BLOCK_SIZE, "mxfp4")

    def effective_bits(self, d_in: int, rank: int) -> float:
        return BITS_PER_ELEMENT * (d_in + rank) / d_in

    def to_dict(self) -> dict:
        return {"format": self.name.value, "scale_mode": self.scale_mode.value,
                "weight_scales": self.weight_scales.value}
