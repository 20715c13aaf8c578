"""The model-level plan: analyse each distinct decoder layer once, name groups model-wide."""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from serq_ao.passes.analysis import analyze_layer
from serq_ao.passes.plan import LinearGroup, ModelPlan, Producer, RowRange
from serq_ao.passes.trace import capture_layer_inputs, find_decoder_layers, structure_signature

logger = logging.getLogger(__name__)


def _prefixed(value, prefix: str):
    """Copy of a plan dataclass with every module or parameter name under ``prefix``."""
    if isinstance(value, RowRange):
        return dataclasses.replace(value, linear=prefix + value.linear)
    changes = {}
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        if field.name in ("weight", "bias", "module") and isinstance(item, str):
            changes[field.name] = prefix + item
        elif isinstance(item, RowRange):
            changes[field.name] = _prefixed(item, prefix)
    return dataclasses.replace(value, **changes)


def _prefixed_group(group: LinearGroup, prefix: str) -> LinearGroup:
    producer: Producer = _prefixed(group.producer, prefix)
    return LinearGroup(tuple(prefix + name for name in group.linears), group.in_features, producer)


@torch.no_grad()
def analyze(model: nn.Module, input_ids: torch.Tensor | None = None) -> ModelPlan:
    """Trace ``model``'s decoder layers and return its dataflow plan.

    Layers of one structure (class and parameter shapes) are exported and analysed once.
    """
    layers_name, layers = find_decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, input_ids)
    analysed: dict[tuple, tuple[LinearGroup, ...]] = {}
    groups: list[LinearGroup] = []
    for index, layer in enumerate(layers):
        signature = structure_signature(layer)
        if signature not in analysed:
            logger.info("analysing %s.%d (%s)", layers_name, index, type(layer).__name__)
            analysed[signature] = analyze_layer(layer, inputs[index])
        prefix = f"{layers_name}.{index}."
        groups.extend(_prefixed_group(group, prefix) for group in analysed[signature])
    return ModelPlan(layers_name, tuple(groups))
