"""Slices, views and copies of the packed weights: what runtimes do to a weight before they
call its linear (tensor-parallel sharding, merged projections, pinned host copies, meta
initialisation).

The logical tensor is the weight (N, d_in) the linear multiplies; its values are
``dequantize()``, W^q in the stored channel order. Each op below gives the packed weight whose
``dequantize()`` is the same op on the dequantized weight, and whose linear is that op's
part of the original linear:

- rows (dim 0), any range: every row field is sliced (a view, aliasing the original, as
  loaders that ``copy_`` into a shard expect); the input side (pre-op) is shared.
- columns (dim 1), at the format's block or group boundaries (``end`` may be d_in): the
  shard's part of W^q, and the part of R that belongs to it. R multiplies the first r stored
  input channels, so a shard [a, b) carries R's columns [a, min(b, r)): the shards' linears
  on their slices of the input sum to the whole linear (a row-parallel split). A copy, not
  a view (W^q's and R's columns are apart). Not possible where the pre-op gathers the
  input (``input_perm``): a shard's channels would not be contiguous.
- ``select`` along rows: the dequantized row (a plain tensor of the logical dtype).
- ``cat`` along rows: weights of one class whose attributes and pre-op agree (q, k and v of
  one group share them), e.g. to merge projections.
- ``view`` to the same shape; ``t`` / ``transpose`` raise: there is no transposed layout.
- ``pin_memory`` / ``is_pinned``, ``empty_like`` (the meta device too): every field.
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import fill_defaults

from serq_ao.tensor_subclass.common import attribute_names, field_names, rebuild

aten = torch.ops.aten


def _map_fields(self, fn):
    return rebuild(self, **{name: None if getattr(self, name) is None else fn(getattr(self, name))
                             for name in field_names(type(self))})


def _normalized_range(size: int, start, end) -> tuple[int, int]:
    start, end, _ = slice(start, end).indices(size)
    return start, max(start, end)


def register_views(cls, row_fields: tuple[str, ...]) -> None:
    """Register the ops of the module doc for ``cls``; ``row_fields``: its fields with one row
    per output channel. ``cls.slice_columns(start, end)`` gives its column shards."""
    implements = cls.implements
    name = cls.__name__

    def rows(self, start: int, end: int):
        return rebuild(self, shape=(end - start, self.shape[1]),
                        **{f: None if getattr(self, f) is None else getattr(self, f)[start:end] for f in row_fields})

    @implements([aten.slice.Tensor])
    def _(func, types, args, kwargs):
        self, dim, start, end, step = fill_defaults(args, 5, [0, None, None, 1])
        if step != 1:
            raise ValueError(f"{name} slices with step 1 only, got step {step}")
        dim = dim % 2
        start, end = _normalized_range(self.shape[dim], start, end)
        if dim == 0:
            return return_and_correct_aliasing(func, args, kwargs, rows(self, start, end))
        return self.slice_columns(start, end)

    @implements([aten.select.int])
    def _(func, types, args, kwargs):
        self, dim, index = args
        if dim % 2 != 0:
            raise ValueError(f"{name} selects rows (dim 0) only: a column of a packed weight is not a packed weight")
        index = range(self.shape[0])[index]  # negative indices, and the IndexError torch gives
        return rows(self, index, index + 1).dequantize().to(self.dtype)[0]

    @implements([aten.cat.default])
    def _(func, types, args, kwargs):
        tensors, dim = fill_defaults(args, 2, [0])
        tensors = list(tensors)
        if dim % 2 != 0:
            raise ValueError(f"{name} concatenates along rows (dim 0) only")
        first = tensors[0]
        for other in tensors[1:]:
            if type(other) is not type(first):
                raise TypeError(f"cannot concatenate a {name} with a {type(other).__name__}")
            for attribute in attribute_names(cls):
                mine, theirs = getattr(first, attribute), getattr(other, attribute)
                if attribute == "shape":
                    mine, theirs = mine[1], theirs[1]
                if mine != theirs:
                    raise ValueError(f"cannot concatenate {name}s whose {attribute} differ: {mine} and {theirs}")
            for field in field_names(cls):
                if field in row_fields:
                    if (getattr(first, field) is None) != (getattr(other, field) is None):
                        raise ValueError(f"cannot concatenate {name}s where only some have {field}")
                elif not _same(getattr(first, field), getattr(other, field)):
                    raise ValueError(f"cannot concatenate {name}s with different {field} (their pre-ops must agree)")
        fields = {f: None if getattr(first, f) is None else torch.cat([getattr(t, f) for t in tensors])
                  for f in row_fields}
        return rebuild(first, shape=(sum(t.shape[0] for t in tensors), first.shape[1]), **fields)

    @implements([aten.view.default])
    def _(func, types, args, kwargs):
        self, size = args[0], list(args[1])
        if -1 in size:
            known = math.prod(s for s in size if s != -1)
            size[size.index(-1)] = self.numel() // known if known else 0
        if list(self.shape) != size:
            raise ValueError(f"{name} views only as its own shape {list(self.shape)}, got {size}")
        return return_and_correct_aliasing(func, args, kwargs, _map_fields(self, lambda t: t))

    @implements([aten.t.default, aten.transpose.int])
    def _(func, types, args, kwargs):
        raise NotImplementedError(f"{name} has no transposed layout: multiply it with F.linear, which reads it "
                                  "as (out_features, in_features)")

    @implements([aten._pin_memory.default])
    def _(func, types, args, kwargs):
        return _map_fields(args[0], lambda t: t.pin_memory())

    @implements([aten.is_pinned.default])
    def _(func, types, args, kwargs):
        self = args[0]
        return all(getattr(self, f).is_pinned() for f in field_names(cls) if getattr(self, f) is not None)

    @implements([aten.empty_like.default])
    def _(func, types, args, kwargs):
        device = kwargs.get("device")
        return _map_fields(args[0], lambda t: torch.empty_like(t, device=device))


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))


def check_column_range(tensor, start: int, end: int, multiple: int, unit: str) -> None:
    """The column shard [start, end) must be whole ``unit``s of ``multiple`` columns, and whole
    blocks of the input's rotation (``end`` may be d_in), and the input must not be gathered."""
    d_in = tensor.shape[1]
    name = type(tensor).__name__
    if tensor.rotation:
        multiple, unit = math.lcm(multiple, tensor.rotation), f"{unit} and rotation block"
    if end <= start:
        raise ValueError(f"{name}: an empty column slice [{start}, {end}) has no packed form")
    if start % multiple or (end % multiple and end != d_in):
        raise ValueError(f"{name} slices its input columns at {unit} boundaries (multiples of {multiple}, or "
                         f"d_in = {d_in} at the end), got [{start}, {end})")
    if tensor.input_perm is not None:
        raise ValueError(f"{name}: the input channels of this weight are gathered by its pre-op (input_perm), so a "
                         "column slice of it is not a contiguous slice of the input; slice the rows, or fold the "
                         "pre-op into the producer (fold_into_linears) first")
