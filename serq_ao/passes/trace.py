"""Find a model's decoder layers, record what each is called with, and export them."""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

LayerInputs = tuple[tuple, dict]  # (args, kwargs) of one decoder-layer call


class UnsupportedModelError(ValueError):
    """The model's structure is not one serq can quantize; the message says what is missing."""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ``nn.ModuleList`` of same-class blocks that contain linears."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(type(block) is not type(module[0]) for block in module):
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        conv1d = next((type(m).__name__ for m in model.modules() if type(m).__name__ == "Conv1D"), None)
        hint = (f": its projections are {conv1d} modules (GPT-2 style, weight stored transposed), "
                "which serq does not quantize" if conv1d else "")
        raise UnsupportedModelError(
            "model has no decoder layers: expected an nn.ModuleList of blocks of one class "
            "that contain nn.Linear modules" + hint
        )
    return best


def example_input_ids(model: nn.Module, length: int = 8, device: torch.device | str | None = None) -> torch.Tensor:
    """The short window the passes trace with (on ``device``, default: the model's)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    device = device if device is not None else next(model.parameters()).device
    return (torch.arange(length, device=device).unsqueeze(0) * 7 + 3) % vocab  # (1, T)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor | None = None) -> list[LayerInputs]:
    """Run the model once and record the (args, kwargs) each layer receives."""
    if input_ids is None:
        input_ids = example_input_ids(model)
    captured: list[LayerInputs | None] = [None] * len(layers)

    def recorder(index):
        def hook(module, args, kwargs):
            captured[index] = (args, dict(kwargs))

        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, c in enumerate(captured) if c is None]
    if missing:
        raise RuntimeError(f"decoder layers {missing} were not called by the model's forward")
    return captured  # type: ignore[return-value]


def export_layer(layer: nn.Module, inputs: LayerInputs) -> torch.export.ExportedProgram:
    args, kwargs = inputs
    return torch.export.export(layer, args, kwargs, strict=False)


def structure_signature(layer: nn.Module) -> tuple:
    """Layers with equal signatures have the same dataflow (same class, same parameters)."""
    return (type(layer), tuple((name, tuple(p.shape)) for name, p in layer.named_parameters()))
