"""What every format family provides, and the quantized record it hands between steps.

A *format* (:class:`QuantFormat`) is one object per family that knows, for a SERQ linear:

- its weight quantizer (main weight W^, d_out x K) and correction quantizer (R, d_out x r),
  both returning :class:`Quantized` records (codes and scales, never dequantized floats);
- its activation quantizer (dynamic, fp32 in and out);
- GPTQ's rounding step on its grid (scales frozen before the sweep, or per group at the
  group's first column, then round a column to codes);
- its bits accounting and how it packs records into a packed weight tensor.

Every step downstream (reconstruction, GPTQ, the evaluation mode, packing) goes through these
methods, so a new format is one file implementing them.
"""

from __future__ import annotations

import abc
import dataclasses

import torch
from torch import Tensor

# the names live in serq_ao.options, which the command line reads without importing torch
from serq_ao.options import FormatName, ScaleMode, WeightScales, enum_value  # noqa: F401


@dataclasses.dataclass(frozen=True, eq=False)
class Quantized:
    """Codes and scales of one 2-D tensor (d_out, columns) on a format's grid.

    ``qdata``: (d_out, Kp / 2) uint8, two 4-bit codes per byte, low nibble first; Kp is
    ``columns`` padded to the grid's group. ``scale``: one per group of ``group_size``
    columns: uint8 E8M0 exponents (MXFP4) or float32 (INT). ``grid`` names the decoder.
    """

    qdata: Tensor
    scale: Tensor
    columns: int
    group_size: int
    grid: str  # "mxfp4" or "int4"

    @property
    def rows(self) -> int:
        return self.qdata.shape[0]

    def dequantize(self) -> Tensor:
        """(d_out, columns) float32, contiguous: the values the codes stand for."""
        if self.grid == "mxfp4":
            from serq_ao.formats.mxfp4 import dequantize_mxfp4

            values = dequantize_mxfp4(self.qdata, self.scale, k=self.columns)
        else:
            from serq_ao.formats.integer import dequantize_int4_groups

            values = dequantize_int4_groups(self.qdata, self.scale, self.columns)
        return values.contiguous()


class QuantFormat(abc.ABC):
    """One format family; see the module doc. Implementations are frozen dataclasses."""

    name: FormatName
    activation_bits: int
    # columns that share one weight scale (the main weight's group along K)
    weight_group_size: int
    label: str  # for tables, e.g. "MXFP4 W4A4"

    @abc.abstractmethod
    def quantize_weight(self, weight: Tensor) -> Quantized:
        """Q_w of a main weight (d_out, K), round to nearest."""

    @abc.abstractmethod
    def quantize_correction(self, correction: Tensor) -> Quantized:
        """Q_w of the correction R (d_out, r), round to nearest."""

    @abc.abstractmethod
    def fake_quantize_activation(self, x: Tensor) -> Tensor:
        """Q_a of the transformed activations (..., K), float32 in and out."""

    # GPTQ: the sweep rounds column by column on this grid.
    @abc.abstractmethod
    def gptq_frozen_scales(self, weight: Tensor) -> Tensor | None:
        """(d_out, n_groups) scales fixed from the whole weight before the sweep, or None
        when each group's scale is taken when the sweep reaches it (:meth:`gptq_group_scale`)."""

    @abc.abstractmethod
    def gptq_group_scale(self, group: Tensor) -> Tensor:
        """(d_out,) scale of one group from its current (error-updated) columns (d_out, g)."""

    @abc.abstractmethod
    def gptq_round(self, column: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """Round one column (d_out,) with its scales (d_out,): (codes int16, values float64)."""

    @abc.abstractmethod
    def gptq_record(self, codes: Tensor, scales: Tensor, columns: int) -> Quantized:
        """The record of GPTQ's codes (d_out, K) and group scales (d_out, n_groups)."""

    @abc.abstractmethod
    def effective_bits(self, d_in: int, rank: int) -> float:
        """Stored bits per original weight of a linear with d_in inputs and rank r, scales included."""

    def to_dict(self) -> dict:
        return {"format": self.name.value}
