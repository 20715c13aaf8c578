"""Calibration statistics: per linear group, max |x| and mean |x| of every input channel.

Forward pre-hooks on the first linear of each group see the group's input; any batch size
and sequence length works. The statistics are a small object that saves and loads.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from serq_ao.passes import ModelPlan


@dataclasses.dataclass
class CalibrationStats:
    """Per group name, (d_in,) float32 over ``tokens`` tokens: ``amax`` max |x| per input
    channel (SERQ, SmoothQuant), ``abs_mean`` mean |x| (L2QER)."""

    amax: dict[str, torch.Tensor]
    tokens: int
    seconds: float = 0.0
    abs_mean: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def scales(self, group: str) -> torch.Tensor:
        """Flattening scales s = max |x|; a channel that was zero on every token gets 1."""
        amax = self.amax[group]
        return torch.where(amax > 0, amax, torch.ones_like(amax))

    def permuted(self, groups: set[str], order: torch.Tensor) -> "CalibrationStats":
        """The statistics after the input channels of ``groups`` are reordered by ``order``
        (new channel c is old channel order[c]), as a global residual order does."""
        def reorder(table):
            return {g: (v.index_select(0, order.to(v.device)) if g in groups else v) for g, v in table.items()}

        return CalibrationStats(reorder(self.amax), self.tokens, self.seconds, reorder(self.abs_mean))

    def save(self, path: str | Path) -> None:
        torch.save({"amax": self.amax, "abs_mean": self.abs_mean, "tokens": self.tokens, "seconds": self.seconds}, path)

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationStats":
        data = torch.load(path, weights_only=True)
        return cls(data["amax"], data["tokens"], data.get("seconds", 0.0), data.get("abs_mean", {}))


class NonFiniteError(ValueError):
    """NaN or inf where quantization needs finite numbers (weights, calibration activations)."""


def check_finite_weights(model: nn.Module, prefix: str = "") -> None:
    """Refuse a model with a NaN or inf in any floating-point parameter or buffer, naming it
    (``prefix`` + its name): quantizing it would give NaN codes or scales without a word."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_floating_point() and tensor.device.type != "meta":
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    raise NonFiniteError(f"{kind} {prefix}{name} has {bad} NaN or inf value(s) of {tensor.numel()}: "
                                         "a model with non-finite weights cannot be quantized")


def positions_error(model, what: str, positions: int) -> str | None:
    """Why sequences of ``positions`` tokens do not fit ``model`` (or a model config), or None.
    The one rule the library's calibration checks and the CLI's options share: a model has
    position embeddings (or RoPE tables trained) for ``max_position_embeddings`` positions;
    past them it still runs, but on positions it never saw, and its statistics mean nothing."""
    limit = getattr(getattr(model, "config", model), "max_position_embeddings", None)
    if isinstance(limit, int) and positions > limit:
        return (f"{what} needs {positions} positions per sequence, the model has "
                f"max_position_embeddings {limit}")
    return None


def check_input_ids(ids, model: nn.Module, option: str = "calibration") -> None:
    """Calibration input ids must be an integer tensor (n, L), n, L >= 1, of token ids the
    vocabulary of ``model`` (or of a model config) has, L within its positions; anything else
    is an error naming ``option``."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{option} must be a tensor of input ids (n, L), got {type(ids).__name__}")
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"{option} must be input ids of shape (n, L) with n, L >= 1, got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{option} must hold integer token ids, got dtype {ids.dtype}")
    vocab = getattr(getattr(model, "config", model), "vocab_size", None)  # a model, or a model config
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(f"{option} holds token ids in [{low}, {high}], outside the model's vocabulary "
                         f"[0, {vocab if vocab is not None else '?'})")
    too_long = positions_error(model, option, ids.shape[1])
    if too_long:
        raise ValueError(too_long)


def check_materialized(model: nn.Module) -> None:
    """Refuse weights on the meta device (a model built without its checkpoint's values)."""
    from serq_ao.quant.offload import offloaded_tensor_names  # offload imports this module

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
    from serq_ao.quant.calibration_input import calibration_windows, check_windows

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
