"""The output head (``SERQConfig(quantize_lm_head=True)``): one more stage after the layers.

lm_head reads the final norm's output, which the model also returns (``last_hidden_state``,
``hidden_states[-1]``), so nothing is folded into that norm: the head's transform (1/s and
the saliency order) stays a run-time pre-op of its activation quantization, which is exact
and leaves every hidden state the model returns as it was. The head is then quantized like
any linear of the method, with

- statistics of ``norm(F_L)``: the float model's last-layer outputs on the calibration
  windows (the layerwise pass keeps them for this stage), through the final norm;
- with GPTQ, a Hessian of ``norm(Q_L)``, the quantized model's.

A head tied to the input embeddings is untied first (:func:`untie_head`): the embeddings stay
in floating point, and config.json says ``tie_word_embeddings: false`` so that loading does
not tie them again. The final norm is found by running the model once with its decoder
layers replaced by identities (:func:`find_head`): it is the module that maps the last
layer's output to lm_head's input; anything else in between is an error naming the option.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from serq_ao.kernels.reference import apply_pre_op
from serq_ao.passes import LinearGroup, ModelPlan
from serq_ao.passes.plan import UnknownProducer
from serq_ao.passes.trace import example_input_ids
from serq_ao.quant.layerwise import layer_forwards

logger = logging.getLogger(__name__)

OPTION = "quantize_lm_head"


class HeadError(ValueError):
    """The model's output head cannot be quantized; the message says why."""


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    head: str  # the nn.Linear that computes the logits
    norm: str  # the module whose output it reads

    def group(self, model: nn.Module) -> LinearGroup:
        in_features = model.get_submodule(self.head).in_features
        return LinearGroup((self.head,), in_features, UnknownProducer(
            "lm_head reads the final norm, whose output the model also returns: the transform stays a pre-op"))


def head_name(model: nn.Module) -> str:
    """The module name of ``model``'s output head (an nn.Linear), or a :class:`HeadError`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or type(head) is not nn.Linear:
        raise HeadError(f"{OPTION}: {type(model).__name__} has no nn.Linear output head "
                        f"(get_output_embeddings() gives {type(head).__name__})")
    return next(name for name, module in model.named_modules() if module is head)


def untie_head(model: nn.Module, name: str) -> bool:
    """Give the head a weight of its own where it shares the input embeddings' (True then)."""
    head = model.get_submodule(name)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or head.weight is not embeddings.weight:
        return False
    head.weight = nn.Parameter(embeddings.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    logger.info("%s: untied %s from the input embeddings, which stay in floating point", OPTION, name)
    return True


def prepare_head(model: nn.Module, layers: nn.ModuleList, *, dispatched: bool) -> HeadPlan:
    """lm_head and the norm it reads, the head untied from the embeddings; refused for a
    model placed by accelerate (its head's values may live in accelerate's hooks)."""
    if dispatched:
        raise HeadError(f"{OPTION} is not supported for a model placed by accelerate with a device map: "
                        "quantize it in memory, or stream it from its checkpoint")
    untie_head(model, head_name(model))
    embeddings = model.get_input_embeddings().weight.device
    return find_head(model, layers, example_input_ids(model, device=embeddings))


@torch.no_grad()
def find_head(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor) -> HeadPlan:
    """Which module feeds the head: run ``model`` on ``input_ids`` with every decoder layer an
    identity (their weights may be on the meta device) and find the module that maps the last
    layer's output to the head's input."""
    name = head_name(model)
    head = model.get_submodule(name)
    last: list[torch.Tensor] = []
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    seen: list[torch.Tensor] = []

    def identity(index: int):
        def forward(*args, **kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if index == len(layers) - 1:
                last.append(x)
            return x

        return forward

    def recorder(module_name: str):
        def hook(module, args, output):
            if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                calls.append((module_name, args[0], output))

        return hook

    inside = {id(m) for layer in layers for m in layer.modules()} | {id(layers)}
    handles = [m.register_forward_hook(recorder(n)) for n, m in model.named_modules()
               if id(m) not in inside and m is not head and n]
    handles.append(head.register_forward_pre_hook(lambda module, args: seen.append(args[0])))
    try:
        with layer_forwards(layers, identity):
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if not last or not seen:
        raise HeadError(f"{OPTION}: the model's forward did not reach its last decoder layer and {name}")

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.data_ptr() == b.data_ptr() and a.shape[-1] == b.shape[-1]

    feeding = [n for n, x, y in calls if same(x, last[-1]) and same(y, seen[-1])]
    if not feeding:
        raise HeadError(f"{OPTION}: {name} does not read one module's output applied to the last decoder layer's "
                        f"output in {type(model).__name__} (serq quantizes a head that reads the final norm)")
    return HeadPlan(name, feeding[-1])


@torch.no_grad()
def quantize_head(model: nn.Module, plan: HeadPlan, *, layers_name: str, floats, quantized, observer, statistics,
                  tokens: int, transform_layer, quantize_linear):
    """The head stage of :func:`~serq_ao.quant.layerwise.quantize_layerwise`: statistics of
    ``norm(floats)`` into ``observer`` (or taken from ``statistics``), the exact transform,
    and the head quantized (GPTQ on ``norm(quantized)`` where that stream is kept), where
    the head is (the layers may have visited another device). Returns
    ``(plans, reports, statistics)``."""
    norm = model.get_submodule(plan.norm)
    head = model.get_submodule(plan.head)
    device = head.weight.device
    group = plan.group(model)
    if observer is not None:
        observe = observer.hook(group.name)
        observer.groups.append(group)
        for index in range(len(floats)):
            observe(None, (norm(floats[index].to(device)),))
        statistics = observer.statistics(tokens, 0.0)
    elif statistics is not None and group.name not in statistics.amax:
        raise HeadError(f"{OPTION}: the statistics given cover the decoder layers only; pass calibration input ids "
                        "so that the head is calibrated too")
    plans = transform_layer(ModelPlan(layers_name, (group,)), statistics)
    linear_plan = plans[plan.head]
    hessian = None
    if quantized is not None:
        hessian = 0
        for index in range(len(quantized)):
            x = apply_pre_op(norm(quantized[index].to(device)), linear_plan.input_scale_inv, linear_plan.input_perm)
            x = x.reshape(-1, x.shape[-1])
            hessian = hessian + (x.T @ x).double()
    return plans, [quantize_linear(linear_plan, hessian, statistics)], statistics
