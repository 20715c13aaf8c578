"""Apply per-group input transforms (scale s, channel order pi) to a model, exactly.

For a group with input X, the consumers compute with ``X^ = (X / s)[..., pi]`` and weights
``W^ = (W * s)[:, pi]``, so ``X^ W^T == X W^T``. The division and the gather go into the
producer of X when the plan says that is exact (design.md section 3); what cannot be folded
stays a pre-op of the group's linears (:class:`PreOpLinear`).
"""

from __future__ import annotations

import dataclasses
from typing import Collection, Mapping

import torch
from torch import nn

from serq_ao.kernels.reference import apply_pre_op
from serq_ao.passes.plan import (
    ActivationProducer,
    AttentionProducer,
    GatedProducer,
    LinearGroup,
    ModelPlan,
    NormProducer,
    RowRange,
)


PRODUCER_KINDS = ("norm", "gated", "activation", "attention")


@dataclasses.dataclass(frozen=True)
class InputTransform:
    """``scale`` (d_in,) > 0 divides the input; ``perm`` (d_in,) then reorders its channels."""

    scale: torch.Tensor
    perm: torch.Tensor

    def __post_init__(self):
        if self.scale.dim() != 1 or self.perm.shape != self.scale.shape:
            raise ValueError(f"scale and perm must be 1-D of equal length, got {tuple(self.scale.shape)} and {tuple(self.perm.shape)}")
        if not bool((self.scale > 0).all()) or not bool(torch.isfinite(self.scale).all()):
            raise ValueError("scale must be finite and > 0")
        if not torch.equal(torch.sort(self.perm).values, torch.arange(self.perm.numel(), device=self.perm.device)):
            raise ValueError("perm must be a permutation of range(d_in)")

    @staticmethod
    def identity(width: int) -> "InputTransform":
        return InputTransform(torch.ones(width), torch.arange(width))


@dataclasses.dataclass(frozen=True)
class FoldRecord:
    """Where a group's scale and order went: a producer description, or "pre-op"; and what
    stays a run-time pre-op of the group's linears (1/s and the gather, each or both None)."""

    scale: str
    order: str
    input_scale_inv: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)
    input_perm: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)


class PreOpLinear(nn.Linear):
    """nn.Linear whose input is first multiplied by ``input_scale_inv`` and gathered by ``input_perm``.

    Either buffer may be absent. Holds the same weight and bias Parameters as the linear it
    was made from.
    """

    def __init__(self, linear: nn.Linear, scale_inv: torch.Tensor | None, perm: torch.Tensor | None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("input_scale_inv", scale_inv)
        self.register_buffer("input_perm", perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = apply_pre_op(x, self.input_scale_inv, self.input_perm).to(x.dtype)
        return nn.functional.linear(x_hat, self.weight, self.bias)

    @torch.no_grad()
    def as_plain_linear(self) -> nn.Linear:
        """The nn.Linear on the untransformed input that computes the same (up to rounding):
        x_hat_j = x_perm[j] * s_inv_perm[j], so column j of the weight, times s_inv_perm[j],
        goes back to column perm[j]."""
        weight = self.weight.float()  # (N, K)
        if self.input_perm is not None:
            perm = self.input_perm.long()
            scale = 1.0 if self.input_scale_inv is None else self.input_scale_inv.float()[perm]
            plain = torch.empty_like(weight)
            plain[:, perm] = weight * scale
        else:
            plain = weight * self.input_scale_inv.float() if self.input_scale_inv is not None else weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.copy_(plain)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear


_GATHER_EXACT = (torch.float32, torch.bfloat16, torch.float16)  # float64 is rounded to float32 by the pre-op


class OutputGather(nn.Module):
    """Wraps a module: multiplies its output by ``scale_inv``, then reorders the channels
    (last dim) by ``perm``; either may be None."""

    def __init__(self, inner: nn.Module, perm: torch.Tensor | None, scale_inv: torch.Tensor | None = None):
        super().__init__()
        self.inner = inner
        self.register_buffer("perm", perm)
        self.register_buffer("scale_inv", scale_inv)

    def forward(self, *args, **kwargs):
        y = self.inner(*args, **kwargs)
        if self.scale_inv is None and self.perm is not None and y.dtype in _GATHER_EXACT:
            # a gather alone moves values, exactly what apply_pre_op's float32 round trip gives back
            # for these dtypes, in one op instead of four (60 of them in a decode step of the default model)
            return y.index_select(-1, self.perm)
        return apply_pre_op(y, self.scale_inv, self.perm).to(y.dtype)

    def spec(self) -> dict:
        """What a checkpoint needs to rebuild this wrapper before loading its buffers."""
        present = [b for b in ("perm", "scale_inv") if getattr(self, b) is not None]
        return {"width": getattr(self, present[0]).numel(), "buffers": present}

    @classmethod
    def from_spec(cls, inner: nn.Module, spec: dict) -> "OutputGather":
        """An OutputGather around ``inner`` with empty buffers shaped as :meth:`spec` says."""
        width, buffers = spec["width"], set(spec["buffers"])
        perm = torch.empty(width, dtype=torch.long) if "perm" in buffers else None
        return cls(inner, perm, torch.empty(width) if "scale_inv" in buffers else None)


def transform_consumer(linear: nn.Linear, scale: torch.Tensor, perm: torch.Tensor) -> None:
    """In place: ``W <- (W * s)[:, pi]``, the consumer side of an input transform."""
    weight = linear.weight.data
    linear.weight.data = (weight * scale.to(weight)).index_select(1, perm.to(weight.device)).contiguous()


def _is_identity(perm: torch.Tensor) -> bool:
    return torch.equal(perm, torch.arange(perm.numel(), device=perm.device))


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _rows(model: nn.Module, rows: RowRange) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight rows, bias rows) views of a RowRange, to be edited in place."""
    linear = model.get_submodule(rows.linear)
    bias = linear.bias.data[rows.start : rows.stop] if linear.bias is not None else None
    return linear.weight.data[rows.start : rows.stop], bias


def _scale_rows(model: nn.Module, rows: RowRange, divisor: torch.Tensor) -> None:
    weight, bias = _rows(model, rows)
    weight /= divisor.to(weight).unsqueeze(1)
    if bias is not None:
        bias /= divisor.to(bias)


def _permute_rows(model: nn.Module, rows: RowRange, order: torch.Tensor) -> None:
    weight, bias = _rows(model, rows)
    weight.copy_(weight.index_select(0, order.to(weight.device)))
    if bias is not None:
        bias.copy_(bias.index_select(0, order.to(bias.device)))


# A (1 + w) norm folds 1/s as w' = (1 + w) / s - 1; where (1 + w) / s is small, fp32 cannot
# hold w' to the precision of the product it stands for (cancellation against the 1). Below
# this magnitude the scale goes into the norm's output wrapper instead.
OFFSET_FOLD_MIN_MAGNITUDE = 2.0**-6


def _fold_norm(model, producer: NormProducer, t: InputTransform) -> FoldRecord:
    weight = model.get_parameter(producer.weight).data
    offset = producer.weight_offset
    folded = ((weight.double() + offset) / t.scale.double()).to(weight.device)
    scale_in_weight = offset == 0 or bool((folded.abs() >= OFFSET_FOLD_MIN_MAGNITUDE).all())
    if scale_in_weight:
        weight.copy_(folded - offset)
        if producer.bias is not None:
            bias = model.get_parameter(producer.bias).data
            bias /= t.scale.to(bias)
    if _is_identity(t.perm) and scale_in_weight:  # e.g. under a global residual order
        return FoldRecord(producer.weight, "none needed")
    if producer.module is None:
        return FoldRecord(producer.weight if scale_in_weight else "pre-op", "pre-op")
    wrapper_scale_inv = None if scale_in_weight else 1.0 / t.scale.to(weight)
    perm = None if _is_identity(t.perm) else t.perm.clone()
    inner = model.get_submodule(producer.module)
    replace_module(model, producer.module, OutputGather(inner, perm, wrapper_scale_inv))
    where = producer.weight if scale_in_weight else f"output of {producer.module}"
    return FoldRecord(where, f"gather after {producer.module}" if perm is not None else "none needed")


def _fold_attention(model, producer: AttentionProducer, t: InputTransform) -> FoldRecord:
    if not producer.one_to_one:
        return FoldRecord("pre-op", "pre-op")
    start = producer.value.start
    row_of = torch.tensor(producer.value_row_of_channel) - start  # channel -> row within the range
    divisor = torch.empty_like(t.scale)
    divisor[row_of] = t.scale  # row row_of[c] carries channel c
    _scale_rows(model, producer.value, divisor)
    head = row_of // producer.head_dim
    if not torch.equal(head[t.perm], head):
        return FoldRecord(producer.value.linear, "pre-op")
    # channel c must now carry old channel perm[c]: row row_of[c] <- old row row_of[perm[c]]
    order = torch.empty_like(row_of)
    order[row_of] = row_of[t.perm]
    _permute_rows(model, producer.value, order)
    return FoldRecord(producer.value.linear, f"{producer.value.linear} rows (within heads)")


def _fold(model: nn.Module, group: LinearGroup, t: InputTransform) -> FoldRecord:
    producer = group.producer
    if isinstance(producer, NormProducer):
        return _fold_norm(model, producer, t)
    if isinstance(producer, GatedProducer):
        _scale_rows(model, producer.up, t.scale)
        _permute_rows(model, producer.up, t.perm)
        _permute_rows(model, producer.gate, t.perm)
        return FoldRecord(str(producer.up), f"{producer.gate} and {producer.up} rows")
    if isinstance(producer, ActivationProducer):
        _scale_rows(model, producer.source, t.scale)
        _permute_rows(model, producer.source, t.perm)
        return FoldRecord(str(producer.source), f"{producer.source} rows")
    if isinstance(producer, AttentionProducer):
        return _fold_attention(model, producer, t)
    return FoldRecord("pre-op", "pre-op")


@torch.no_grad()
def apply_input_transforms(
    model: nn.Module,
    plan: ModelPlan,
    transforms: Mapping[str, InputTransform],
    *,
    fold: bool | Collection[str] = True,
) -> dict[str, FoldRecord]:
    """Apply ``transforms`` (keyed by ``LinearGroup.name``) to ``model`` in place.

    ``fold``: True folds wherever the plan allows; False folds nothing, every group keeps its
    transform as a pre-op (the path unknown producers always take); a collection of producer
    kinds ("norm", "gated", "activation", "attention") folds only into those. Returns where
    each group's scale and order went.
    """
    if fold is True or fold is False:
        fold_kinds = set(PRODUCER_KINDS) if fold else set()
    else:
        fold_kinds = set(fold)
        if not fold_kinds <= set(PRODUCER_KINDS):
            raise ValueError(f"fold must be a bool or a collection of {PRODUCER_KINDS}, got {sorted(fold_kinds)}")
    unknown = set(transforms) - {g.name for g in plan.groups}
    if unknown:
        raise KeyError(f"transforms name groups that are not in the plan: {sorted(unknown)[:3]}")
    records = {}
    for group in plan.groups:
        t = transforms.get(group.name)
        if t is None:
            continue
        if t.scale.numel() != group.in_features:
            raise ValueError(f"transform of {group.name} has {t.scale.numel()} channels, expected {group.in_features}")
        record = _fold(model, group, t) if group.producer.kind in fold_kinds else FoldRecord("pre-op", "pre-op")
        if record.scale == "pre-op" and record.order != "pre-op":
            raise AssertionError(f"{group.name}: an order cannot be folded without its scale")
        scale_inv = (1.0 / t.scale) if record.scale == "pre-op" else None
        perm = t.perm.clone() if record.order == "pre-op" and not _is_identity(t.perm) else None
        for name in group.linears:
            linear = model.get_submodule(name)
            transform_consumer(linear, t.scale, t.perm)
            if scale_inv is not None or perm is not None:
                replace_module(model, name, PreOpLinear(linear, scale_inv, perm))
        records[group.name] = dataclasses.replace(record, input_scale_inv=scale_inv, input_perm=perm)
    return records
