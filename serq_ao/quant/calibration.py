"""Calibration: collecting the statistics (quant/statistics.py) of a model on calibration ids.

Forward pre-hooks on the first linear of each group see the group's input; any batch size
and sequence length works. Inputs are checked first (quant/input_checks.py).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from serq_ao.passes import ModelPlan
from serq_ao.quant.calibration_input import calibration_windows, check_windows
from serq_ao.quant.input_checks import NonFiniteError, check_finite_weights, check_input_ids
from serq_ao.quant.offload import offloaded_tensor_names
from serq_ao.quant.statistics import CalibrationStats


def check_materialized(model: nn.Module) -> None:
    """Refuse weights on the meta device (a model built without its checkpoint's values)."""
    offloaded = offloaded_tensor_names(model)  # accelerate holds their values
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "meta" and name not in offloaded:
            raise ValueError(f"{name} is on the meta device (no values): load the model's weights before "
                             "quantizing, e.g. without device_map='meta' or init_empty_weights")


class StatisticsObserver:
    """Forward pre-hooks that accumulate max |x| and sum |x| per input channel, per group.
    A non-finite activation raises :class:`NonFiniteError` naming the group where it appeared."""

    def __init__(self):
        self.amax: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        # rows seen per group: every token for most linears, the routed ones for an expert's
        self.count: dict[str, int] = {}
        self.groups: list = []  # the LinearGroups attached, for the fallback of unreached experts
        self.experts: set[str] = set()

    def hook(self, name: str):
        def observe(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).float()  # (tokens, d_in)
            current = x.amax(dim=0).cpu()
            if not torch.isfinite(current).all():
                bad = int((~torch.isfinite(current)).sum())
                raise NonFiniteError(f"calibration produced NaN or inf activations in {bad} input channel(s) of "
                                     f"{name}: check the model's dtype range (fp16 overflows) and its weights")
            self.amax[name] = current if name not in self.amax else torch.maximum(self.amax[name], current)
            total = x.double().sum(dim=0).cpu()
            self.abs_sum[name] = total if name not in self.abs_sum else self.abs_sum[name] + total
            self.count[name] = self.count.get(name, 0) + x.shape[0]

        return observe

    def attach(self, model: nn.Module, plan: ModelPlan) -> list:
        """Hooks on the first linear of every group (it sees the group's input); returns handles."""
        from serq_ao.quant.experts import expert_modules

        self.groups.extend(plan.groups)
        self.experts |= expert_modules(model)
        return [model.get_submodule(g.linears[0]).register_forward_pre_hook(self.hook(g.name)) for g in plan.groups]

    def statistics(self, tokens: int, seconds: float) -> CalibrationStats:
        """What was observed over ``tokens`` tokens; an expert no token reached gets the
        fallback of :func:`~serq_ao.quant.experts.fill_unreached` (kept, so it is named once)."""
        from serq_ao.quant.experts import fill_unreached

        if self.experts:
            fill_unreached(self.groups, self.amax, self.abs_sum, self.count, self.experts)
        abs_mean = {name: (total / self.count.get(name, tokens)).float() for name, total in self.abs_sum.items()}
        return CalibrationStats(self.amax, tokens, seconds, abs_mean)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    plan: ModelPlan,
    batches,
    *,
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> CalibrationStats:
    """Run ``batches`` of input ids (a tensor (n, L), or as
    :mod:`~serq_ao.quant.calibration_input` takes them: then one window at a time) through
    ``model`` and record per-group statistics."""
    if isinstance(batches, torch.Tensor) and batches.dim() == 2:
        check_model_and_ids(model, batches)
    else:
        batches = calibration_windows(batches)
        check_windows(batches, model)
        check_model_and_ids(model, None)
    return collect_statistics(model, plan, batches, batch_size=batch_size, on_batch=on_batch)


def check_model_and_ids(model: nn.Module, ids) -> None:
    """What every entry point that runs a model on calibration ids checks first: real
    (non-meta), finite weights, named before an activation they break; well-formed ids."""
    check_materialized(model)
    check_finite_weights(model)
    if ids is not None:
        check_input_ids(ids, model)


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    plan: ModelPlan,
    batches,
    *,
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> CalibrationStats:
    """:func:`calibrate` without its checks, for callers that made them already: ``batches``
    a tensor (n, L) run ``batch_size`` rows at a time, or windows run one at a time."""
    start = time.perf_counter()
    observer = StatisticsObserver()
    handles = observer.attach(model, plan)
    tokens = 0
    device = next(model.parameters()).device
    try:
        for batch in batches.split(batch_size) if isinstance(batches, torch.Tensor) else batches:
            model(input_ids=batch.to(device), use_cache=False)
            tokens += batch.numel()
            if on_batch is not None:
                on_batch(batch.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return observer.statistics(tokens, time.perf_counter() - start)
