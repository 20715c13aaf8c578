"""Per-linear diagnostics of a quantization: how salient the inputs are, how much error is left.

For every quantized linear:

- ``scale_spread``: max / median of its group's channel maxima s_j = max |x_j| (the SERQ
  flattening scales). Large means a few channels dominate, which is what flattening and R fix.
- ``saliency_share``: the share of sum_j s_j held by the top-r channels (r: the correction
  rank; the uniform share would be r / d_in). How much the rank-r correction covers.
- ``output_error``: ||Y_q - Y||_F / ||Y||_F on calibration tokens, where Y is the output of the
  same linear after SERQ's exact transforms but before quantization, and Y_q that of the
  quantized linear, both fed the float model's inputs. Upstream errors do not enter: this is
  the linear's own error.

Per group, ``SaliencyCurve`` keeps the cumulative share of the top-k channels at k = 1, 2, 4,
..., d_in (and r), small enough to store in a quantized folder's report and to plot.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from serq_ao.quant.calibration_input import prepare_calibration
from serq_ao.quant.config import SERQConfig
from serq_ao.passes import ModelPlan
from serq_ao.quant.layerwise import relative_error  # noqa: F401 - re-exported, tests use it here
from serq_ao.quant.pipeline import Progress, quantize_
from serq_ao.quant.report import QuantizationReport

_LAYER = re.compile(r"\.(\d+)\.")


def layer_and_kind(name: str) -> tuple[int | None, str]:
    """("model.layers.3.self_attn.q_proj") -> (3, "self_attn.q_proj")."""
    match = _LAYER.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end():]


@dataclasses.dataclass(frozen=True)
class LinearDiagnostics:
    name: str
    layer: int | None
    kind: str  # the name inside its decoder layer, e.g. "mlp.down_proj"
    in_features: int
    out_features: int
    rank: int
    bits_per_weight: float
    scale_spread: float
    saliency_share: float
    output_error: float | None  # None where no error was measured


@dataclasses.dataclass(frozen=True)
class SaliencyCurve:
    group: str
    layer: int | None
    kind: str  # the kinds of the group's linears, "/"-joined: "self_attn.q_proj/k_proj/v_proj"
    in_features: int
    points: list[tuple[int, float]]  # (k, share of sum s_j in the top-k channels)


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    linears: list[LinearDiagnostics]
    curves: list[SaliencyCurve]
    error_tokens: int  # calibration tokens the output errors were measured on

    def to_dict(self) -> dict:
        return {"linears": [dataclasses.asdict(d) for d in self.linears],
                "curves": [dataclasses.asdict(c) for c in self.curves],
                "error_tokens": self.error_tokens}

    @classmethod
    def from_dict(cls, data: dict) -> "Diagnostics":
        curves = [SaliencyCurve(**{**c, "points": [tuple(p) for p in c["points"]]}) for c in data["curves"]]
        return cls([LinearDiagnostics(**d) for d in data["linears"]], curves, data["error_tokens"])


def _group_kind(linears: tuple[str, ...]) -> str:
    kinds = [layer_and_kind(n)[1] for n in linears]
    prefix = kinds[0].rsplit(".", 1)[0] + "." if "." in kinds[0] else ""
    if all(k.startswith(prefix) for k in kinds):
        return prefix + "/".join(k[len(prefix):] for k in kinds)
    return "/".join(kinds)


def saliency_curve(channel_max: torch.Tensor, rank: int) -> list[tuple[int, float]]:
    """Cumulative share of sum s_j over the top-k channels, at k = 1, 2, 4, ..., d_in and rank."""
    ordered = channel_max.double().sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum()
    width = ordered.numel()
    ks = sorted({min(2**i, width) for i in range(width.bit_length() + 1)} | ({rank} if 0 < rank <= width else set()))
    return [(k, float(cumulative[k - 1])) for k in ks]


def saliency_statistics(channel_max: torch.Tensor, rank: int) -> tuple[float, float]:
    """(scale_spread, saliency_share) of one group's channel maxima; see the module doc."""
    s = channel_max.double().clamp_min(torch.finfo(torch.float32).tiny)
    spread = float(s.max() / s.median())
    share = float(s.sort(descending=True).values[:rank].sum() / s.sum()) if rank else 0.0
    return spread, share


def quantize_with_diagnostics(
    model: nn.Module,
    config: SERQConfig,
    batches,
    *,
    quantize=quantize_,
    error_windows: int = 2,
    plan: ModelPlan | None = None,
    progress: Progress | None = None,
    **options,
) -> tuple[QuantizationReport, Diagnostics]:
    """``quantize(model, config, ...)`` (quantize_ or quantize_model) calibrated on ``batches``
    (input ids as quantize_model takes them), and the diagnostics of every quantized linear.

    The output errors are measured on the first ``error_windows`` of ``batches`` (0: not
    measured), layer by layer as the model is quantized (:mod:`serq_ao.quant.layerwise`).
    """
    batches = prepare_calibration(batches, model)
    if not 0 <= error_windows <= len(batches):
        raise ValueError(f"error_windows must be in [0, {len(batches)}] (the calibration windows), got {error_windows}")
    report = quantize(model, config, batches, plan=plan, progress=progress, error_windows=error_windows,
                      collect_statistics=True, **options)
    return report, diagnostics_of(report)


def diagnostics_of(report: QuantizationReport) -> Diagnostics:
    """The diagnostics of a quantization that recorded its statistics (``collect_statistics``)
    and, where measured, its output errors (``error_windows``)."""
    if report.statistics is None:
        raise ValueError("diagnostics need the calibration statistics: quantize with collect_statistics=True")
    stats, errors = report.statistics, report.output_errors
    linears, curves = [], []
    by_name = {r.name: r for r in report.linears}
    group_statistics: dict[str, tuple[float, float]] = {}
    for name, linear_plan in report.plans.items():
        group, rank = linear_plan.group, linear_plan.rank
        if group.name not in group_statistics:  # one curve per group, at its first linear
            channel_max = stats.amax[group.name]
            group_statistics[group.name] = saliency_statistics(channel_max, rank)
            layer, _ = layer_and_kind(group.linears[0])
            curves.append(SaliencyCurve(group.name, layer, _group_kind(group.linears), group.in_features,
                                        saliency_curve(channel_max, rank)))
        linear = by_name[name]
        linears.append(LinearDiagnostics(
            name, *layer_and_kind(name), linear.in_features, linear.out_features, rank, linear.bits,
            *group_statistics[group.name], errors.get(name),
        ))
    return Diagnostics(linears, curves, report.error_tokens)
