"""Custom ops of serq-ao (``torch.ops.serq``): plain-PyTorch reference bodies on CPU."""

from serq_ao.kernels.ops import serq_linear_mxfp4

__all__ = ["serq_linear_mxfp4"]
