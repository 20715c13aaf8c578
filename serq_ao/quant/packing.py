"""Evaluation mode -> packed mode: FakeQuantLinear modules become nn.Linear with packed weights.

The packed weight (:class:`SERQMXFP4Tensor` or :class:`SERQIntTensor`) holds the codes, the
scales and the group's remaining pre-op; ``nn.Linear.forward`` reaches its custom op through
``F.linear``, so the model code is untouched and compiles and exports as usual.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from serq_ao.passes.transforms import replace_module
from serq_ao.quant.fake_quant import FakeQuantLinear
from serq_ao.tensor_subclass import (
    PACKED_TENSOR_CLASSES,
    TABLE_TENSOR_CLASSES,
    pack_weight,
    stored_bits_per_weight,
    stored_bytes,
)
from serq_ao.tensor_subclass.flatten import METADATA_MARK, build_packed


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
    weight = pack_weight(module.quant_format, main, correction, input_scale_inv=module.input_scale_inv,
                         input_perm=module.input_perm, dtype=module.model_dtype, rotation=module.rotation)
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
    unquantized_bytes: int  # of which the tensors that stay in full precision (not packed, not a quantized table)

    def to_dict(self) -> dict:
        return {
            "model_bytes": self.model_bytes,
            "unquantized_bytes": self.unquantized_bytes,
            "linears": [dataclasses.asdict(s) for s in self.linears],
        }


def _linear_storage(name: str, weight) -> LinearStorage:
    pre_op = [t for t in (weight.input_scale_inv, weight.input_perm) if t is not None]
    pre_op_bits = sum(8 * stored_bytes(t) for t in pre_op) / weight.numel()
    return LinearStorage(name, weight.shape[1], weight.shape[0], weight.rank, stored_bits_per_weight(weight),
                         pre_op_bits)


def storage_report(model: nn.Module) -> StorageReport:
    """Bits per weight of every packed linear (none for a float or evaluation-mode model),
    and the bytes of the whole model as a save stores it: parameters and persistent buffers,
    tied tensors once (non-persistent buffers such as rotary frequencies are rebuilt on load,
    never stored)."""
    linears = [_linear_storage(name, module.weight) for name, module in model.named_modules()
               if is_packed_linear(module)]
    stored = []
    for module in model.modules():
        stored += [t for t in module._parameters.values() if t is not None]
        stored += [t for n, t in module._buffers.items() if t is not None and n not in module._non_persistent_buffers_set]
    seen, total, unquantized = set(), 0, 0
    for tensor in stored:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = stored_bytes(tensor)
        total += size
        if not isinstance(tensor, (*PACKED_TENSOR_CLASSES, *TABLE_TENSOR_CLASSES)):
            unquantized += size
    return StorageReport(linears, total, unquantized)


def folder_storage(folder: str | os.PathLike, linear_order: list[str] | None = None, *,
                   files: list[str] | None = None) -> StorageReport:
    """The :class:`StorageReport` of the weights a folder holds, read from its safetensors
    headers (each tensor's dtype and shape, each packed weight's description) and never from
    a model in memory: a report's figures then describe what was written, whichever path
    (in memory, streamed, resumed) wrote it. ``linear_order``: the packed linears' names in
    model order (config.json's ``packed_linears``); by name otherwise. ``files``: the
    safetensors files to read (default: those the folder's index names, else all)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if files is None:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
            sorted(p.name for p in folder.glob("*.safetensors"))
    plain: dict[str, tuple[list[int], str]] = {}
    packed: dict[str, dict] = {}
    for file in files:
        with safe_open(str(folder / file), framework="pt") as handle:
            for key, text in (handle.metadata() or {}).items():
                if METADATA_MARK in text:
                    packed[key] = json.loads(text)[METADATA_MARK]
            for key in handle.keys():
                part = handle.get_slice(key)
                plain[key] = (list(part.get_shape()), part.get_dtype())
    # a packed <linear>.weight is stored as <linear>.weight_<field>, one tensor per field
    packed_fields = {f"{key}_{field}" for key, description in packed.items() for field in description["fields"]}
    total = unquantized = 0
    for key, (shape, dtype) in plain.items():
        if dtype not in _SAFETENSORS_BYTES:
            raise ValueError(f"{folder}: tensor {key} has the safetensors dtype {dtype}, which serq never writes")
        size = math.prod(shape) * _SAFETENSORS_BYTES[dtype]
        total += size
        if key not in packed_fields:
            unquantized += size
    linears = {}
    for key, description in packed.items():
        if description["class"] in TABLE_CLASS_NAMES:  # a quantized embedding table, not a linear
            continue
        # the weight on the meta device: its fields' shapes and dtypes, no data, so the same
        # formulas as storage_report give its figures
        fields = {f: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
                  for f, (shape, dtype) in description["fields"].items()}
        linears[key.removesuffix(".weight")] = _linear_storage(key.removesuffix(".weight"),
                                                               build_packed(description, fields))
    order = [n for n in (linear_order or []) if n in linears] + sorted(set(linears) - set(linear_order or []))
    return StorageReport([linears[n] for n in order], total, unquantized)


TABLE_CLASS_NAMES = {cls.__name__ for cls in TABLE_TENSOR_CLASSES}
# bytes per element of each safetensors dtype name
_SAFETENSORS_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                      "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
