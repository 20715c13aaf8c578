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
from serq_ao.passes.trace import find_decoder_layers
from serq_ao.passes.transforms import PreOpLinear, replace_module
from serq_ao.quant.activations import ActivationCache
from serq_ao.quant.calibration import check_model_and_ids
from serq_ao.quant.statistics import CalibrationStats
from serq_ao.quant.calibration_input import as_windows, prepare_calibration, window_tokens
from serq_ao.quant.calibration import collect_statistics as collect_model_statistics
from serq_ao.quant.config import SERQConfig, matches_pattern
from serq_ao.quant.experts import fused_experts, unfuse_experts
from serq_ao.quant.lm_head import prepare_head, quantize_head
from serq_ao.quant.fake_quant import FakeQuantLinear
from serq_ao.quant.gptq import gptq_quantize
from serq_ao.quant.linear_plan import LinearPlan, linear_plans
from serq_ao.quant.methods import CorrectionKind, RankAllocation, ResidualOrder, TransformKind
from serq_ao.options import EmbeddingFormat
from serq_ao.quant.embeddings import quantize_embeddings
from serq_ao.quant.packing import is_packed_linear, pack_model
from serq_ao.quant.rank_allocation import allocate_ranks, measure_rank_curves
from serq_ao.formats.hadamard import rotate_hessian, rotate_weight
from serq_ao.quant.report import LinearReport, QuantizationReport
from serq_ao.quant.reconstruct import (
    flattening_scales,
    lowrank_bits,
    lowrank_error_factors,
    residual_after,
    residual_stream_order,
    salient_order,
    salient_correction,
    serq_reconstruct,
    smoothquant_scales,
)
from serq_ao.quant.layerwise import LayerWeights, quantize_layerwise, relative_error
from serq_ao.quant.offload import AcceleratedWeights, execution_device, is_dispatched

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def is_quantized(model: nn.Module) -> bool:
    """Does ``model`` hold quantized linears already (evaluation mode or packed)?"""
    return any(isinstance(m, FakeQuantLinear) or is_packed_linear(m) for m in model.modules())


class ConfigMismatchError(ValueError):
    """The config does not fit the model (a rank wider than a linear, nothing to quantize)."""


def check_config_for_plan(config: SERQConfig, plan: ModelPlan) -> None:
    """Reject a model with nothing to quantize, and a rank that does not fit some linear,
    before any work starts."""
    if not plan.groups:
        raise ConfigMismatchError("the model has no nn.Linear to quantize inside its decoder layers "
                         "(already quantized? quantize the float model it came from)")
    narrowest = min(plan.groups, key=lambda g: g.in_features)
    if config.correction_rank > narrowest.in_features:
        raise ConfigMismatchError(
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
            amax = stats.amax[group.name]
            scales = flattening_scales(amax, config.flattening_strength)
            order = (torch.arange(group.in_features) if group.name in in_stream_order
                     else salient_order(amax, config.saliency_block))
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


def _whole_model_statistics(model: nn.Module, plan: ModelPlan, head, ids, report: Progress) -> CalibrationStats:
    """Calibration statistics of every group (and the head's, if it is quantized) from whole
    forwards of the float model: what the global order and the rank allocation need before
    the first layer is quantized. Bitwise those the layerwise pass would collect."""
    total = len(ids)
    counter = iter(range(1, total + 1))
    groups = plan.groups + (() if head is None else (head.group(model),))
    return collect_model_statistics(model, ModelPlan(plan.layers, groups), ids,
                                    on_batch=lambda k: report("calibrate", next(counter), total))


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
    # quantization math in fp32 (GPTQ: fp64) whatever the model's dtype; the rotation in fp64
    weight = rotate_weight(linear.weight.data.float(), linear_plan.rotation)
    if hessian is None:
        main, correction = serq_reconstruct(weight, rank, fmt)
    else:  # GPTQ replaces round-to-nearest for the main weight; R is taken out first
        correction = salient_correction(weight, rank, fmt) if rank else None
        main = gptq_quantize(residual_after(weight, correction), rotate_hessian(hessian, linear_plan.rotation), fmt,
                             order=config.gptq_order)
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
        rotation=linear_plan.rotation,
    )
    replace_module(model, name, replacement.to(linear.weight.device))
    return LinearReport(name, linear.in_features, linear.out_features, rank, bits, linear_plan.has_pre_op)


def _layer_matrices(model: nn.Module) -> list[tuple[str, str, int]]:
    """(owning module, parameter name with the layer index as ``*``, bytes) of every floating
    weight matrix inside the decoder layers (norms and biases are vectors: not listed). Meta
    tensors count too: their dtype and shape are known."""
    layers_name, layers = find_decoder_layers(model)
    matrices = []
    for index, layer in enumerate(layers):
        for name, param in layer.named_parameters():
            if param.dim() >= 2 and param.is_floating_point():
                module = f"{layers_name}.{index}.{name.rpartition('.')[0]}"
                matrices.append((module, f"{layers_name}.*.{name}", param.numel() * param.element_size()))
    return matrices


def _unfuse_experts(model: nn.Module, *, dispatched: bool) -> None:
    """Fused MoE experts become one nn.Linear per projection (:mod:`serq_ao.quant.experts`),
    except in a model accelerate placed, whose offloaded values live in its hooks."""
    if not dispatched:
        unfuse_experts(model)
    elif fused_experts(model):
        logger.warning("MoE experts stay in float under an accelerate device map (their weights are held by its "
                       "hooks): quantize the model in memory or stream it from its checkpoint to quantize them")


def _keep_in_float(model: nn.Module, name: str) -> None:
    """An ignored linear stays a plain nn.Linear: on the input its (transformed) producer gives
    it, with a run-time pre-op undone into its weight."""
    module = model.get_submodule(name)
    if isinstance(module, PreOpLinear):
        replace_module(model, name, module.as_plain_linear())


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: SERQConfig,
    calibration,
    *,
    plan: ModelPlan | None = None,
    progress: Progress | None = None,
    device: torch.device | str | None = None,
    activations: ActivationCache | None = None,
    error_windows: int = 0,
    collect_statistics: bool = False,
) -> QuantizationReport:
    """Quantize ``model`` in place per ``config``, one decoder layer at a time
    (:mod:`serq_ao.quant.layerwise`).

    ``calibration``: input ids to calibrate on (a tensor (n, L), a list of tensors, or batches:
    see :mod:`serq_ao.quant.calibration_input`), or statistics from :func:`calibrate` on this
    same, untransformed model. RTN needs none (pass None); GPTQ needs input ids.
    ``device``: where each layer computes (default: where it is); the model's layers may
    live on the CPU and visit a GPU one at a time. ``activations``: the budget and spill
    folder of the cached calibration activations (default: CPU up to a quarter of memory).
    ``error_windows``: measure each linear's output error on the first windows of
    ``calibration`` (diagnostics; needs input ids). ``collect_statistics``: record the
    calibration statistics in the report even where the method needs none (diagnostics).
    """
    if is_quantized(model):
        raise ValueError("model is already quantized: quantize a fresh copy of the float model")
    calibration = prepare_calibration(calibration, model)
    check_model_and_ids(model, None)
    return run_quantization(model, config, calibration, plan=plan, progress=progress, device=device,
                            activations=activations, error_windows=error_windows,
                            collect_statistics=collect_statistics)


def run_quantization(
    model: nn.Module,
    config: SERQConfig,
    calibration,
    *,
    plan: ModelPlan | None = None,
    progress: Progress | None = None,
    device: torch.device | str | None = None,
    activations: ActivationCache | None = None,
    error_windows: int = 0,
    collect_statistics: bool = False,
    weights: LayerWeights | None = None,
    on_layer_done: Callable[[int, nn.Module, dict[str, LinearPlan]], None] | None = None,
    resume=None,
    on_checkpoint=None,
    transform_only: bool = False,
    planned: dict[str, LinearPlan] | None = None,
    planned_statistics: CalibrationStats | None = None,
) -> QuantizationReport:
    """:func:`quantize_model` without its checks of the whole model, for callers whose layers
    are not all in memory: ``weights`` brings each layer in for its turn (and checks it),
    ``on_layer_done(index, layer, plans)`` takes it once quantized (:mod:`serq_ao.streaming`);
    ``resume`` / ``on_checkpoint`` as in :func:`~serq_ao.quant.layerwise.quantize_layerwise`.
    ``planned`` / ``planned_statistics``: a model :func:`transform_model` transformed already,
    its linears' plans (with their ranks) and statistics; only quantization is left to do."""
    if config.rank_allocation is not RankAllocation.UNIFORM and not transform_only and planned is None:
        if weights is not None or is_dispatched(model):
            raise ValueError(f"rank_allocation={config.rank_allocation.value!r} measures every linear before any is "
                             "quantized, so it needs the whole model in memory; use rank_allocation='uniform' when "
                             "streaming layers (serq quantize --in-memory loads the whole model) or with an "
                             "accelerate device map")
        return _quantize_with_allocated_ranks(model, config, calibration, plan=plan, progress=progress, device=device,
                                              activations=activations, error_windows=error_windows,
                                              collect_statistics=collect_statistics)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    report = progress or (lambda stage, done, total: None)
    spec = config.spec
    calibration = as_windows(calibration)
    ids = None if isinstance(calibration, CalibrationStats) else calibration  # windows, each (1, L)
    stats = calibration if isinstance(calibration, CalibrationStats) else None
    if (spec.needs_statistics or config.needs_input_ids) and calibration is None:
        raise ValueError(f"method {config.method!r}{' with GPTQ' if config.gptq else ''} needs calibration data")
    if config.needs_input_ids and ids is None:
        who = "GPTQ" if config.gptq else f"rank_allocation={config.rank_allocation.value!r}"
        raise ValueError(f"{who} needs calibration input ids (it runs the layers), not statistics")
    if error_windows and (ids is None or not 0 <= error_windows <= len(ids)):
        raise ValueError(f"error_windows must be in [0, {0 if ids is None else len(ids)}] (the calibration "
                         f"windows, given as input ids), got {error_windows}")
    if plan is not None:
        check_config_for_plan(config, plan)
    device = None if device is None else torch.device(device)
    _unfuse_experts(model, dispatched=weights is None and is_dispatched(model))
    if weights is None and is_dispatched(model):
        layers_name, layers = find_decoder_layers(model)
        weights = AcceleratedWeights(model, layers_name)
        device = device or execution_device(layers[0])
        if spec.input_transform is TransformKind.FLATTEN and config.residual_order is ResidualOrder.AUTO:
            logger.warning("residual order: per group (the layers of a model placed by accelerate are quantized one "
                           "at a time, so they cannot share one order)")

    if config.embeddings is not EmbeddingFormat.FLOAT and isinstance(weights, AcceleratedWeights):
        raise ValueError(f"embeddings={config.embeddings.value!r} is not supported for a model placed by accelerate "
                         "with a device map (its table may live in accelerate's hooks): use embeddings='float'")
    head = None
    if config.quantize_lm_head:  # the head untied
        head = prepare_head(model, find_decoder_layers(model)[1],
                            dispatched=isinstance(weights, AcceleratedWeights))
    in_stream_order: set[str] = set()
    residual = None
    if planned is not None:  # transformed already (the rank allocation's first pass)
        stats = planned_statistics
    elif weights is None:
        plan_for_order = plan
        if spec.input_transform is TransformKind.FLATTEN and config.residual_order is not ResidualOrder.PER_GROUP:
            plan_for_order = plan if plan is not None else analyze(model)
            check_config_for_plan(config, plan_for_order)
            residual = _residual_plan(model, plan_for_order, config)
        if residual is not None:  # one order for the whole stream needs every statistic first
            if stats is None:
                stats = _whole_model_statistics(model, plan_for_order, head, ids, report)
            seconds["calibration"] = stats.seconds
            stats, in_stream_order, order = _apply_global_residual_order(model, plan_for_order, stats, residual)
            if head is not None:  # the head reads the final norm, in the stream's new order too
                stats = stats.permuted({head.group(model).name}, order)
            plan = plan_for_order
    elif spec.input_transform is TransformKind.FLATTEN and config.residual_order is ResidualOrder.GLOBAL:
        raise ResidualOrderError("residual_order='global' permutes every layer at once, so it needs the whole model "
                                 "in memory; use residual_order='per_group' (the default) when streaming layers "
                                 "or with an accelerate device map")

    def transform_layer(layer_plan: ModelPlan, layer_stats: CalibrationStats | None) -> dict[str, LinearPlan]:
        folds = {}
        if spec.transforms_input and planned is None:
            transforms = _transforms(model, layer_plan, config, layer_stats, in_stream_order)
            folds = apply_input_transforms(model, layer_plan, transforms,
                                           fold=True if config.fold_into_linears else ("norm",))
        if planned is not None:
            return {name: planned[name] for group in layer_plan.groups for name in group.linears}
        return linear_plans(layer_plan.groups, folds, config.correction_rank, config.quant_format, config.rotation)

    def quantize_linear(linear_plan: LinearPlan, hessian, layer_stats) -> LinearReport | None:
        if transform_only:
            return None
        if config.ignores(linear_plan.name):
            _keep_in_float(model, linear_plan.name)
            return None
        return _quantize_linear(model, linear_plan, config, layer_stats, hessian)

    def check_groups(groups) -> None:
        check_config_for_plan(config, ModelPlan("", groups))

    # every weight matrix of the decoder layers, read before any layer changes (or is streamed
    # away): what no plan quantized is reported at the end, a resumed run included
    layer_matrices = _layer_matrices(model)
    final_stage = None
    if head is not None:
        layers_name = find_decoder_layers(model)[0]
        tokens = 0 if ids is None else window_tokens(ids)

        def final_stage(floats, quantized, observer, statistics):
            return quantize_head(model, head, layers_name=layers_name, floats=floats, quantized=quantized,
                                 observer=observer, statistics=statistics, tokens=tokens,
                                 transform_layer=transform_layer, quantize_linear=quantize_linear)

    layers_start = time.perf_counter()
    result = quantize_layerwise(
        model,
        windows=ids,
        plan=plan,
        statistics=stats,
        collect_statistics=stats is None and ids is not None and (spec.needs_statistics or error_windows > 0
                                                                  or collect_statistics),
        transform_layer=transform_layer,
        quantize_linear=quantize_linear,
        gptq=config.gptq and not transform_only,
        check_groups=check_groups,
        weights=weights,
        device=device,
        cache=activations,
        error_windows=error_windows,
        on_layer_done=on_layer_done,
        resume=resume,
        on_checkpoint=on_checkpoint,
        progress=report,
        final_stage=final_stage,
    )
    for stage, spent in result.seconds.items():  # calibration, transform, quantize, output_error
        seconds[stage] = seconds.get(stage, 0.0) + spent
    seconds["layers"] = time.perf_counter() - layers_start
    seconds["total"] = time.perf_counter() - started
    used_order = None
    if spec.input_transform is TransformKind.FLATTEN:
        used_order = ResidualOrder.PER_GROUP if residual is None else ResidualOrder.GLOBAL
    stats = result.statistics if result.statistics is not None else stats
    errors = {name: relative_error(*sums) for name, sums in result.output_errors.items() if not config.ignores(name)}
    error_tokens = 0 if ids is None else window_tokens(ids[:error_windows])
    linears = [r for r in result.linears if r is not None]
    plans = result.plans if transform_only else {n: p for n, p in result.plans.items() if not config.ignores(n)}
    unquantized: dict[str, int] = {}  # name (layer index as *) -> bytes
    for module, key, size in layer_matrices:
        if module not in result.plans and not config.ignores(module) and not transform_only:
            unquantized[key] = unquantized.get(key, 0) + size
    if unquantized:
        logger.warning("not quantized, kept in the model's dtype (serq-ao quantizes nn.Linear modules and gated, "
                       "bias-free MoE experts): %s",
                       ", ".join(f"{name} ({size / 2**20:.1f} MiB)" for name, size in unquantized.items()))
    if not transform_only:  # last: the table as every transform left it
        quantize_embeddings(model, config.embeddings)
    unused = [p for p in config.ignore if not any(matches_pattern(p, n) for n in result.plans)]
    if unused:
        logger.warning("ignore: %s matched none of the quantizable linears (e.g. %s)", ", ".join(map(repr, unused)),
                       next(iter(result.plans), "none"))
    return QuantizationReport(config, linears, stats.tokens if stats is not None else 0, seconds, used_order,
                              plans, stats, errors, error_tokens, unquantized)


def _quantize_with_allocated_ranks(model: nn.Module, config: SERQConfig, calibration, *, plan, progress, device,
                                   activations, error_windows, collect_statistics) -> QuantizationReport:
    """``rank_allocation="error"`` (:mod:`serq_ao.quant.rank_allocation`) in three steps: the
    exact transforms of the whole model (statistics and, if asked, the global order included);
    every linear's error curve on the transformed model; quantization with the allocated ranks."""
    ids = as_windows(calibration)
    if ids is None or isinstance(ids, CalibrationStats):
        raise ValueError(f"rank_allocation={config.rank_allocation.value!r} needs calibration input ids (it runs the "
                         "layers), not statistics")
    started = time.perf_counter()
    transformed = run_quantization(model, config, ids, plan=plan, progress=progress, device=device,
                                   activations=activations, transform_only=True)
    clock = time.perf_counter()
    curves = measure_rank_curves(model, transformed.plans, ids, rank=config.rank,
                                 quantized=lambda name: not config.ignores(name), cache=activations, progress=progress)
    ranks = allocate_ranks(curves, config.quant_format, config.rank)
    by_kind: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(rank)
    logger.info("rank allocation (mean rank by linear kind): %s",
                ", ".join(f"{kind} {sum(r) / len(r):.0f}" for kind, r in by_kind.items()))
    allocation_seconds = time.perf_counter() - clock
    plans = {name: dataclasses.replace(p, rank=ranks.get(name, 0)) for name, p in transformed.plans.items()}
    layers_name = find_decoder_layers(model)[0]
    groups = tuple({id(p.group): p.group for p in plans.values()}.values())
    report = run_quantization(model, config, ids, plan=ModelPlan(layers_name, groups), progress=progress,
                              device=device, activations=activations, error_windows=error_windows,
                              collect_statistics=collect_statistics, planned=plans,
                              planned_statistics=transformed.statistics)
    seconds = {stage: transformed.seconds.get(stage, 0.0) + report.seconds.get(stage, 0.0)
               for stage in {*transformed.seconds, *report.seconds}}
    seconds["rank_allocation"] = allocation_seconds
    seconds["total"] = time.perf_counter() - started
    return dataclasses.replace(report, seconds=seconds, residual_order=transformed.residual_order)


@torch.no_grad()
def transform_model(
    model: nn.Module,
    config: SERQConfig,
    calibration,
    *,
    plan: ModelPlan | None = None,
) -> dict[str, LinearPlan]:
    """Apply ``config``'s exact transforms (global residual order, flattening scales, orders,
    folds) to ``model`` in place without quantizing anything; returns each linear's plan. The
    model's outputs do not change (up to float rounding): the passes' proof, and a way to
    look at what the quantizer sees."""
    calibration = prepare_calibration(calibration, model)
    check_model_and_ids(model, None)
    return run_quantization(model, config, calibration, plan=plan, transform_only=True).plans


def quantize_(
    model: nn.Module,
    config: SERQConfig,
    calibration=None,
    *,
    plan: ModelPlan | None = None,
    progress: Progress | None = None,
    device: torch.device | str | None = None,
    activations: ActivationCache | None = None,
    error_windows: int = 0,
    collect_statistics: bool = False,
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
    report = quantize_model(model, config, calibration, plan=plan, progress=progress, device=device,
                            activations=activations, error_windows=error_windows,
                            collect_statistics=collect_statistics)
    pack_model(model)
    model.serq_config = config
    if isinstance(model, PreTrainedModel):
        attach_quantizer(model, config)  # so that save_pretrained writes the packed format
    return report
