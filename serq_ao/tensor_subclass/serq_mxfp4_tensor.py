"""SERQMXFP4Tensor: the weight of a SERQ linear, ``[W^q | R]`` packed as MXFP4."""

from __future__ import annotations

import torch
from torchao.utils import TorchAOBaseTensor

from serq_ao.formats.base import Quantized
from serq_ao.formats.mxfp4 import BLOCK_SIZE
from serq_ao.kernels.ops import linear_mxfp4, padded_in_features, split_mxfp4_weight
from serq_ao.tensor_subclass.common import compact_perm, in_features_and_dtype, to_copy
from serq_ao.tensor_subclass.views import check_column_range, register_views

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

    Optional non-tensor attributes:
        rotation: the block size of the Hadamard rotation that ends the pre-op (0: none; see
            :mod:`serq_ao.formats.hadamard`). Weights saved before it existed read 0.

    Non-tensor attributes:
        rank: r, a multiple of 32 (0: no correction).
        scale_mode: "floor" or "rceil", the activation block-scale rule.
        shape: (N, d_in), the logical shape of the original weight.
        dtype: the logical dtype (that of the activations it multiplies).
    """

    tensor_data_names = ["qdata", "scale"]
    optional_tensor_data_names = ["input_scale_inv", "input_perm"]
    tensor_attribute_names = ["rank", "scale_mode", "shape", "dtype"]
    optional_tensor_attribute_names = ["rotation"]

    def __new__(cls, qdata, scale, rank, scale_mode, shape, dtype, input_scale_inv=None, input_perm=None, rotation=0):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata, scale, rank, scale_mode, shape, dtype, input_scale_inv=None, input_perm=None, rotation=0):
        super().__init__()
        self.qdata, self.scale = qdata, scale
        self.rank, self.scale_mode = rank, scale_mode
        self.input_scale_inv, self.input_perm = input_scale_inv, input_perm
        self.rotation = 0 if rotation is None else rotation

    @classmethod
    def from_quantized(
        cls,
        main: Quantized,
        correction: Quantized | None,
        *,
        scale_mode: str = "floor",
        input_scale_inv: torch.Tensor | None = None,
        input_perm: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        rotation: int = 0,
    ) -> "SERQMXFP4Tensor":
        """Pack the MXFP4 records of W^q (N, d_in) and R (N, r): their codes and scales are
        stored as they are, ``[W^q | R]`` side by side (Kp + r columns)."""
        for what, record in (("main", main), ("correction", correction)):
            if record is not None and record.grid != "mxfp4":
                raise ValueError(f"{what} must be an MXFP4 record, got grid {record.grid!r}")
        qdata, scale, rank = main.qdata, main.scale, 0
        if correction is not None:
            if correction.rows != main.rows or correction.columns % BLOCK_SIZE:
                raise ValueError(f"correction must be (N={main.rows}, r) with r a multiple of {BLOCK_SIZE}, "
                                 f"got ({correction.rows}, {correction.columns})")
            qdata = torch.cat([qdata, correction.qdata], dim=1)
            scale = torch.cat([scale, correction.scale], dim=1)
            rank = correction.columns
        return cls(qdata.contiguous(), scale.contiguous(), rank, scale_mode, torch.Size((main.rows, main.columns)),
                   dtype, None if input_scale_inv is None else input_scale_inv.float().contiguous(),
                   compact_perm(input_perm), rotation)

    def _stable_hash_for_caching(self) -> str:
        """What compiled code depends on: layout and attributes, not the weight values."""
        optional = tuple(t is not None for t in (self.input_scale_inv, self.input_perm))
        return (f"SERQMXFP4Tensor:{tuple(self.shape)}:{tuple(self.qdata.shape)}:{self.rank}:{self.scale_mode}:"
                f"{self.dtype}:{optional}:{self.rotation}")

    def dequantize(self) -> torch.Tensor:
        """W^q (N, d_in), float32 (R is not part of the logical weight)."""
        return split_mxfp4_weight(self.qdata, self.scale, self.shape[1], self.rank)[0]

    def correction(self) -> torch.Tensor | None:
        """R (N, r), float32, or None for r = 0."""
        return split_mxfp4_weight(self.qdata, self.scale, self.shape[1], self.rank)[1]

    def records(self) -> tuple[Quantized, Quantized | None]:
        """The records this weight was packed from: (W^q, R or None)."""
        kp = padded_in_features(self.shape[1])
        main = Quantized(self.qdata[:, : kp // 2], self.scale[:, : kp // BLOCK_SIZE], self.shape[1], BLOCK_SIZE, "mxfp4")
        if not self.rank:
            return main, None
        return main, Quantized(self.qdata[:, kp // 2 :], self.scale[:, kp // BLOCK_SIZE :], self.rank, BLOCK_SIZE, "mxfp4")

    def quant_format(self):
        """The format object that quantizes this weight's activations."""
        from serq_ao.formats import MXFP4Format

        return MXFP4Format(self.scale_mode)

    def slice_columns(self, start: int, end: int) -> "SERQMXFP4Tensor":
        """Input columns [start, end) at block boundaries, with R's columns [start, min(end, r))
        (see :mod:`serq_ao.tensor_subclass.views`)."""
        check_column_range(self, start, end, BLOCK_SIZE, "MX block")
        kp, stop = padded_in_features(self.shape[1]), padded_in_features(end)
        rank = max(0, min(end, self.rank) - start)
        r_start, r_stop = kp + start, kp + start + rank  # R's columns, after W^q's Kp
        qdata = [self.qdata[:, start // 2 : stop // 2], self.qdata[:, r_start // 2 : r_stop // 2]]
        scale = [self.scale[:, start // BLOCK_SIZE : stop // BLOCK_SIZE],
                 self.scale[:, r_start // BLOCK_SIZE : r_stop // BLOCK_SIZE]]
        scale_inv = None if self.input_scale_inv is None else self.input_scale_inv[start:end].contiguous()
        return SERQMXFP4Tensor(torch.cat(qdata, dim=1), torch.cat(scale, dim=1), rank, self.scale_mode,
                               torch.Size((self.shape[0], end - start)), self.dtype, scale_inv, None, self.rotation)


implements = SERQMXFP4Tensor.implements
implements([aten._to_copy.default])(to_copy)
register_views(SERQMXFP4Tensor, row_fields=("qdata", "scale"))
implements_torch_function = SERQMXFP4Tensor.implements_torch_function


@implements([aten.linear.default])
@implements_torch_function([torch.nn.functional.linear])
def _(func, types, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    # the linear returns the weight's logical dtype (the model's), as F.linear would
    in_features, dtype = in_features_and_dtype(weight)
    out = linear_mxfp4(x, weight.qdata, weight.scale, in_features, weight.rank, weight.scale_mode,
                       weight.input_scale_inv, weight.input_perm, bias, rotation=weight.rotation)
    return out if out.dtype == dtype else out.to(dtype)
