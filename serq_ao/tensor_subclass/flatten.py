"""Packed weights as plain tensors and string metadata, for safetensors and transformers.

safetensors stores plain tensors only. A packed weight (or a quantized embedding table) under the key ``prefix.weight`` is
stored as one plain tensor per field, ``prefix.weight_qdata``, ``prefix.weight_scale``, ...
(absent optional fields are not stored), and its class and non-tensor attributes go into the
metadata under the key ``prefix.weight`` as JSON. :mod:`serq_ao.integrations.hf_quantizer` reads the
same layout back through a transformers weight converter.
"""

from __future__ import annotations

import json

import torch

from serq_ao.tensor_subclass.common import attribute_names, field_names
from serq_ao.tensor_subclass.int8_rows_tensor import Int8RowsTensor
from serq_ao.tensor_subclass.serq_int_tensor import SERQIntTensor
from serq_ao.tensor_subclass.serq_mxfp4_tensor import SERQMXFP4Tensor

CLASSES = {cls.__name__: cls for cls in (SERQMXFP4Tensor, SERQIntTensor, Int8RowsTensor)}
METADATA_MARK = "serq_packed"


def _attributes(tensor) -> dict:
    attributes = {}
    for name in attribute_names(type(tensor)):
        value = getattr(tensor, name)
        if name == "shape":
            value = list(value)
        elif name == "dtype":
            value = str(value).removeprefix("torch.")
        attributes[name] = value
    return attributes


def describe_packed(tensor) -> dict:
    """Class, attributes and the present fields' shapes and dtypes of a packed weight (JSON-ready)."""
    fields = {}
    for name in field_names(type(tensor)):
        field = getattr(tensor, name)
        if field is not None:
            fields[name] = [list(field.shape), str(field.dtype).removeprefix("torch.")]
    return {"class": type(tensor).__name__, "attributes": _attributes(tensor), "fields": fields}


def flatten_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (plain tensors, safetensors metadata)."""
    tensors, metadata = {}, {}
    for key, value in state.items():
        if isinstance(value, tuple(CLASSES.values())):
            description = describe_packed(value)
            for field in description["fields"]:
                tensors[f"{key}_{field}"] = getattr(value, field)
            metadata[key] = json.dumps({METADATA_MARK: description})
        else:
            tensors[key] = value
    return tensors, metadata


def build_packed(description: dict, fields: dict[str, torch.Tensor]):
    """The packed weight described by :func:`describe_packed`, from its field tensors."""
    name = description["class"]
    if name not in CLASSES:
        raise ValueError(f"unknown packed weight class {name!r}; known: {sorted(CLASSES)}")
    cls = CLASSES[name]
    attributes = dict(description["attributes"])
    attributes["shape"] = torch.Size(attributes["shape"])
    attributes["dtype"] = getattr(torch, attributes["dtype"])
    missing = [f for f in description["fields"] if f not in fields]
    if missing:
        raise ValueError(f"packed weight lacks the fields {missing}")
    return cls(**{f: fields.get(f) for f in field_names(cls)}, **attributes)


def unflatten_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_state_dict`."""
    state = dict(tensors)
    for key, text in (metadata or {}).items():
        try:
            description = json.loads(text)
        except (TypeError, ValueError):
            continue
        if not isinstance(description, dict) or METADATA_MARK not in description:
            continue
        description = description[METADATA_MARK]
        fields = {f: state.pop(f"{key}_{f}") for f in description["fields"] if f"{key}_{f}" in state}
        state[key] = build_packed(description, fields)
    return state
