"""Int8RowsTensor: an embedding table stored as INT8 per row (``SERQConfig(embeddings="int8")``).

One tensor serves both uses of the table, so that a head tied to the embeddings stays tied
(``lm_head.weight is embed_tokens.weight``, one copy in memory and on disk):

- ``F.embedding(ids, table)``: the looked-up rows, ``q * scale`` in float32, then cast to the
  table's logical dtype (:mod:`serq_ao.formats.int8_rows`);
- ``F.linear(x, table)``: the tied head's logits, ``(x @ q^T) * scale (+ bias)`` by
  ``serq::linear_int8_weights`` (a native CPU kernel: float32 products of the activations and
  the integer codes, summed in float32, one scale per output row), cast to the logical dtype.
"""

from __future__ import annotations

import torch
from torchao.utils import TorchAOBaseTensor

from serq_ao.formats.int8_rows import dequantize_int8_rows, quantize_int8_rows
from serq_ao.kernels.ops import linear_int8_weights
from serq_ao.tensor_subclass.common import to_copy

aten = torch.ops.aten


class Int8RowsTensor(TorchAOBaseTensor):
    """An (N, K) table as int8 codes and one float32 scale per row.

    Tensor attributes:
        qdata: (N, K) int8 codes, |q| <= 127.
        scale: (N,) float32, one scale per row.

    Non-tensor attributes:
        shape: (N, K), the logical shape of the table.
        dtype: the logical dtype (what a lookup and the tied head return).
    """

    tensor_data_names = ["qdata", "scale"]
    optional_tensor_data_names: list[str] = []
    tensor_attribute_names = ["shape", "dtype"]

    def __new__(cls, qdata, scale, shape, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata, scale, shape, dtype):
        super().__init__()
        self.qdata, self.scale = qdata, scale

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Int8RowsTensor":
        """Quantize a float table (N, K); the logical dtype is the table's."""
        codes, scale = quantize_int8_rows(weight)
        return cls(codes, scale, weight.shape, weight.dtype)

    def _stable_hash_for_caching(self) -> str:
        return f"Int8RowsTensor:{tuple(self.shape)}:{self.dtype}"

    def dequantize(self) -> torch.Tensor:
        """The table's values (N, K), float32."""
        return dequantize_int8_rows(self.qdata, self.scale)


implements = Int8RowsTensor.implements
implements([aten._to_copy.default])(to_copy)
implements_torch_function = Int8RowsTensor.implements_torch_function


def _lookup(ids: torch.Tensor, table: Int8RowsTensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        dtype = table.dtype
    rows = table.qdata[ids].float() * table.scale[ids].unsqueeze(-1)  # (..., K)
    return rows.to(dtype)


@implements([aten.embedding.default])
def _(func, types, args, kwargs):
    table, ids = args[0], args[1]
    return _lookup(ids, table)


@implements_torch_function([torch.nn.functional.embedding])
def _(func, types, args, kwargs):
    ids, table = args[0], args[1]
    max_norm = args[3] if len(args) > 3 else kwargs.get("max_norm")
    if max_norm is not None:
        raise ValueError("an int8 embedding table cannot renormalize its rows (max_norm): its values are fixed")
    return _lookup(ids, table)


@implements([aten.linear.default])
@implements_torch_function([torch.nn.functional.linear])
def _(func, types, args, kwargs):
    x, table = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    with torch._C.DisableTorchFunctionSubclass():
        dtype = table.dtype
    out = linear_int8_weights(x, table.qdata, table.scale, bias)
    return out if out.dtype == dtype else out.to(dtype)
