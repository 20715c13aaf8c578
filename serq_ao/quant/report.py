"""What a quantization run reports: per linear (rank, bits, whether a pre-op stays) and for the
model (config, calibration tokens, time per stage, effective bits); ``to_dict`` is what
``serq quantize`` writes to ``serq_report.json``."""

from __future__ import annotations

import dataclasses
import math

from serq_ao.quant.statistics import CalibrationStats
from serq_ao.quant.config import SERQConfig
from serq_ao.quant.linear_plan import LinearPlan
from serq_ao.quant.methods import ResidualOrder


@dataclasses.dataclass(frozen=True)
class LinearReport:
    name: str
    in_features: int
    out_features: int
    rank: int
    bits: float  # effective storage bits per original weight
    pre_op: bool  # does the linear still transform its input at run time?


@dataclasses.dataclass
class QuantizationReport:
    config: SERQConfig
    linears: list[LinearReport]
    calibration_tokens: int
    seconds: dict[str, float]
    # the order SERQ used for norm-fed linears ("global" or "per_group"; "auto" resolved),
    # None for methods without a saliency order
    residual_order: ResidualOrder | None = None
    # each quantized linear's plan (group, folds, pre-op, rank, format), in model order; what
    # diagnostics and packing read instead of rediscovering it. Not part of to_dict.
    plans: dict[str, LinearPlan] = dataclasses.field(default_factory=dict, repr=False)
    # the calibration statistics used (or collected for diagnostics); not part of to_dict
    statistics: CalibrationStats | None = dataclasses.field(default=None, repr=False)
    # ||Y_q - Y|| / ||Y|| per linear on the first error windows (error_windows > 0), and
    # how many tokens those were
    output_errors: dict[str, float] = dataclasses.field(default_factory=dict, repr=False)
    error_tokens: int = 0
    # bytes of the decoder layers' weight matrices left in floating point that no ``ignore``
    # named (MoE routers, experts of a layout serq does not unfuse), by name with the layer
    # index as "*"
    unquantized: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def effective_bits(self) -> float:
        """Bits per weight over all quantized linears, weighted by their sizes (NaN where
        ``ignore`` left none quantized)."""
        weights = [r.in_features * r.out_features for r in self.linears]
        return sum(r.bits * w for r, w in zip(self.linears, weights)) / sum(weights) if weights else math.nan

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "effective_bits": None if math.isnan(self.effective_bits) else self.effective_bits,
            "calibration_tokens": self.calibration_tokens,
            "residual_order": None if self.residual_order is None else str(self.residual_order),
            "seconds": self.seconds,
            "linears": [dataclasses.asdict(r) for r in self.linears],
            "unquantized_bytes": dict(self.unquantized),
        }
