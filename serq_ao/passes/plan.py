"""The dataflow plan: which linears read the same tensor, and what produces that tensor.

Plain frozen dataclasses, so a plan can be printed, compared in tests and turned into JSON.
Every name is a module or parameter name relative to the model the plan was made for (e.g.
``model.layers.3.self_attn.q_proj``).
"""

from __future__ import annotations

import dataclasses
from typing import Union


@dataclasses.dataclass(frozen=True)
class RowRange:
    """Output rows ``[start, stop)`` of a linear: all of them, or one part of a fused linear."""

    linear: str
    start: int
    stop: int

    def __str__(self) -> str:
        return f"{self.linear}[{self.start}:{self.stop}]"


@dataclasses.dataclass(frozen=True)
class NormProducer:
    """An elementwise affine output ``y * (weight + weight_offset) (+ bias)`` of a norm.

    ``weight_offset`` is 1 for Gemma's ``(1 + w)`` RMSNorm, else 0. ``module`` is the module
    whose output is exactly the group's input (so a gather can wrap it), or None when the
    affine result is not a module's output (then the order stays a pre-op).
    """

    weight: str
    bias: str | None
    weight_offset: float
    module: str | None
    kind: str = "norm"


@dataclasses.dataclass(frozen=True)
class GatedProducer:
    """``act(gate) * up``: scales fold into ``up`` rows; an order permutes gate and up rows."""

    gate: RowRange
    up: RowRange
    activation: str
    kind: str = "gated"


@dataclasses.dataclass(frozen=True)
class ActivationProducer:
    """``act(linear)`` with a positively homogeneous act (ReLU): both fold into its rows."""

    source: RowRange
    activation: str
    kind: str = "activation"


@dataclasses.dataclass(frozen=True)
class AttentionProducer:
    """Attention output read by the output projection.

    ``value_row_of_channel[c]`` is the value row whose attention-mixed copy is input channel c
    (measured, see analysis.py). Scales fold into value rows when that map is one-to-one
    (multi-head attention); with grouped-query attention several channels share a row.
    """

    value: RowRange
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_row_of_channel: tuple[int, ...]
    kind: str = "attention"

    @property
    def one_to_one(self) -> bool:
        return len(set(self.value_row_of_channel)) == len(self.value_row_of_channel)


@dataclasses.dataclass(frozen=True)
class UnknownProducer:
    reason: str
    kind: str = "unknown"


Producer = Union[NormProducer, GatedProducer, ActivationProducer, AttentionProducer, UnknownProducer]


@dataclasses.dataclass(frozen=True)
class LinearGroup:
    """Linears that read one tensor, so they share one calibration statistic and transform."""

    linears: tuple[str, ...]
    in_features: int
    producer: Producer

    @property
    def name(self) -> str:
        return self.linears[0] if len(self.linears) == 1 else "{" + ", ".join(self.linears) + "}"


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    layers: str  # name of the ModuleList of decoder layers
    groups: tuple[LinearGroup, ...]

    def group_of(self, linear: str) -> LinearGroup:
        for group in self.groups:
            if linear in group.linears:
                return group
        raise KeyError(f"{linear!r} is in no group of this plan")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def describe(producer: Producer, prefix: str = "") -> str:
    """One line for tables and logs (names shown without ``prefix``)."""

    def short(name: object) -> str:
        text = str(name)
        return text[len(prefix) :] if prefix and text.startswith(prefix) else text

    if isinstance(producer, NormProducer):
        form = "(1 + w)" if producer.weight_offset == 1 else "w"
        bias = " + b" if producer.bias else ""
        return f"norm {short(producer.weight.rsplit('.', 1)[0])}: y * {form}{bias}"
    if isinstance(producer, GatedProducer):
        return f"{producer.activation}({short(producer.gate)}) * {short(producer.up)}"
    if isinstance(producer, ActivationProducer):
        return f"{producer.activation}({short(producer.source)})"
    if isinstance(producer, AttentionProducer):
        layout = "MHA" if producer.one_to_one else "GQA"
        return (
            f"attention over {short(producer.value)} ({layout}: {producer.num_heads} heads, "
            f"{producer.num_kv_heads} kv, head dim {producer.head_dim})"
        )
    return f"unknown: {producer.reason}"


def foldability(producer: Producer) -> str:
    """What the transforms can fold for this producer (the rest stays a pre-op)."""
    if isinstance(producer, NormProducer):
        return "scale + order" if producer.module else "scale"
    if isinstance(producer, (GatedProducer, ActivationProducer)):
        return "scale + order"
    if isinstance(producer, AttentionProducer):
        return "scale (+ within-head order)" if producer.one_to_one else "none (pre-op)"
    return "none (pre-op)"


def plan_table(plan: ModelPlan, layer_limit: int | None = None):
    """A rich Table of the plan (the first ``layer_limit`` layers' groups, if given)."""
    from rich.table import Table

    table = Table(title=f"Dataflow plan: {len(plan.groups)} linear groups in {plan.layers}")
    table.add_column("layer", justify="right")
    table.add_column("linears reading one tensor")
    table.add_column("d_in", justify="right")
    table.add_column("producer")
    table.add_column("folds")
    shown: list[str] = []
    for group in plan.groups:
        layer = _layer_index(group.linears[0], plan.layers)
        if layer not in shown:
            shown.append(layer)
        if layer_limit is not None and len(shown) > layer_limit:
            break
        prefix = f"{plan.layers}.{layer}."
        linears = ", ".join(name[len(prefix) :] if name.startswith(prefix) else name for name in group.linears)
        table.add_row(layer, linears, str(group.in_features), describe(group.producer, prefix), foldability(group.producer))
    return table


def _layer_index(name: str, layers: str) -> str:
    rest = name[len(layers) + 1 :] if name.startswith(layers + ".") else name
    return rest.split(".", 1)[0]
