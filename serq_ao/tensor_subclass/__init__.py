"""Packed SERQ weight tensor subclasses (torchao TorchAOBaseTensor), one per format family."""

import torch

from serq_ao.formats import IntFormat, MXFP4Format
from serq_ao.tensor_subclass.common import stored_bits_per_weight, stored_bytes
from serq_ao.tensor_subclass.int8_rows_tensor import Int8RowsTensor
from serq_ao.tensor_subclass.serq_int_tensor import SERQIntTensor
from serq_ao.tensor_subclass.serq_mxfp4_tensor import SERQMXFP4Tensor

PACKED_TENSOR_CLASSES = (SERQMXFP4Tensor, SERQIntTensor)  # the weights of packed linears
TABLE_TENSOR_CLASSES = (Int8RowsTensor,)  # quantized embedding tables (a tied head reads them too)



def pack_weight(quant_format, main, correction, *, input_scale_inv, input_perm, dtype, rotation=0) -> torch.Tensor:
    """The packed weight (the tensor subclass of ``quant_format``'s family) of quantization
    records ``main`` and ``correction`` (:class:`serq_ao.formats.Quantized`) and the linear's
    remaining pre-op (``rotation``: its Hadamard block size, 0 for none). The codes and scales
    are stored as quantization left them: nothing is re-quantized."""
    if isinstance(quant_format, MXFP4Format):
        return SERQMXFP4Tensor.from_quantized(main, correction, scale_mode=quant_format.scale_mode.value,
                                              input_scale_inv=input_scale_inv, input_perm=input_perm, dtype=dtype,
                                              rotation=rotation)
    if isinstance(quant_format, IntFormat):
        return SERQIntTensor.from_quantized(main, correction, activation_bits=quant_format.activation_bits,
                                            input_scale_inv=input_scale_inv, input_perm=input_perm, dtype=dtype,
                                            rotation=rotation)
    raise TypeError(f"pack_weight: no packed tensor for {type(quant_format).__name__}")


# torch.load(weights_only=True) rebuilds only allow-listed classes.
torch.serialization.add_safe_globals([*PACKED_TENSOR_CLASSES, *TABLE_TENSOR_CLASSES])

__all__ = ["PACKED_TENSOR_CLASSES", "pack_weight", "TABLE_TENSOR_CLASSES", "Int8RowsTensor", "SERQIntTensor", "SERQMXFP4Tensor", "stored_bits_per_weight", "stored_bytes"]
