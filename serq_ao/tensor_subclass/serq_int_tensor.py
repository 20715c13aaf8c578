"""SERQIntTensor: the weight of a SERQ linear in the INT formats (W4A8, W4A4), packed INT4."""

from __future__ import annotations

import torch
from torchao.utils import TorchAOBaseTensor

from serq_ao.formats.base import Quantized
from serq_ao.formats.integer import dequantize_int4_groups
from serq_ao.kernels.ops import linear_int
from serq_ao.tensor_subclass.common import compact_perm, in_features_and_dtype, to_copy
from serq_ao.tensor_subclass.views import check_column_range, register_views

aten = torch.ops.aten

class SERQIntTensor(TorchAOBaseTensor):
    """INT4 weight in groups along d_in, an INT4 correction R per row, and the pre-op.

    Tensor attributes:
        qdata: (N, Kp / 2) uint8, signed INT4 codes of W^q, two per byte, low first;
            Kp = d_in padded to a multiple of ``group_size``.
        scale: (N, Kp / group_size) float32, one scale per group.
        correction_qdata (optional): (N, r / 2) uint8, signed INT4 codes of R.
        correction_scale (optional): (N, 1) float32, one scale per row of R.
        input_scale_inv (optional): (d_in,) float32, the 1/s of the pre-op.
        input_perm (optional): (d_in,) int16 (int32 past 32768 channels), the pre-op's gather.

    Optional non-tensor attributes:
        rotation: the block size of the Hadamard rotation that ends the pre-op (0: none; see
            :mod:`serq_ao.formats.hadamard`). Weights saved before it existed read 0.

    Non-tensor attributes:
        group_size: weight and activation group along d_in (128).
        activation_bits: 8 (W4A8) or 4 (W4A4), asymmetric per token and group.
        shape: (N, d_in), the logical shape of the original weight.
        dtype: the logical dtype (that of the activations it multiplies).
    """

    tensor_data_names = ["qdata", "scale"]
    optional_tensor_data_names = ["correction_qdata", "correction_scale", "input_scale_inv", "input_perm"]
    tensor_attribute_names = ["group_size", "activation_bits", "shape", "dtype"]
    optional_tensor_attribute_names = ["rotation"]

    def __new__(cls, qdata, scale, group_size, activation_bits, shape, dtype, correction_qdata=None,
                correction_scale=None, input_scale_inv=None, input_perm=None, rotation=0):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata, scale, group_size, activation_bits, shape, dtype, correction_qdata=None,
                 correction_scale=None, input_scale_inv=None, input_perm=None, rotation=0):
        super().__init__()
        self.rotation = 0 if rotation is None else rotation
        self.qdata, self.scale = qdata, scale
        self.group_size, self.activation_bits = group_size, activation_bits
        self.correction_qdata, self.correction_scale = correction_qdata, correction_scale
        self.input_scale_inv, self.input_perm = input_scale_inv, input_perm

    @property
    def rank(self) -> int:
        return 0 if self.correction_qdata is None else 2 * self.correction_qdata.shape[1]

    @classmethod
    def from_quantized(
        cls,
        main: Quantized,
        correction: Quantized | None,
        *,
        activation_bits: int,
        input_scale_inv: torch.Tensor | None = None,
        input_perm: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        rotation: int = 0,
    ) -> "SERQIntTensor":
        """Pack the INT4 records of W^q (N, d_in, groups along d_in) and R (N, r, one scale
        per row): their codes and scales are stored as they are."""
        if activation_bits not in (4, 8):
            raise ValueError(f"activation_bits must be 4 or 8, got {activation_bits!r}")
        for what, record in (("main", main), ("correction", correction)):
            if record is not None and record.grid != "int4":
                raise ValueError(f"{what} must be an INT4 record, got grid {record.grid!r}")
        correction_qdata = correction_scale = None
        if correction is not None:
            if correction.rows != main.rows or correction.scale.shape != (main.rows, 1):
                raise ValueError("correction must be an INT4 record with one scale per row of the main weight")
            correction_qdata, correction_scale = correction.qdata.contiguous(), correction.scale.contiguous()
        return cls(main.qdata.contiguous(), main.scale.contiguous(), main.group_size, activation_bits,
                   torch.Size((main.rows, main.columns)), dtype, correction_qdata, correction_scale,
                   None if input_scale_inv is None else input_scale_inv.float().contiguous(), compact_perm(input_perm),
                   rotation)

    def _stable_hash_for_caching(self) -> str:
        """What compiled code depends on: layout and attributes, not the weight values."""
        optional = tuple(getattr(self, n) is not None for n in self.optional_tensor_data_names)
        return (f"SERQIntTensor:{tuple(self.shape)}:{tuple(self.qdata.shape)}:{self.rank}:{self.group_size}:"
                f"{self.activation_bits}:{self.dtype}:{optional}:{self.rotation}")

    def dequantize(self) -> torch.Tensor:
        """W^q (N, d_in), float32 (R is not part of the logical weight)."""
        return dequantize_int4_groups(self.qdata, self.scale, self.shape[1]).contiguous()

    def correction(self) -> torch.Tensor | None:
        """R (N, r), float32, or None for r = 0."""
        if self.correction_qdata is None:
            return None
        return dequantize_int4_groups(self.correction_qdata, self.correction_scale, self.rank).contiguous()

    def records(self) -> tuple[Quantized, Quantized | None]:
        """The records this weight was packed from: (W^q, R or None)."""
        main = Quantized(self.qdata, self.scale, self.shape[1], self.group_size, "int4")
        if self.correction_qdata is None:
            return main, None
        return main, Quantized(self.correction_qdata, self.correction_scale, self.rank, self.rank, "int4")

    def quant_format(self):
        """The format object that quantizes this weight's activations."""
        from serq_ao.formats import IntFormat, FormatName

        name = FormatName.W4A8 if self.activation_bits == 8 else FormatName.W4A4
        return IntFormat(name, self.activation_bits, self.group_size)

    def slice_columns(self, start: int, end: int) -> "SERQIntTensor":
        """Input columns [start, end) at group boundaries, with R's columns [start, min(end, r))
        (see :mod:`serq_ao.tensor_subclass.views`); R keeps its per-row scales."""
        check_column_range(self, start, end, self.group_size, "group")
        g = self.group_size
        stop = -(-end // g) * g
        rank = max(0, min(end, self.rank) - start)
        correction_qdata = correction_scale = None
        if rank:
            correction_qdata = self.correction_qdata[:, start // 2 : (start + rank) // 2].contiguous()
            correction_scale = self.correction_scale
        scale_inv = None if self.input_scale_inv is None else self.input_scale_inv[start:end].contiguous()
        qdata = self.qdata[:, start // 2 : stop // 2].contiguous()
        return SERQIntTensor(qdata, self.scale[:, start // g : stop // g].contiguous(), g, self.activation_bits, torch.Size((self.shape[0], end - start)), self.dtype,
                             correction_qdata, correction_scale, scale_inv, None, self.rotation)


implements = SERQIntTensor.implements
implements([aten._to_copy.default])(to_copy)
register_views(SERQIntTensor, row_fields=("qdata", "scale", "correction_qdata", "correction_scale"))
implements_torch_function = SERQIntTensor.implements_torch_function


@implements([aten.linear.default])
@implements_torch_function([torch.nn.functional.linear])
def _(func, types, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    # the linear returns the weight's logical dtype (the model's), as F.linear would
    in_features, dtype = in_features_and_dtype(weight)
    out = linear_int(x, weight.qdata, weight.scale, in_features, weight.group_size, weight.activation_bits,
                     weight.correction_qdata, weight.correction_scale, weight.input_scale_inv, weight.input_perm, bias,
                     rotation=weight.rotation)
    return out if out.dtype == dtype else out.to(dtype)
