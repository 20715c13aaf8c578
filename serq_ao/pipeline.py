"""quantize_model: calibrate, transform (exactly, via the passes), reconstruct, quantize.

Every linear inside the decoder layers becomes a :class:`FakeQuantLinear` (the evaluation
mode); lm_head and the embeddings stay in full precision. :func:`quantize_` does the same and
then packs the weights (:mod:`serq_ao.packing`): the deployable model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from serq_ao.calibration import CalibrationStats, calibrate
from serq_ao.config import LOWRANK_METHODS, SERQConfig
from serq_ao.gptq import gptq_quantize
from serq_ao.hf_quantizer import attach_quantizer
from serq_ao.packing import is_packed_linear, pack_model
from serq_ao.passes import InputTransform, ModelPlan, analyze, apply_input_transforms
from serq_ao.passes.transforms import replace_module
from serq_ao.reconstruct import (
    effective_bits,
    flattening_scales,
    lowrank_bits,
    lowrank_error_factors,
    saliency_order,
    serq_reconstruct,
    smoothquant_scales,
)
from serq_ao.sequential import quantize_layers_sequentially, record_layer_calls
from serq_ao.simulate import FakeQuantLinear, quantize_correction

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


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

    @property
    def effective_bits(self) -> float:
        """Bits per weight over all quantized linears, weighted by their sizes."""
        weights = [r.in_features * r.out_features for r in self.linears]
        return sum(r.bits * w for r, w in zip(self.linears, weights)) / sum(weights)

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "effective_bits": self.effective_bits,
            "calibration_tokens": self.calibration_tokens,
            "seconds": self.seconds,
            "linears": [dataclasses.asdict(r) for r in self.linears],
        }


def check_config_for_plan(config: SERQConfig, plan: ModelPlan) -> None:
    """Reject a rank that does not fit some linear, before any work starts."""
    narrowest = min(plan.groups, key=lambda g: g.in_features)
    if config.correction_rank > narrowest.in_features:
        raise ValueError(
            f"rank ({config.rank}) must be at most the smallest d_in of the model's linears "
            f"({narrowest.in_features}, {narrowest.name})"
        )


def _transforms(model: nn.Module, plan: ModelPlan, config: SERQConfig, stats: CalibrationStats) -> dict[str, InputTransform]:
    transforms = {}
    for group in plan.groups:
        if config.method == "serq":
            scales = flattening_scales(stats.amax[group.name])
            transforms[group.name] = InputTransform(scales, saliency_order(scales))
        elif config.method == "smoothquant":
            weights = [model.get_submodule(n).weight for n in group.linears]
            scales = smoothquant_scales(stats.amax[group.name], weights, config.smoothquant_alpha)
            transforms[group.name] = InputTransform(scales, torch.arange(group.in_features))
    return transforms


def _quantize_linear(
    model: nn.Module,
    name: str,
    config: SERQConfig,
    plan: ModelPlan,
    stats: CalibrationStats | None,
    hessian: torch.Tensor | None = None,
) -> LinearReport:
    """Replace the linear ``name`` (already transformed) by its FakeQuantLinear."""
    linear = model.get_submodule(name)
    weight = linear.weight.data.float()
    rank = config.correction_rank
    if hessian is None:
        main, correction = serq_reconstruct(weight, rank, config.format, config.scale_mode)
    else:  # GPTQ replaces round-to-nearest for the main weight; R is taken out first
        correction = quantize_correction(weight[:, :rank], config.format, config.scale_mode) if rank else None
        residual = weight.clone()
        if correction is not None:
            residual[:, :rank] -= correction
        main, _ = gptq_quantize(residual, hessian, config.format, scale_mode=config.scale_mode)
    lowrank_a = lowrank_b = None
    bits = effective_bits(config.format, linear.in_features, rank)
    if config.method in LOWRANK_METHODS:
        input_scale = stats.abs_mean[plan.group_of(name).name] if config.method == "l2qer" else None
        lowrank_a, lowrank_b = lowrank_error_factors(weight, main, config.lowrank_rank, input_scale)
        bits += lowrank_bits(linear.in_features, linear.out_features, config.lowrank_rank)
    scale_inv = getattr(linear, "input_scale_inv", None)
    perm = getattr(linear, "input_perm", None)
    replacement = FakeQuantLinear(
        main,
        correction,
        None if linear.bias is None else linear.bias.data,
        fmt=config.format,
        scale_mode=config.scale_mode,
        input_scale_inv=scale_inv,
        input_perm=perm,
        lowrank_a=lowrank_a,
        lowrank_b=lowrank_b,
    )
    replace_module(model, name, replacement)
    return LinearReport(name, linear.in_features, linear.out_features, rank, bits, scale_inv is not None or perm is not None)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: SERQConfig,
    calibration: torch.Tensor | CalibrationStats | None,
    *,
    plan: ModelPlan | None = None,
    progress: Progress | None = None,
    on_transformed: Callable[[nn.Module], None] | None = None,
) -> QuantizationReport:
    """Quantize ``model`` in place per ``config``.

    ``calibration``: input ids (n, L) to calibrate on, or statistics from :func:`calibrate`
    on this same, untransformed model. RTN needs none (pass None); GPTQ needs input ids.
    ``on_transformed(model)`` is called once the exact transforms are applied and before any
    weight is quantized (:mod:`serq_ao.diagnostics` keeps a copy there).
    """
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    if any(isinstance(m, FakeQuantLinear) or is_packed_linear(m) for m in model.modules()):
        raise ValueError("model is already quantized: quantize a fresh copy of the float model")
    plan = plan if plan is not None else analyze(model)
    check_config_for_plan(config, plan)
    report = progress or (lambda stage, done, total: None)
    needs_ids = config.gptq
    if (config.method != "rtn" or needs_ids) and calibration is None:
        raise ValueError(f"method {config.method!r}{' with GPTQ' if needs_ids else ''} needs calibration data")
    if needs_ids and isinstance(calibration, CalibrationStats):
        raise ValueError("GPTQ needs calibration input ids (it runs the layers), not statistics")

    stats, layer_calls = None, None
    if needs_ids:
        total = calibration.shape[0]
        counter = iter(range(1, total + 1))
        stats, hidden, calls = record_layer_calls(model, plan, calibration, on_batch=lambda k: report("calibrate", next(counter), total))
        layer_calls = (hidden, calls)
    elif config.method != "rtn":
        if isinstance(calibration, CalibrationStats):
            stats = calibration
        else:
            total = calibration.shape[0]
            counter = iter(range(1, total + 1))
            stats = calibrate(model, plan, calibration, on_batch=lambda k: report("calibrate", next(counter), total))
    if stats is not None:
        seconds["calibration"] = stats.seconds

    transform_start = time.perf_counter()
    transforms = _transforms(model, plan, config, stats) if stats is not None and config.method in ("serq", "smoothquant") else {}
    if transforms:
        apply_input_transforms(model, plan, transforms, fold=True if config.fold_into_linears else ("norm",))
    seconds["transform"] = time.perf_counter() - transform_start
    if on_transformed is not None:
        on_transformed(model)

    quantize_start = time.perf_counter()
    linears: list[LinearReport] = []
    if layer_calls is not None:
        quantize_layers_sequentially(
            model,
            plan,
            *layer_calls,
            lambda name, hessian: linears.append(_quantize_linear(model, name, config, plan, stats, hessian)),
            on_layer=lambda done, total: report("gptq", done, total),
        )
    else:
        names = [name for group in plan.groups for name in group.linears]
        for done, name in enumerate(names, 1):
            linears.append(_quantize_linear(model, name, config, plan, stats))
            report("quantize", done, len(names))
    seconds["quantize"] = time.perf_counter() - quantize_start
    seconds["total"] = time.perf_counter() - started
    return QuantizationReport(config, linears, stats.tokens if stats is not None else 0, seconds)


def quantize_(
    model: nn.Module,
    config: SERQConfig,
    calibration: torch.Tensor | CalibrationStats | None = None,
    *,
    plan: ModelPlan | None = None,
    progress: Progress | None = None,
    on_transformed: Callable[[nn.Module], None] | None = None,
) -> QuantizationReport:
    """Quantize ``model`` in place and leave packed weights (SERQMXFP4Tensor / SERQIntTensor).

    The numbers are those of :func:`quantize_model`'s evaluation mode; ``calibration`` as
    there. The config is kept as ``model.serq_config``; a transformers model also gets its
    ``quantization_config`` and quantizer, so that ``save_pretrained`` writes the packed format
    and ``from_pretrained`` (with serq_ao imported) loads it.
    """
    if config.method in LOWRANK_METHODS:
        raise ValueError(
            f"method {config.method!r} has no packed format (its INT8 factors need a second "
            "low-rank GEMM): use quantize_model for its evaluation mode"
        )
    report = quantize_model(model, config, calibration, plan=plan, progress=progress, on_transformed=on_transformed)
    pack_model(model)
    model.serq_config = config
    if isinstance(model, PreTrainedModel):
        attach_quantizer(model, config)  # so that save_pretrained writes the packed format
    return report
