"""Packed SERQ weight tensor subclasses (torchao TorchAOBaseTensor), one per format family."""

import torch

from serq_ao.tensor_subclass.common import stored_bits_per_weight, stored_bytes
from serq_ao.tensor_subclass.int8_rows_tensor import Int8RowsTensor
from serq_ao.tensor_subclass.serq_int_tensor import SERQIntTensor
from serq_ao.tensor_subclass.serq_mxfp4_tensor import SERQMXFP4Tensor

PACKED_TENSOR_CLASSES = (SERQMXFP4Tensor, SERQIntTensor)  # the weights of packed linears
TABLE_TENSOR_CLASSES = (Int8RowsTensor,)  # quantized embedding tables (a tied head reads them too)

# torch.load(weights_only=True) rebuilds only allow-listed classes.
torch.serialization.add_safe_globals([*PACKED_TENSOR_CLASSES, *TABLE_TENSOR_CLASSES])

__all__ = ["PACKED_TENSOR_CLASSES", "TABLE_TENSOR_CLASSES", "Int8RowsTensor", "SERQIntTensor", "SERQMXFP4Tensor", "stored_bits_per_weight", "stored_bytes"]
