"""SERQIntTensor: the weight of a SERQ linear in the INT formats (W4A8, W4A4), packed INT4."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from serq_ao.formats.integer import pack_int4
from serq_ao.kernels.ops import dequantize_int4_groups, padded_in_features, serq_linear_int
from serq_ao.tensor_subclass.common import check_exact, compact_perm

aten = torch.ops.aten

# Weights computed in float64 (GPTQ) and rounded to float32 may differ from code * scale in
# the last bit; anything larger means the weight was not on the INT4 grid.
GRID_RTOL = 2.0**-20
# The largest |code| of a group is usually 7 (round to nearest), but GPTQ fixes a group's
# scale before it updates the group's columns, so the largest code may be anything in 1..8.
_CANDIDATE_MAX_CODES = (7.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0)


def infer_int4_scales(values: torch.Tensor) -> torch.Tensor:
    """Per-group scales of values (..., g) already on a symmetric INT4 grid: the first of
    ``amax / k`` (k in _CANDIDATE_MAX_CODES) on which every value of the group is an integer
    code in [-8, 7]; 1 for an all-zero group."""
    amax = values.abs().amax(dim=-1, keepdim=True)
    chosen = torch.zeros_like(amax)
    for k in _CANDIDATE_MAX_CODES:
        scale = torch.where(amax > 0, amax / k, torch.ones_like(amax))
        codes = torch.round(values / scale)
        fits = ((codes * scale - values).abs() <= GRID_RTOL * values.abs()).all(dim=-1, keepdim=True)
        fits &= ((codes >= -8) & (codes <= 7)).all(dim=-1, keepdim=True)
        chosen = torch.where((chosen == 0) & fits, scale, chosen)
    if bool((chosen == 0).any()):
        raise ValueError("weight is not on a symmetric INT4 grid: pack weights produced by serq_ao's quantizers")
    return chosen.squeeze(-1)


def _pack_groups(values: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) on the grid -> packed codes (N, Kp / 2) and scales (N, Kp / group_size)."""
    padded = F.pad(values.float(), (0, padded_in_features(values.shape[1], group_size) - values.shape[1]))
    groups = padded.unflatten(-1, (-1, group_size))  # (N, G, g)
    scale = infer_int4_scales(groups)  # (N, G)
    codes = torch.round(groups / scale.unsqueeze(-1)).flatten(-2).to(torch.int8)
    return pack_int4(codes), scale


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

    Non-tensor attributes:
        group_size: weight and activation group along d_in (128).
        activation_bits: 8 (W4A8) or 4 (W4A4), asymmetric per token and group.
        shape: (N, d_in), the logical shape of the original weight.
        dtype: the logical dtype (that of the activations it multiplies).
    """

    tensor_data_names = ["qdata", "scale"]
    optional_tensor_data_names = ["correction_qdata", "correction_scale", "input_scale_inv", "input_perm"]
    tensor_attribute_names = ["group_size", "activation_bits", "shape", "dtype"]

    def __new__(cls, qdata, scale, group_size, activation_bits, shape, dtype, correction_qdata=None,
                correction_scale=None, input_scale_inv=None, input_perm=None):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata, scale, group_size, activation_bits, shape, dtype, correction_qdata=None,
                 correction_scale=None, input_scale_inv=None, input_perm=None):
        super().__init__()
        self.qdata, self.scale = qdata, scale
        self.group_size, self.activation_bits = group_size, activation_bits
        self.correction_qdata, self.correction_scale = correction_qdata, correction_scale
        self.input_scale_inv, self.input_perm = input_scale_inv, input_perm

    @property
    def rank(self) -> int:
        return 0 if self.correction_qdata is None else 2 * self.correction_qdata.shape[1]

    @classmethod
    def from_dequantized(
        cls,
        main: torch.Tensor,
        correction: torch.Tensor | None,
        *,
        activation_bits: int,
        group_size: int = 128,
        input_scale_inv: torch.Tensor | None = None,
        input_perm: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "SERQIntTensor":
        """Pack W^q (N, d_in) on the grid of symmetric INT4 groups of ``group_size`` and R
        (N, r) on the grid of symmetric INT4 rows; the result is checked against both."""
        if activation_bits not in (4, 8):
            raise ValueError(f"activation_bits must be 4 or 8, got {activation_bits!r}")
        d_out, d_in = main.shape
        qdata, scale = _pack_groups(main, group_size)
        correction_qdata = correction_scale = None
        if correction is not None:
            correction_qdata, correction_scale = _pack_groups(correction, correction.shape[1])
        packed = cls(qdata, scale, group_size, activation_bits, torch.Size((d_out, d_in)), dtype,
                     correction_qdata, correction_scale, input_scale_inv, compact_perm(input_perm))
        check_exact("main weight", packed.dequantize(), main, GRID_RTOL)
        if correction is not None:
            check_exact("correction", packed.correction(), correction, GRID_RTOL)
        return packed

    def _stable_hash_for_caching(self) -> str:
        """What compiled code depends on: layout and attributes, not the weight values."""
        optional = tuple(getattr(self, n) is not None for n in self.optional_tensor_data_names)
        return (f"SERQIntTensor:{tuple(self.shape)}:{tuple(self.qdata.shape)}:{self.rank}:{self.group_size}:"
                f"{self.activation_bits}:{self.dtype}:{optional}")

    def dequantize(self) -> torch.Tensor:
        """W^q (N, d_in), float32 (R is not part of the logical weight)."""
        return dequantize_int4_groups(self.qdata, self.scale, self.shape[1])

    def correction(self) -> torch.Tensor | None:
        """R (N, r), float32, or None for r = 0."""
        if self.correction_qdata is None:
            return None
        return dequantize_int4_groups(self.correction_qdata, self.correction_scale, self.rank)


implements = SERQIntTensor.implements
implements_torch_function = SERQIntTensor.implements_torch_function


@implements([aten.linear.default])
@implements_torch_function([torch.nn.functional.linear])
def _(func, types, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return serq_linear_int(
        x, weight.qdata, weight.scale, weight.shape[1], weight.group_size, weight.activation_bits,
        weight.correction_qdata, weight.correction_scale, weight.input_scale_inv, weight.input_perm, bias,
    )
