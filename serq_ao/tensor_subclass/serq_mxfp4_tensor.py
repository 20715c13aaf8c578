"""SERQMXFP4Tensor: the weight of a SERQ linear, ``[W^q | R]`` packed as MXFP4."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from serq_ao.formats.mxfp4 import quantize_mxfp4
from serq_ao.kernels.ops import padded_in_features, serq_linear_mxfp4, split_mxfp4_weight
from serq_ao.tensor_subclass.common import check_exact, compact_perm

aten = torch.ops.aten


class SERQMXFP4Tensor(TorchAOBaseTensor):
    """MXFP4 weight with SERQ's single correction matrix and the group's remaining pre-op.

    Tensor attributes:
        qdata: (N, (Kp + r) / 2) uint8, E2M1 codes of ``[W^q | R]``, two per byte, low first;
            Kp = d_in padded to a multiple of 32.
        scale: (N, (Kp + r) / 32) uint8, E8M0 block exponents.
        input_scale_inv (optional): (d_in,) float32, the 1/s of the pre-op; None if folded away.
        input_perm (optional): (d_in,) int16 (int32 past 32768 channels), the gather of the
            pre-op; None if folded away.

    Non-tensor attributes:
        rank: r, a multiple of 32 (0: no correction).
        scale_mode: "floor" or "rceil", the activation block-scale rule.
        shape: (N, d_in), the logical shape of the original weight.
        dtype: the logical dtype (that of the activations it multiplies).
    """

    tensor_data_names = ["qdata", "scale"]
    optional_tensor_data_names = ["input_scale_inv", "input_perm"]
    tensor_attribute_names = ["rank", "scale_mode", "shape", "dtype"]

    def __new__(cls, qdata, scale, rank, scale_mode, shape, dtype, input_scale_inv=None, input_perm=None):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata, scale, rank, scale_mode, shape, dtype, input_scale_inv=None, input_perm=None):
        super().__init__()
        self.qdata, self.scale = qdata, scale
        self.rank, self.scale_mode = rank, scale_mode
        self.input_scale_inv, self.input_perm = input_scale_inv, input_perm

    @classmethod
    def from_dequantized(
        cls,
        main: torch.Tensor,
        correction: torch.Tensor | None,
        *,
        scale_mode: str = "floor",
        input_scale_inv: torch.Tensor | None = None,
        input_perm: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "SERQMXFP4Tensor":
        """Pack W^q (N, d_in) and R (N, r), both already on the MXFP4 grid.

        Re-quantizing a value on the grid returns it unchanged (the block scale it gets is the
        one it had, or a smaller power of two on which it is still representable); this is
        checked, so a weight off the grid raises instead of being rounded silently.
        """
        d_out, d_in = main.shape
        padded = F.pad(main.float(), (0, padded_in_features(d_in) - d_in))
        full = padded if correction is None else torch.cat([padded, correction.float()], dim=1)
        qdata, scale = quantize_mxfp4(full, "floor")
        rank = 0 if correction is None else correction.shape[1]
        packed = cls(qdata, scale, rank, scale_mode, torch.Size((d_out, d_in)), dtype,
                     input_scale_inv, compact_perm(input_perm))
        check_exact("main weight", packed.dequantize(), main)
        if correction is not None:
            check_exact("correction", packed.correction(), correction)
        return packed

    def _stable_hash_for_caching(self) -> str:
        """What compiled code depends on: layout and attributes, not the weight values."""
        optional = tuple(t is not None for t in (self.input_scale_inv, self.input_perm))
        return f"SERQMXFP4Tensor:{tuple(self.shape)}:{tuple(self.qdata.shape)}:{self.rank}:{self.scale_mode}:{self.dtype}:{optional}"

    def dequantize(self) -> torch.Tensor:
        """W^q (N, d_in), float32 (R is not part of the logical weight)."""
        return split_mxfp4_weight(self.qdata, self.scale, self.shape[1], self.rank)[0]

    def correction(self) -> torch.Tensor | None:
        """R (N, r), float32, or None for r = 0."""
        return split_mxfp4_weight(self.qdata, self.scale, self.shape[1], self.rank)[1]


implements = SERQMXFP4Tensor.implements
implements_torch_function = SERQMXFP4Tensor.implements_torch_function


@implements([aten.linear.default])
@implements_torch_function([torch.nn.functional.linear])
def _(func, types, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return serq_linear_mxfp4(
        x, weight.qdata, weight.scale, weight.shape[1], weight.rank, weight.scale_mode,
        weight.input_scale_inv, weight.input_perm, bias,
    )
