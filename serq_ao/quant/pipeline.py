"""quantize_model: calibrate, transform (exactly, via the passes), reconstruct, quantize.

Every linear inside the decoder layers becomes a :class:`FakeQuantLinear` (the evaluation
mode); lm_head and the embeddings stay in full precision. :func:`quantize_` does the same and
then packs the weights (:mod:`serq_ao.quant.packing`): the deployable model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from serq_ao.integrations.hf_quantizer import attach_quantizer
from serq_ao.passes import (
    InputTransform,
    ModelPlan,
    ResidualOrderError,
    ResidualPlan,
    analyze,
    analyze_residual,
    apply_input_transforms,
    apply_residual_order,
)
from serq_ao.passes.transforms import replace_module
from serq_ao.quant.calibration import CalibrationStats, check_model_and_ids, collect_statistics
from serq_ao.quant.config import SERQConfig
from serq_ao.quant.fake_quant import FakeQuantLinear
from serq_ao.quant.gptq import gptq_quantize
from serq_ao.quant.linear_plan import LinearPlan, linear_plans
from serq_ao.quant.methods import CorrectionKind, ResidualOrder, TransformKind
from serq_ao.quant.packing import is_packed_linear, pack_model
from serq_ao.quant.reconstruct import (
    flattening_scales,
    lowrank_bits,
    lowrank_error_factors,
    residual_after,
    residual_stream_order,
    saliency_order,
    salient_correction,
    serq_reconstruct,
    smoothquant_scales,
)
from serq_ao.quant.sequential import quantize_layers_sequentially, record_layer_calls

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
    # the order SERQ used for norm-fed linears ("global" or "per_group"; "auto" resolved),
    # None for methods without a saliency order
    residual_order: ResidualOrder | None = None
    # each quantized linear's plan (group, folds, pre-op, rank, format), in model order; what
    # diagnostics and packing read instead of rediscovering it. Not part of to_dict.
    plans: dict[str, LinearPlan] = dataclasses.field(default_factory=dict, repr=False)

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
            "residual_order": None if self.residual_order is None else str(self.residual_order),
            "seconds": self.seconds,
            "linears": [dataclasses.asdict(r) for r in self.linears],
        }


def is_quantized(model: nn.Module) -> bool:
    """Does ``model`` hold quantized linears already (evaluation mode or packed)?"""
    return any(isinstance(m, FakeQuantLinear) or is_packed_linear(m) for m in model.modules())


def check_config_for_plan(config: SERQConfig, plan: ModelPlan) -> None:
    """Reject a model with nothing to quantize, and a rank that does not fit some linear,
    before any work starts."""
    if not plan.groups:
        raise ValueError("the model has no nn.Linear to quantize inside its decoder layers "
                         "(already quantized? quantize the float model it came from)")
    narrowest = min(plan.groups, key=lambda g: g.in_features)
    if config.correction_rank > narrowest.in_features:
        raise ValueError(
            f"rank ({config.rank}) must be at most the smallest d_in of the model's linears "
            f"({narrowest.in_features}, {narrowest.name})"
        )


def _transforms(model: nn.Module, plan: ModelPlan, config: SERQConfig, stats: CalibrationStats,
                in_stream_order: set[str]) -> dict[str, InputTransform]:
    """Each group's (s, pi); groups in ``in_stream_order`` already read their input in the
    global residual order, which is their saliency order."""
    kind = config.spec.input_transform
    transforms = {}
    for group in plan.groups:
        if kind is TransformKind.FLATTEN:
            scales = flattening_scales(stats.amax[group.name])
            order = torch.arange(group.in_features) if group.name in in_stream_order else saliency_order(scales)
            transforms[group.name] = InputTransform(scales, order)
        elif kind is TransformKind.SMOOTH:
            weights = [model.get_submodule(n).weight for n in group.linears]
            scales = smoothquant_scales(stats.amax[group.name], weights, config.smoothquant_alpha)
            transforms[group.name] = InputTransform(scales, torch.arange(group.in_features))
    return transforms


def _residual_plan(model: nn.Module, plan: ModelPlan, config: SERQConfig) -> ResidualPlan | None:
    """The residual stream to permute by one saliency order, or None for per-group orders.

    ``auto`` falls back to per-group orders (with a warning) where the passes cannot prove
    the permutation exact; ``global`` raises there."""
    if config.spec.input_transform is not TransformKind.FLATTEN or config.residual_order is ResidualOrder.PER_GROUP:
        return None
    try:
        residual = analyze_residual(model)
        if not any(set(g.linears) <= set(residual.readers) for g in plan.groups):
            raise ResidualOrderError("no quantized linear reads the residual stream through a norm")
        return residual
    except ResidualOrderError as e:
        if config.residual_order is ResidualOrder.GLOBAL:
            raise ResidualOrderError(f"residual_order='global' is not possible for this model ({e}); "
                                     "use residual_order='auto' or 'per_group'") from e
        logger.warning("residual order: per group (the residual stream cannot be permuted exactly: %s)", e)
        return None


def _apply_global_residual_order(model: nn.Module, plan: ModelPlan, stats: CalibrationStats, residual: ResidualPlan):
    """Permute the residual stream by one saliency order (exact, checked on the logits);
    returns the statistics in the new channel order, the groups that read the stream, and
    the order."""
    readers = set(residual.readers)
    stream_groups = [g for g in plan.groups if set(g.linears) <= readers]
    order = residual_stream_order([flattening_scales(stats.amax[g.name]) for g in stream_groups])
    apply_residual_order(model, residual, order)
    names = {g.name for g in stream_groups}
    return stats.permuted(names, order), names, order


def _quantize_linear(
    model: nn.Module,
    linear_plan: LinearPlan,
    config: SERQConfig,
    stats: CalibrationStats | None,
    hessian: torch.Tensor | None = None,
) -> LinearReport:
    """Replace the linear of ``linear_plan`` (already transformed) by its FakeQuantLinear."""
    name, fmt, rank = linear_plan.name, linear_plan.quant_format, linear_plan.rank
    linear = model.get_submodule(name)
    weight = linear.weight.data.float()  # quantization math in fp32 (GPTQ: fp64) whatever the model's dtype
    if hessian is None:
        main, correction = serq_reconstruct(weight, rank, fmt)
    else:  # GPTQ replaces round-to-nearest for the main weight; R is taken out first
        correction = salient_correction(weight, rank, fmt) if rank else None
        main = gptq_quantize(residual_after(weight, correction), hessian, fmt)
    lowrank_a = lowrank_b = None
    bits = fmt.effective_bits(linear.in_features, rank)
    if config.spec.correction is CorrectionKind.LOWRANK:
        input_scale = stats.abs_mean[linear_plan.group.name] if config.spec.lowrank_input_scaled else None
        lowrank_a, lowrank_b = lowrank_error_factors(weight, main.dequantize(), config.lowrank_rank, input_scale)
        bits += lowrank_bits(linear.in_features, linear.out_features, config.lowrank_rank)
    replacement = FakeQuantLinear(
        main,
        correction,
        None if linear.bias is None else linear.bias.data,
        quant_format=fmt,
        model_dtype=linear.weight.dtype,
        input_scale_inv=linear_plan.input_scale_inv,
        input_perm=linear_plan.input_perm,
        lowrank_a=lowrank_a,
        lowrank_b=lowrank_b,
    )
    replace_module(model, name, replacement.to(linear.weight.device))
    return LinearReport(name, linear.in_features, linear.out_features, rank, bits, linear_plan.has_pre_op)


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
    weight is quantized (:mod:`serq_ao.quant.diagnostics` keeps a copy there).
    """
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    if is_quantized(model):
        raise ValueError("model is already quantized: quantize a fresh copy of the float model")
    check_model_and_ids(model, None if isinstance(calibration, CalibrationStats) else calibration)
    plan = plan if plan is not None else analyze(model)
    check_config_for_plan(config, plan)
    report = progress or (lambda stage, done, total: None)
    spec = config.spec
    if (spec.needs_statistics or config.needs_input_ids) and calibration is None:
        raise ValueError(f"method {config.method!r}{' with GPTQ' if config.gptq else ''} needs calibration data")
    if config.needs_input_ids and isinstance(calibration, CalibrationStats):
        raise ValueError("GPTQ needs calibration input ids (it runs the layers), not statistics")

    stats, layer_calls = None, None
    if config.needs_input_ids:
        total = calibration.shape[0]
        counter = iter(range(1, total + 1))
        stats, hidden, calls = record_layer_calls(model, plan, calibration, on_batch=lambda k: report("calibrate", next(counter), total))
        layer_calls = (hidden, calls)
    elif spec.needs_statistics:
        if isinstance(calibration, CalibrationStats):
            stats = calibration
        else:
            total = calibration.shape[0]
            counter = iter(range(1, total + 1))
            stats = collect_statistics(model, plan, calibration,
                                       on_batch=lambda k: report("calibrate", next(counter), total))
    if stats is not None:
        seconds["calibration"] = stats.seconds

    transform_start = time.perf_counter()
    folds, in_stream_order = {}, set()
    residual = _residual_plan(model, plan, config)
    if residual is not None:
        stats, in_stream_order, order = _apply_global_residual_order(model, plan, stats, residual)
        if layer_calls is not None:  # layer 0's recorded inputs are on the stream too
            layer_calls = ([h.index_select(-1, order.to(h.device)) for h in layer_calls[0]], layer_calls[1])
    if spec.transforms_input:
        transforms = _transforms(model, plan, config, stats, in_stream_order)
        folds = apply_input_transforms(model, plan, transforms, fold=True if config.fold_into_linears else ("norm",))
    plans = linear_plans(plan.groups, folds, config.correction_rank, config.quant_format)
    seconds["transform"] = time.perf_counter() - transform_start
    if on_transformed is not None:
        on_transformed(model)

    quantize_start = time.perf_counter()
    linears: list[LinearReport] = []
    if layer_calls is not None:
        quantize_layers_sequentially(
            model,
            plan,
            plans,
            *layer_calls,
            lambda name, hessian: linears.append(_quantize_linear(model, plans[name], config, stats, hessian)),
            on_layer=lambda done, total: report("gptq", done, total),
        )
    else:
        for done, linear_plan in enumerate(plans.values(), 1):
            linears.append(_quantize_linear(model, linear_plan, config, stats))
            report("quantize", done, len(plans))
    seconds["quantize"] = time.perf_counter() - quantize_start
    seconds["total"] = time.perf_counter() - started
    used_order = None
    if spec.input_transform is TransformKind.FLATTEN:
        used_order = ResidualOrder.PER_GROUP if residual is None else ResidualOrder.GLOBAL
    return QuantizationReport(config, linears, stats.tokens if stats is not None else 0, seconds, used_order, plans)


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
    if not config.spec.packs:
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
