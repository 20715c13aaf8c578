"""The INT format family (W4A8, W4A4): INT4 weights, INT4 correction, INT activations.

Numerics in :mod:`serq_ao.formats.integer`. Main weight: symmetric INT4 in groups of
``group_size`` along K, one float32 scale per group. R: symmetric INT4, one scale per output
row. Activations: asymmetric, ``activation_bits`` per token in groups of ``group_size`` along
the permuted K, dynamic. GPTQ takes each group's scale from the current (error-updated)
weights when the sweep reaches the group's first column, as the GPTQ reference does, and
rounds with the float32 scale that is stored. With ``weight_scales="search"`` every weight
and R scale (GPTQ's too) is chosen by the group's error instead of from its maximum
(:func:`~serq_ao.formats.integer.quantize_int_by_error`); the stored format is the same.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from serq_ao.formats.base import FormatName, Quantized, QuantFormat, WeightScales, enum_value
from serq_ao.options import INT_GROUP_SIZE
from serq_ao.formats.integer import (
    fake_quantize_int,
    pack_int4,
    quantize_int,
    quantize_int_by_error,
    symmetric_scales_by_error,
)

WEIGHT_BITS = 4
WEIGHT_QMAX = 2 ** (WEIGHT_BITS - 1) - 1  # 7; codes in [-8, 7]
SCALE_BITS = 16  # the bits accounting counts one fp16 scale per group (stored as fp32 here)


@dataclasses.dataclass(frozen=True)
class IntFormat(QuantFormat):
    name: FormatName
    activation_bits: int
    group_size: int = INT_GROUP_SIZE
    weight_scales: WeightScales = WeightScales.RULE

    def __post_init__(self):
        object.__setattr__(self, "weight_scales", enum_value(WeightScales, self.weight_scales, "weight_scales"))
        if self.activation_bits not in (4, 8):
            raise ValueError(f"activation_bits must be 4 or 8, got {self.activation_bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be an even integer >= 2, got {self.group_size!r}")

    @property
    def label(self) -> str:
        return f"INT W4A{self.activation_bits}"

    @property
    def weight_group_size(self) -> int:
        return self.group_size

    def _record(self, codes: Tensor, scale: Tensor, columns: int, group: int) -> Quantized:
        padded = F.pad(codes, (0, -columns % group)).to(torch.int8)
        return Quantized(pack_int4(padded), scale.float().contiguous(), columns, group, "int4")

    def _quantize(self, weight: Tensor, granularity: str | int):
        if self.weight_scales is WeightScales.SEARCH:
            return quantize_int_by_error(weight, WEIGHT_BITS, granularity=granularity)
        return quantize_int(weight, WEIGHT_BITS, symmetric=True, granularity=granularity)

    def quantize_weight(self, weight: Tensor) -> Quantized:
        q = self._quantize(weight, self.group_size)
        return self._record(q.q, q.scale, weight.shape[-1], self.group_size)

    def quantize_correction(self, correction: Tensor) -> Quantized:
        q = self._quantize(correction, "channel")  # scale (d_out, 1)
        return self._record(q.q, q.scale, correction.shape[-1], correction.shape[-1])

    def fake_quantize_activation(self, x: Tensor) -> Tensor:
        return fake_quantize_int(x, self.activation_bits, symmetric=False, granularity=self.group_size)

    def gptq_frozen_scales(self, weight: Tensor) -> None:
        return None

    def gptq_group_scale(self, group: Tensor) -> Tensor:
        if self.weight_scales is WeightScales.SEARCH:  # the float32 scale chosen on the group as it is now
            return symmetric_scales_by_error(group.float().unsqueeze(1), WEIGHT_BITS).reshape(-1)
        amax = group.abs().amax(dim=1)
        scale = (amax / WEIGHT_QMAX).float()  # the float32 scale that will be stored
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    def gptq_round(self, column: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        scale = scale.to(column.dtype)
        codes = torch.clamp(torch.round(column / scale), -WEIGHT_QMAX - 1, WEIGHT_QMAX)
        return codes.to(torch.int16), codes * scale

    def gptq_record(self, codes: Tensor, scales: Tensor, columns: int) -> Quantized:
        return self._record(codes, scales, columns, self.group_size)

    def effective_bits(self, d_in: int, rank: int) -> float:
        groups = -(-d_in // self.group_size)
        main = WEIGHT_BITS + SCALE_BITS * groups / d_in
        correction = (WEIGHT_BITS * rank + (SCALE_BITS if rank else 0)) / d_in
        return main + correction

    def to_dict(self) -> dict:
        return {"format": self.name.value, "activation_bits": self.activation_bits, "group_size": self.group_size,
                "weight_scales": self.weight_scales.value}
