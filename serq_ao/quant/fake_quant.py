"""The evaluation mode: weights held dequantized, activations fake-quantized on the fly.

A :class:`FakeQuantLinear` computes what the packed op computes,
``Y = Q_a(X^) W^q^T (+ b) + Q_a(X^)[:, :r] R^T`` with ``X^ = (X * s^-1)[..., pi] H`` (the
scale and order where the group kept a pre-op, H where the weights were rotated), through
the same functions (:mod:`serq_ao.kernels.reference`: pre-op in float32, the same matmuls
over the same row chunks), so the two agree bit for bit in every model dtype. The difference is speed: the weights are dequantized once, not per call.

It keeps the records it was built from (``quantized``: codes and scales of W^q and R), so
that packing (:mod:`serq_ao.quant.packing`) stores those codes and re-quantizes nothing.
LQER / L2QER factors live only here: they have no packed format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serq_ao.formats import Quantized, QuantFormat, fake_quantize_int
from serq_ao.kernels.reference import apply_pre_op, linear_on_weights, rows_of


class FakeQuantLinear(nn.Module):
    """A quantized linear in evaluation mode (see the module doc).

    Buffers (float32 whatever the model's dtype): ``weight`` (d_out, d_in) dequantized W^q;
    ``correction`` (d_out, r) dequantized R or None; ``bias`` or None; ``input_scale_inv``
    and ``input_perm``, the group's pre-op, or None where the transform was folded into the
    producer; ``lowrank_a`` (d_out, k) and ``lowrank_b`` (k, d_in), the LQER/L2QER factors,
    or None. ``model_dtype``: the dtype of the linear it replaced (its packed weight's dtype).
    ``rotation``: the block size of the Hadamard rotation W^q and R were quantized under (0:
    none), applied to the input last.
    """

    def __init__(
        self,
        main: Quantized,
        correction: Quantized | None,
        bias: torch.Tensor | None,
        *,
        quant_format: QuantFormat,
        model_dtype: torch.dtype = torch.float32,
        input_scale_inv: torch.Tensor | None = None,
        input_perm: torch.Tensor | None = None,
        lowrank_a: torch.Tensor | None = None,
        lowrank_b: torch.Tensor | None = None,
        rotation: int = 0,
    ):
        super().__init__()
        self.rotation = rotation
        self.out_features, self.in_features = main.rows, main.columns
        self.rank = 0 if correction is None else correction.columns
        self.quant_format = quant_format
        self.model_dtype = model_dtype
        self.quantized: tuple[Quantized, Quantized | None] | None = (main, correction)

        def own(t):  # a compact float32 copy in the layout a reload gives it
            return None if t is None else t.detach().float().contiguous().clone()

        self.register_buffer("weight", main.dequantize())
        self.register_buffer("correction", None if correction is None else correction.dequantize())
        self.register_buffer("bias", own(bias))
        self.register_buffer("input_scale_inv", own(input_scale_inv))
        self.register_buffer("input_perm", None if input_perm is None else input_perm.detach().clone())
        self.register_buffer("lowrank_a", own(lowrank_a))
        self.register_buffer("lowrank_b", own(lowrank_b))

    @classmethod
    def placeholder(cls, in_features: int, out_features: int, rank: int, quant_format: QuantFormat, *,
                    bias: bool, pre_op: tuple[bool, bool], lowrank: int = 0, rotation: int = 0) -> "FakeQuantLinear":
        """An instance with empty buffers of the right shapes, to load a saved state into
        (it has no records: a reloaded evaluation-mode model cannot be packed)."""
        main = quant_format.quantize_weight(torch.zeros(out_features, in_features))
        correction = quant_format.quantize_correction(torch.zeros(out_features, rank)) if rank else None
        module = cls(
            main, correction, torch.empty(out_features) if bias else None, quant_format=quant_format,
            input_scale_inv=torch.empty(in_features) if pre_op[0] else None,
            input_perm=torch.empty(in_features, dtype=torch.long) if pre_op[1] else None,
            lowrank_a=torch.empty(out_features, lowrank) if lowrank else None,
            lowrank_b=torch.empty(lowrank, in_features) if lowrank else None,
            rotation=rotation,
        )
        module.quantized = None
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = apply_pre_op(x, self.input_scale_inv, self.input_perm, self.rotation)
        x_q = self.quant_format.fake_quantize_activation(x_hat)
        correction = None if self.correction is None else self.correction.float()
        weights = rows_of(self.weight.float(), correction)
        y = linear_on_weights(x_q, self.out_features, self.in_features + self.rank, weights, self.bias)
        if self.lowrank_b is not None:  # LQER: Q8(Q(X) B^T) A^T
            inner = fake_quantize_int(F.linear(x_q, self.lowrank_b.float()), 8, granularity="token")
            y = y + F.linear(inner, self.lowrank_a.float())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        preop = [n for n in ("input_scale_inv", "input_perm") if getattr(self, n) is not None]
        lowrank = 0 if self.lowrank_b is None else self.lowrank_b.shape[0]
        return (
            f"in={self.in_features}, out={self.out_features}, format={self.quant_format.to_dict()}, "
            f"rank={self.rank}, lowrank={lowrank}, pre-op={preop or None}, rotation={self.rotation}"
        )
