"""Layer-by-layer quantization with GPTQ: each decoder layer sees the outputs of the layers
before it *as already quantized*, one layer in memory at a time.

1. One full-precision pass over the calibration batches records the statistics (max |x|,
   mean |x|) and what every decoder layer is called with (layer 0's hidden states, and each
   layer's keyword arguments: position embeddings, masks).
2. The input transforms are folded into the whole model (exact, see passes/).
3. Layer by layer: run it on the cached hidden states while hooks accumulate each group's
   Hessian ``H = X^ T X^`` of the transformed input; quantize its linears with GPTQ; run the
   quantized layer again to produce the next layer's inputs.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn

from serq_ao.kernels.reference import apply_pre_op
from serq_ao.quant.calibration import CalibrationStats, StatisticsObserver
from serq_ao.quant.linear_plan import LinearPlan
from serq_ao.passes import ModelPlan
from serq_ao.passes.trace import find_decoder_layers

logger = logging.getLogger(__name__)


@torch.no_grad()
def record_layer_calls(
    model: nn.Module, plan: ModelPlan, batches: torch.Tensor, on_batch: Callable[[int], None] | None = None
) -> tuple[CalibrationStats, list[torch.Tensor], list[list[dict]]]:
    """Full-precision pass: statistics, layer-0 hidden states per batch, kwargs per layer and batch."""
    _, layers = find_decoder_layers(model)
    observer = StatisticsObserver()
    hidden: list[torch.Tensor] = []
    calls: list[list[dict]] = [[] for _ in layers]

    def recorder(index):
        def hook(module, args, kwargs):
            if index == 0:
                hidden.append(args[0].detach().clone())
            # the layer's other inputs (position embeddings, masks) are shared between
            # layers, so keeping references costs one copy per batch, not per layer
            calls[index].append({key: value for key, value in kwargs.items() if key != "hidden_states"})

        return hook

    handles = observer.attach(model, plan)
    handles += [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    started, tokens = time.perf_counter(), 0
    try:
        for batch in batches.split(1):
            model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
            tokens += batch.numel()
            if on_batch is not None:
                on_batch(1)
    finally:
        for handle in handles:
            handle.remove()
    return observer.statistics(tokens, time.perf_counter() - started), hidden, calls


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def quantize_layers_sequentially(
    model: nn.Module,
    plan: ModelPlan,
    linear_plans: dict[str, LinearPlan],
    hidden: list[torch.Tensor],
    calls: list[list[dict]],
    quantize_linear: Callable[[str, torch.Tensor], None],
    on_layer: Callable[[int, int], None] | None = None,
) -> None:
    """For each layer: Hessians of its groups on the current inputs, then
    ``quantize_linear(name, hessian)`` for each of its linears (which replaces the module),
    then the quantized layer's outputs become the next inputs."""
    layers_name, layers = find_decoder_layers(model)
    for index, layer in enumerate(layers):
        prefix = f"{layers_name}.{index}."
        groups = [g for g in plan.groups if g.linears[0].startswith(prefix)]
        hessians: dict[str, torch.Tensor] = {}

        def accumulate(linear_plan: LinearPlan):
            def hook(module, args):
                # what the linear multiplies with its weight: its input after the pre-op, in
                # fp32 products (as in the GPTQ reference), summed per batch; GPTQ itself then
                # works in fp64
                x = apply_pre_op(args[0], linear_plan.input_scale_inv, linear_plan.input_perm)
                x = x.reshape(-1, args[0].shape[-1])
                hessians[linear_plan.group.name] = (x.T @ x).double() + hessians.get(linear_plan.group.name, 0)

            return hook

        handles = [model.get_submodule(g.linears[0]).register_forward_pre_hook(accumulate(linear_plans[g.linears[0]]))
                   for g in groups]
        try:
            for h, kwargs in zip(hidden, calls[index]):
                _run_layer(layer, h, kwargs)
        finally:
            for handle in handles:
                handle.remove()
        for group in groups:
            for name in group.linears:
                quantize_linear(name, hessians[group.name])
        hidden = [_run_layer(layer, h, kwargs) for h, kwargs in zip(hidden, calls[index])]
        if on_layer is not None:
            on_layer(index + 1, len(layers))
