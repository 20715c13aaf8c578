"""Packed SERQ weight tensor subclasses (torchao TorchAOBaseTensor)."""

from serq_ao.tensor_subclass.serq_mxfp4_tensor import SERQMXFP4Tensor

__all__ = ["SERQMXFP4Tensor"]
