"""What the packed weight subclasses share: the stored pre-op and the storage accounting."""

from __future__ import annotations

import torch


def compact_perm(perm: torch.Tensor | None) -> torch.Tensor | None:
    """Store a channel order in int16 where it fits (the ops widen it to int32 to gather)."""
    if perm is None:
        return None
    dtype = torch.int16 if perm.numel() <= torch.iinfo(torch.int16).max + 1 else torch.int32
    return perm.to(dtype).contiguous()


def in_features_and_dtype(weight) -> tuple[int, torch.dtype]:
    """A packed weight's d_in and logical dtype, read with torch functions off: on the subclass
    each read is a __torch_function__ round trip (about 2 us; a decode-sized linear takes tens)."""
    with torch._C.DisableTorchFunctionSubclass():
        return weight.shape[1], weight.dtype


def field_names(cls) -> list[str]:
    """Every tensor field a packed weight class may hold, required first."""
    return list(cls.tensor_data_names) + list(cls.optional_tensor_data_names)


def attribute_names(cls) -> list[str]:
    """Every non-tensor attribute of a packed weight class, required first."""
    return list(cls.tensor_attribute_names) + list(getattr(cls, "optional_tensor_attribute_names", []))


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies: for a packed weight, all its present fields (codes, scales,
    pre-op vectors); for any other tensor, its elements."""
    if hasattr(tensor, "optional_tensor_data_names"):
        present = (getattr(tensor, n) for n in field_names(type(tensor)))
        return sum(stored_bytes(t) for t in present if t is not None)
    return tensor.numel() * tensor.element_size()


def stored_bits_per_weight(tensor: torch.Tensor) -> float:
    """Bits stored by a packed weight (codes, scales, pre-op vectors) per original weight."""
    return 8 * stored_bytes(tensor) / (tensor.shape[0] * tensor.shape[1])


def rebuild(tensor, *, shape=None, dtype=None, **fields):
    """A packed weight of ``tensor``'s class with some fields, its shape or its logical dtype
    replaced; everything else as it is."""
    cls = type(tensor)
    values = {name: fields.get(name, getattr(tensor, name)) for name in field_names(cls)}
    attributes = {name: getattr(tensor, name) for name in attribute_names(cls)}
    if shape is not None:
        attributes["shape"] = torch.Size(shape)
    if dtype is not None:
        attributes["dtype"] = dtype
    return cls(**values, **attributes)


def to_copy(func, types, args, kwargs):
    """``aten._to_copy`` for a packed weight: a device moves every field; a dtype changes only
    the logical dtype (the dtype its linear returns), never the codes or the float32 scales.
    torchao's default keeps the logical dtype, so ``model.to(torch.bfloat16)`` would leave the
    packed linears returning float32."""
    from torch.utils._python_dispatch import return_and_correct_aliasing

    self = args[0]
    to = self._get_to_kwargs(*args[1:], **kwargs)
    device, dtype, non_blocking = to["device"], to["dtype"], to.get("non_blocking", False)
    fields = {name: None if getattr(self, name) is None else getattr(self, name).to(device, non_blocking=non_blocking)
              for name in field_names(type(self))}
    return return_and_correct_aliasing(func, args, kwargs, rebuild(self, dtype=dtype, **fields))
