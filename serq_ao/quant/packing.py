"""Evaluation mode -> packed mode: FakeQuantLinear modules become nn.Linear with packed weights.

The packed weight (:class:`SERQMXFP4Tensor` or :class:`SERQIntTensor`) holds the codes, the
scales and the group's remaining pre-op; ``nn.Linear.forward`` reaches its custom op through
``F.linear``, so the model code is untouched and compiles and exports as usual.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from serq_ao.passes.transforms import replace_module
from serq_ao.quant.fake_quant import FakeQuantLinear
from serq_ao.tensor_subclass import PACKED_TENSOR_CLASSES, stored_bits_per_weight, stored_bytes


def is_packed_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and isinstance(module.weight, PACKED_TENSOR_CLASSES)


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear around a packed weight (no float weight is ever allocated)."""
    d_out, d_in = weight.shape
    linear = nn.Linear(d_in, d_out, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return linear


def pack_linear(module: FakeQuantLinear) -> nn.Linear:
    """The packed nn.Linear of an evaluation-mode linear: its records' codes and scales, its
    pre-op, and the dtype of the linear it replaced."""
    if module.lowrank_b is not None:
        raise ValueError(
            "LQER / L2QER models have no packed format (their INT8 factors need a second, "
            "low-rank GEMM); keep them in evaluation mode (serq_ao.quantize_model)"
        )
    if module.quantized is None:
        raise ValueError(
            "this evaluation-mode linear was reloaded from a folder and holds no codes to pack: "
            "quantize the float model with serq_ao.quantize_ instead"
        )
    main, correction = module.quantized
    device = module.weight.device
    weight = module.quant_format.pack(
        main, correction, input_scale_inv=module.input_scale_inv, input_perm=module.input_perm, dtype=module.model_dtype,
        rotation=module.rotation,
    )
    bias = None if module.bias is None else module.bias.to(module.model_dtype)
    return packed_linear(weight.to(device), bias)


@torch.no_grad()
def pack_model(model: nn.Module) -> nn.Module:
    """In place: replace every FakeQuantLinear by an nn.Linear with a packed weight."""
    names = [name for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)]
    for name in names:  # refuse before touching anything
        module = model.get_submodule(name)
        if module.lowrank_b is not None or module.quantized is None:
            pack_linear(module)
    for name in names:
        replace_module(model, name, pack_linear(model.get_submodule(name)))
    return model


@dataclasses.dataclass(frozen=True)
class LinearStorage:
    name: str
    in_features: int
    out_features: int
    rank: int
    bits_per_weight: float  # everything the packed weight stores, per original weight
    pre_op_bits_per_weight: float  # of which the pre-op vectors (1/s, pi)


@dataclasses.dataclass(frozen=True)
class StorageReport:
    linears: list[LinearStorage]
    model_bytes: int  # every parameter and buffer, packed weights at their stored size
    unquantized_bytes: int  # of which the tensors that stay in full precision

    def to_dict(self) -> dict:
        return {
            "model_bytes": self.model_bytes,
            "unquantized_bytes": self.unquantized_bytes,
            "linears": [dataclasses.asdict(s) for s in self.linears],
        }


def storage_report(model: nn.Module) -> StorageReport:
    """Bits per weight of every packed linear (none for a float or evaluation-mode model),
    and the bytes of the whole model (tied tensors counted once)."""
    linears = []
    for name, module in model.named_modules():
        if is_packed_linear(module):
            weight = module.weight
            pre_op = [t for t in (weight.input_scale_inv, weight.input_perm) if t is not None]
            pre_op_bits = sum(8 * stored_bytes(t) for t in pre_op) / weight.numel()
            linears.append(LinearStorage(name, module.in_features, module.out_features, weight.rank,
                                         stored_bits_per_weight(weight), pre_op_bits))
    seen, total, unquantized = set(), 0, 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = stored_bytes(tensor)
        total += size
        if not isinstance(tensor, PACKED_TENSOR_CLASSES):
            unquantized += size
    return StorageReport(linears, total, unquantized)
