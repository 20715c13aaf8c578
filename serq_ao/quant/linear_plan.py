"""One record per quantized linear: everything the steps after the input transforms need.

:func:`serq_ao.quant.pipeline.quantize_model` builds a :class:`LinearPlan` for every linear
once the exact transforms are applied, and hands it to quantization, GPTQ's Hessians,
packing, diagnostics and the report: nothing later rediscovers a linear's state from its
module's attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from serq_ao.formats import QuantFormat
from serq_ao.passes import FoldRecord, LinearGroup


@dataclasses.dataclass(frozen=True, eq=False)
class LinearPlan:
    """A linear's place in the model and how it is quantized.

    - ``group``: the linears that read the same tensor (one statistic, one transform).
    - ``fold``: where the group's scale and order went (None: the method transforms nothing).
    - ``input_scale_inv`` / ``input_perm``: the pre-op that stays at run time (each or both
      None), applied by :func:`serq_ao.kernels.reference.apply_pre_op` on every path.
    - ``rank``: the correction's rank r (0: none); ``quant_format``: the format object.
    - ``rotation``: the block size of the Hadamard rotation that follows the pre-op (0: none).
    """

    name: str
    group: LinearGroup
    fold: FoldRecord | None
    input_scale_inv: torch.Tensor | None
    input_perm: torch.Tensor | None
    rank: int
    quant_format: QuantFormat
    rotation: int = 0

    @property
    def has_pre_op(self) -> bool:
        return self.input_scale_inv is not None or self.input_perm is not None


def linear_plans(groups, folds: dict[str, FoldRecord], rank: int | Mapping[str, int], quant_format: QuantFormat,
                 rotation: int = 0) -> dict[str, LinearPlan]:
    """The plans of every linear of ``groups`` (model order), given the fold records of
    :func:`serq_ao.passes.apply_input_transforms` (groups without a transform have none).
    ``rank``: one for all, or each linear's by name (a linear it does not name gets 0: left
    in floating point, or not measured)."""
    plans = {}
    for group in groups:
        fold = folds.get(group.name)
        scale_inv = None if fold is None else fold.input_scale_inv
        perm = None if fold is None else fold.input_perm
        for name in group.linears:
            linear_rank = rank if isinstance(rank, int) else rank.get(name, 0)
            plans[name] = LinearPlan(name, group, fold, scale_inv, perm, linear_rank, quant_format, rotation)
    return plans
