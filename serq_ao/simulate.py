"""Fast evaluation mode: weights held dequantized, activations fake-quantized on the fly.

A :class:`FakeQuantLinear` computes exactly what the packed kernels compute,
``Y = Q_a(X^) W^q^T + Q_a(X^)[:, :r] R^T + b`` with ``X^ = (X / s)[..., pi]`` when the
group's input transform is a pre-op, but with plain float matmuls: the numbers are those of
the packed model, the speed is not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serq_ao.formats import fake_quantize_int, fake_quantize_mxfp4

INT_GROUP_SIZE = 128
ACTIVATION_BITS = {"mxfp4": 4, "w4a8": 8, "w4a4": 4}


def quantize_weight(weight: torch.Tensor, fmt: str, scale_mode: str = "floor") -> torch.Tensor:
    """Q_w of a main weight (d_out, K): MXFP4 blocks of 32, or symmetric INT4 groups of 128."""
    if fmt == "mxfp4":
        return fake_quantize_mxfp4(weight, scale_mode)
    return fake_quantize_int(weight, 4, symmetric=True, granularity=INT_GROUP_SIZE)


def quantize_correction(correction: torch.Tensor, fmt: str, scale_mode: str = "floor") -> torch.Tensor:
    """Q_w of the correction R (d_out, r): MXFP4, or symmetric INT4 per output row."""
    if fmt == "mxfp4":
        return fake_quantize_mxfp4(correction, scale_mode)
    return fake_quantize_int(correction, 4, symmetric=True, granularity="channel")


def quantize_activation(x: torch.Tensor, fmt: str, scale_mode: str = "floor") -> torch.Tensor:
    """Q_a: dynamic MXFP4, or asymmetric INT per token in groups of 128 (8 or 4 bits)."""
    if fmt == "mxfp4":
        return fake_quantize_mxfp4(x, scale_mode)
    return fake_quantize_int(x, ACTIVATION_BITS[fmt], symmetric=False, granularity=INT_GROUP_SIZE)


class FakeQuantLinear(nn.Module):
    """A quantized linear in evaluation mode (see the module doc).

    Buffers: ``weight`` (d_out, d_in) dequantized W^q; ``correction`` (d_out, r) dequantized
    R or None; ``bias`` or None; ``input_scale_inv`` and ``input_perm``, the group's pre-op,
    or None where the transform was folded into the producer; ``lowrank_a`` (d_out, k) and
    ``lowrank_b`` (k, d_in), the LQER/L2QER factors, or None.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        correction: torch.Tensor | None,
        bias: torch.Tensor | None,
        *,
        fmt: str,
        scale_mode: str = "floor",
        input_scale_inv: torch.Tensor | None = None,
        input_perm: torch.Tensor | None = None,
        lowrank_a: torch.Tensor | None = None,
        lowrank_b: torch.Tensor | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.rank = 0 if correction is None else correction.shape[1]
        self.fmt, self.scale_mode = fmt, scale_mode
        # compact copies: a fake-quantized tensor may be a view into a padded one, which
        # safetensors refuses to save (and which would waste memory)
        self.register_buffer("weight", weight.clone())
        self.register_buffer("correction", None if correction is None else correction.clone())
        self.register_buffer("bias", None if bias is None else bias.clone())
        self.register_buffer("input_scale_inv", input_scale_inv)
        self.register_buffer("input_perm", input_perm)
        self.register_buffer("lowrank_a", None if lowrank_a is None else lowrank_a.clone())
        self.register_buffer("lowrank_b", None if lowrank_b is None else lowrank_b.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale_inv is not None:
            x = x * self.input_scale_inv.to(x.dtype)
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        x = quantize_activation(x, self.fmt, self.scale_mode)
        y = F.linear(x, self.weight, self.bias)
        if self.correction is not None:
            y = y + F.linear(x[..., : self.rank], self.correction)
        if self.lowrank_b is not None:  # LQER: Q8(Q(X) B^T) A^T
            inner = fake_quantize_int(F.linear(x, self.lowrank_b), 8, granularity="token")
            y = y + F.linear(inner, self.lowrank_a)
        return y

    def extra_repr(self) -> str:
        preop = [n for n in ("input_scale_inv", "input_perm") if getattr(self, n) is not None]
        lowrank = 0 if self.lowrank_b is None else self.lowrank_b.shape[0]
        return (
            f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, rank={self.rank}, "
            f"lowrank={lowrank}, pre-op={preop or None}"
        )
