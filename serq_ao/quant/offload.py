"""Models dispatched by accelerate (``from_pretrained(..., device_map=..., offload_folder=...)``).

accelerate keeps an offloaded module's weights on the meta device and an ``AlignDevicesHook``
on the module whose ``weights_map`` holds the values (CPU tensors, or the offload folder's
files for ``"disk"``); the hook loads them onto its execution device for each forward and
drops them afterwards. Quantizing changes weights in place and replaces modules, which that
round trip would undo, so :class:`AcceleratedWeights` takes each decoder layer out of
accelerate's hands for its turn:

- onload: the layer's hooks are removed, every offloaded tensor is read from its hook's
  ``weights_map`` (a copy: the offload folder's files are never written) onto the compute
  device and checked finite;
- offload: the quantized layer is placed on its home device and gets one hook that moves
  its inputs there and its outputs back. A layer whose weights were resident keeps its
  device; one that accelerate offloaded (to the CPU or to disk) stays in CPU memory,
  quantized (about a quarter of its bf16 size), and the model's ``hf_device_map`` says
  ``"cpu"`` for it.

The modules outside the decoder layers (embeddings, final norm, head) keep their hooks:
quantization only runs them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from serq_ao.quant.input_checks import check_finite_weights

logger = logging.getLogger(__name__)


def _align_hooks(module: nn.Module) -> list:
    """The accelerate ``AlignDevicesHook``s attached to ``module`` itself (inside a
    ``SequentialHook`` too)."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def offloaded_tensor_names(model: nn.Module) -> set[str]:
    """The qualified names of ``model``'s tensors that accelerate holds in an offload
    (meta on the module, values in a hook's ``weights_map``)."""
    from accelerate.utils import named_module_tensors

    names = set()
    for prefix, module in model.named_modules():
        for hook in _align_hooks(module):
            if hook.offload:
                for name, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                    recurse=hook.place_submodules, remove_non_persistent=True):
                    names.add(f"{prefix}.{name}" if prefix else name)
    return names


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed ``model``'s modules (any module carries its hook)."""
    return any(hasattr(module, "_hf_hook") for module in model.modules())


def execution_device(module: nn.Module) -> torch.device | None:
    """Where accelerate runs ``module`` (its own or its first submodule's hook), or None."""
    for sub in module.modules():
        for hook in _align_hooks(sub):
            if hook.execution_device is not None:
                return torch.device(hook.execution_device)
    return None


class AcceleratedWeights:
    """:class:`~serq_ao.quant.layerwise.LayerWeights` for a model dispatched by accelerate
    (see the module doc)."""

    def __init__(self, model: nn.Module, layers_name: str):
        self.model, self.layers_name = model, layers_name
        self._home: dict[int, tuple[torch.device, bool]] = {}  # index -> (home, io_same_device)

    def onload(self, index, layer, device):
        from accelerate.hooks import remove_hook_from_module
        from accelerate.utils import named_module_tensors, set_module_tensor_to_device

        prefix = f"{self.layers_name}.{index}."
        offloads, io_same_device, execution = [], False, None
        for module in layer.modules():
            for hook in _align_hooks(module):
                execution = execution or hook.execution_device
                io_same_device = io_same_device or (module is layer and hook.io_same_device)
                if hook.offload:
                    names = [name for name, _ in named_module_tensors(
                        module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
                        remove_non_persistent=True)]
                    offloads.append((module, hook.weights_map, names))
        remove_hook_from_module(layer, recurse=True)
        for module, weights_map, names in offloads:
            for name in names:
                # a copy: quantization changes weights in place, the offload's values stay as loaded
                value = weights_map[name].to(device=device, copy=True)
                set_module_tensor_to_device(module, name, device, value=value)
        if any(t.device.type == "meta" for t in [*layer.parameters(), *layer.buffers()]):
            missing = next(n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.device.type == "meta")
            raise ValueError(f"{prefix}{missing} is on the meta device and no accelerate offload holds its value")
        home = torch.device(execution) if not offloads and execution is not None else torch.device("cpu")
        self._home[index] = (home, io_same_device)
        layer.to(device)
        check_finite_weights(layer, prefix)

    def offload(self, index, layer):
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module

        home, io_same_device = self._home.pop(index)
        layer.to(home)
        add_hook_to_module(layer, AlignDevicesHook(execution_device=home, io_same_device=io_same_device))
        device_map = getattr(self.model, "hf_device_map", None)
        if isinstance(device_map, dict):  # accelerate's spelling: an int for a GPU, else the device's name
            name = f"{self.layers_name}.{index}"
            place = home.index if home.type == "cuda" and home.index is not None else str(home)
            for key in [k for k in device_map if k == name or k.startswith(name + ".")] or [name]:
                device_map[key] = place
