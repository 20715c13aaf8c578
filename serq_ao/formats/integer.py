"""Integer quantization (2 to 8 bits), symmetric or asymmetric, along the last dimension.

The formulas are those of the GPTQ / QuaRot reference quantizers that the SERQ paper's code
uses, so that our fake-quantized models reproduce the paper's numbers:

- symmetric: ``qmax = 2**(bits-1) - 1``, ``scale = amax / qmax``,
  ``q = clamp(round(x / scale), -qmax - 1, qmax)``, ``x ~ q * scale``. Codes are int8. Since
  ``|x| <= amax`` the code ``-qmax - 1`` is reached only where the scale is subnormal
  (amax below ~qmax * 1.2e-38) and so rounded well off ``amax / qmax``.
- asymmetric: the range ``[min(x, 0), max(x, 0)]`` always contains 0, so 0 (padding, ReLU
  outputs) is exact; ``scale = (xmax - xmin) / (2**bits - 1)``, ``zero = round(-xmin / scale)``,
  ``q = clamp(round(x / scale) + zero, 0, 2**bits - 1)``, ``x ~ (q - zero) * scale``. Codes
  are uint8, zero points int32.

``round`` is ``torch.round`` (half to even) applied to ``x / scale``: we divide rather than
multiply by a reciprocal because the references do, and ``x * (1 / scale)`` rounds
differently near ties.

Fake quantization is idempotent for symmetric formats (exactly, for fp32 and normal scales:
``fl(fl(qmax * s) / qmax) == s`` when ``s = fl(amax / qmax)``), but not for asymmetric ones:
where ``-xmin / scale`` is a rounding tie, the top of the range loses a step and a second
pass sees a narrower range, hence a smaller scale.

A group whose scale is 0 (all zeros, or so tiny that ``amax / qmax`` underflows fp32) gets
scale 1 and zero point 0: no division by zero, and it dequantizes to exact zeros. (GPTQ
instead widens such a range to [-1, 1]; the dequantized zeros are the same.)

Symmetric scales chosen by error (:func:`quantize_int_by_error`, a weight's
``weight_scales="search"``): per group, ``scale = amax * f / qmax`` for the fraction ``f`` in
:data:`SCALE_SHRINKS` (1, the rule above, down to 0.5) whose codes have the smallest squared
error, the rule on a tie. Shrinking clips the group's few largest values to ``qmax * scale``
and rounds all the others on a finer grid; for bell-shaped groups, as rotated weights are,
the optimum lies near 0.8 of the maximum. Still plain symmetric INT with a float32 scale.

Granularity (one scale, and zero point, per group):

- ``"tensor"``: one group, the whole tensor; scale is a 0-d tensor.
- ``"channel"`` and ``"token"``: aliases, one group per row of the last dimension: per output
  channel of a weight (d_out, d_in), per token of an activation (..., d). Scale (*lead, 1).
- an int ``g > 0``: groups of ``g`` consecutive elements along the last dimension; scale
  (*lead, ceil(K / g)). When ``g`` does not divide K the last group is partial: we pad it with
  zeros internally, which cannot change its scale because every range contains 0 anyway.

Arithmetic is float32 for every input dtype: fp16 and bf16 are upcast (exactly), and fp64 is
rounded to fp32, since the stored scale is fp32 and the codes must agree with it. Inputs must
be finite in fp32 (for asymmetric, so must ``max - min``): a group with a NaN or ±inf (or
whose asymmetric range overflows fp32) gets a NaN scale and dequantizes to NaN, exactly that
group, without an error on the hot path; MXFP4 does the same per block. Everything branches
only on shapes, so the quantizers run under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

GRANULARITIES = ("tensor", "channel", "token")
# the fractions of a group's max |x| that a symmetric scale chosen by error tries: 1 (the
# rule) down to 0.5 in steps of 0.02. A bell-shaped group's best clip lies well inside that
# range (0.66 to 1 for the rotated INT4 weights of the default model, most near 0.82)
SCALE_SHRINKS = tuple(1 - k / 50 for k in range(26))
MIN_BITS, MAX_BITS = 2, 8
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True, eq=False)
class IntQuantized:
    """Integer codes plus what :func:`dequantize_int` needs to turn them back into floats.

    ``eq=False`` because field-wise ``==`` on tensors has no single truth value.
    ``granularity`` is kept as the caller spelled it ("channel" and "token" stay distinct
    labels for the same layout).
    """

    q: Tensor  # int8 (symmetric) or uint8 (asymmetric), same shape as the input
    scale: Tensor  # float32: () per tensor, (*lead, 1) per channel, (*lead, n_groups) per group
    zero_point: Tensor | None  # int32, shaped like scale (asymmetric); None (symmetric)
    bits: int
    symmetric: bool
    granularity: str | int
    shape: torch.Size  # the input's shape


def _check_bits(bits: int) -> None:
    # bool is an int subclass, but bits=True is surely a mistake.
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def _check_granularity(granularity: str | int) -> None:
    if isinstance(granularity, str):
        ok = granularity in GRANULARITIES
    else:
        ok = isinstance(granularity, int) and not isinstance(granularity, bool) and granularity > 0
    if not ok:
        raise ValueError(
            "granularity must be 'tensor', 'channel', 'token' or a positive int group size, "
            f"got {granularity!r}"
        )


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dtype not in _FLOAT_DTYPES:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a float16, bfloat16, float32 or float64 tensor, got {got}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(
            f"x must have at least 1 dimension and a non-empty last one, got shape {tuple(x.shape)}"
        )


def _to_groups(x: Tensor, granularity: str | int) -> Tensor:
    """(..., K) -> (..., n_groups, group_size), zero-padded; per tensor (1, 1, numel).

    The one layout lets every granularity share the same reduction over the last dim.
    """
    if granularity == "tensor":
        x = x.reshape(1, -1)
        size = max(x.shape[-1], 1)  # an empty tensor still gets one (padded) group
    elif isinstance(granularity, str):  # "channel" / "token"
        size = x.shape[-1]
    else:
        size = granularity
    n_groups = max(-(-x.shape[-1] // size), 1)
    pad = n_groups * size - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.unflatten(-1, (n_groups, size))


def _from_groups(groups: Tensor, granularity: str | int, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_to_groups`: drop the padding and restore ``shape``."""
    keep = shape.numel() if granularity == "tensor" else shape[-1]
    return groups.flatten(-2)[..., :keep].reshape(shape)


def _quantize(
    x: Tensor, bits: int, symmetric: bool, granularity: str | int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Unchecked core of :func:`quantize_int`: (q, scale, zero_point) in the public layout."""
    groups = _to_groups(x.float(), granularity)  # (..., G, g) float32
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = _nonzero(groups.abs().amax(dim=-1, keepdim=True) / qmax)
        q = _symmetric_codes(groups, scale, qmax).to(torch.int8)
        zero = None
    else:
        levels = 2**bits - 1
        xmin = groups.amin(dim=-1, keepdim=True).clamp(max=0)
        xmax = groups.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = _nonzero((xmax - xmin) / levels)
        zero_f = torch.round(-xmin / scale)  # in [0, levels]: xmin <= 0 <= xmax
        q = torch.clamp(torch.round(groups / scale) + zero_f, 0, levels).to(torch.uint8)
        zero = zero_f.to(torch.int32).squeeze(-1)
    return _public_layout(q, scale, zero, granularity, x.shape)


def _nonzero(scale: Tensor) -> Tensor:
    """A zero scale (an all-zero or underflowing group) becomes 1: its codes are all 0."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _symmetric_codes(groups: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """The symmetric codes of ``groups`` (..., G, g) on ``scale`` (..., G, 1), as floats."""
    return torch.clamp(torch.round(groups / scale), -qmax - 1, qmax)


def _public_layout(q: Tensor, scale: Tensor, zero: Tensor | None, granularity: str | int,
                   shape: torch.Size) -> tuple[Tensor, Tensor, Tensor | None]:
    """Grouped codes and (..., G, 1) scales to :class:`IntQuantized`'s layout."""
    # inf scales (inf inputs, overflowing ranges) would dequantize to inf or 0 * inf: NaN instead
    scale = torch.where(torch.isfinite(scale), scale, torch.full_like(scale, float("nan"))).squeeze(-1)
    if granularity == "tensor":  # (1, 1) -> ()
        scale = scale.reshape(())
        zero = None if zero is None else zero.reshape(())
    return _from_groups(q, granularity, shape), scale, zero


def symmetric_scales_by_error(groups: Tensor, bits: int) -> Tensor:
    """Per group of ``groups`` (..., G, g) float32, the scale among ``amax * f / qmax``
    (``f`` in :data:`SCALE_SHRINKS`) whose symmetric codes have the smallest squared error,
    the rule's (``f = 1``, first) on a tie; (..., G, 1) float32. The error is summed in float64
    over the values the codes dequantize to in float32."""
    rows = groups.reshape(-1, groups.shape[-1])  # (N, g)
    # a few rows of groups at a time: the float64 temporaries of a large weight stay small
    step = max(1, _SEARCH_CHUNK_ELEMENTS // max(rows.shape[1], 1))
    chunks = [_best_scales(rows[start:start + step], bits) for start in range(0, rows.shape[0], step)]
    return torch.cat(chunks).reshape(*groups.shape[:-1], 1)


_SEARCH_CHUNK_ELEMENTS = 1 << 22


def _best_scales(rows: Tensor, bits: int) -> Tensor:
    """:func:`symmetric_scales_by_error` of groups (N, g) float32: (N, 1)."""
    qmax = 2 ** (bits - 1) - 1
    amax = rows.abs().amax(dim=-1, keepdim=True)
    exact = rows.double()
    best_scale = best_error = None
    for shrink in SCALE_SHRINKS:
        scale = _nonzero(amax * shrink / qmax)  # shrink 1: bitwise the rule's amax / qmax
        values = _symmetric_codes(rows, scale, qmax) * scale  # what the codes dequantize to, float32
        error = (values.double() - exact).square().sum(-1, keepdim=True)
        if best_scale is None:
            best_scale, best_error = scale, error
        else:
            better = error < best_error  # strictly: a tie keeps the larger scale; NaN never wins
            best_scale, best_error = torch.where(better, scale, best_scale), torch.where(better, error, best_error)
    return best_scale


def quantize_int_by_error(x: Tensor, bits: int, *, granularity: str | int = "channel") -> IntQuantized:
    """Symmetric :func:`quantize_int` with each group's scale chosen by its error
    (:func:`symmetric_scales_by_error`; module doc). Same checks and layout."""
    _check_bits(bits)
    _check_granularity(granularity)
    _check_input(x)
    groups = _to_groups(x.float(), granularity)  # (..., G, g) float32
    scale = symmetric_scales_by_error(groups, bits)
    q = _symmetric_codes(groups, scale, 2 ** (bits - 1) - 1).to(torch.int8)
    q, scale, _ = _public_layout(q, scale, None, granularity, x.shape)
    return IntQuantized(q, scale, None, bits, True, granularity, x.shape)


def _dequantize(
    q: Tensor, scale: Tensor, zero: Tensor | None, granularity: str | int, dtype: torch.dtype
) -> Tensor:
    """Unchecked core of :func:`dequantize_int`, in float32 then cast to ``dtype``."""
    groups = _to_groups(q.to(torch.float32), granularity)  # (..., G, g)
    group_shape = groups.shape[:-1] + (1,)
    values = groups
    if zero is not None:
        values = values - zero.to(torch.float32).reshape(group_shape)
    values = values * scale.reshape(group_shape)
    return _from_groups(values, granularity, q.shape).to(dtype)


def quantize_int(
    x: Tensor, bits: int, *, symmetric: bool = True, granularity: str | int = "channel"
) -> IntQuantized:
    """Quantize ``x`` (..., K) to ``bits``-bit integers along the last dimension.

    See the module docstring for the formulas, the layouts and the float32 arithmetic.
    Raises ValueError for bits outside 2..8, an unknown granularity, a non-float ``x`` or
    one without a non-empty last dimension.
    """
    _check_bits(bits)
    _check_granularity(granularity)
    _check_input(x)
    q, scale, zero = _quantize(x, bits, symmetric, granularity)
    return IntQuantized(q, scale, zero, bits, symmetric, granularity, x.shape)


def dequantize_int(q: IntQuantized, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q.q`` back to floats, shape ``q.shape``: ``q * scale`` or ``(q - zero) * scale``.

    Computed in float32 whatever ``dtype`` is, so that ``dequantize_int(q, torch.float64)``
    equals ``dequantize_int(q).double()`` and fp64 callers see the same values as fp32 ones.
    """
    return _dequantize(q.q, q.scale, q.zero_point, q.granularity, dtype)


def fake_quantize_int(
    x: Tensor, bits: int, *, symmetric: bool = True, granularity: str | int = "channel"
) -> Tensor:
    """Quantize and dequantize: the representable value of every element, in ``x``'s dtype.

    Equals ``dequantize_int(quantize_int(x, ...)).to(x.dtype)``; it skips building the
    :class:`IntQuantized` record so that the compiled graph stays plain tensor code.
    """
    _check_bits(bits)
    _check_granularity(granularity)
    _check_input(x)
    q, scale, zero = _quantize(x, bits, symmetric, granularity)
    return _dequantize(q, scale, zero, granularity, x.dtype)


def pack_int4(q: Tensor) -> Tensor:
    """(..., 2n) int8 in [-8, 7] or uint8 in [0, 15] -> (..., n) uint8, two codes per byte.

    Element ``2i`` goes in the low nibble and ``2i + 1`` in the high nibble (torchao's and
    :func:`serq_ao.formats.mxfp4.pack_uint4`'s order); signed codes are stored as their
    4-bit two's complement. The range check reads the data (a device sync on GPU), which is
    acceptable here: packing happens once, when a checkpoint is written, not per forward.
    """
    if q.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"q must be an int8 or uint8 tensor, got {q.dtype}")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"q must have an even last dimension, got shape {tuple(q.shape)}")
    low, high = (-8, 7) if q.dtype == torch.int8 else (0, 15)
    if q.numel() and (q.min().item() < low or q.max().item() > high):
        raise ValueError(
            f"q values must lie in [{low}, {high}] for {q.dtype}, "
            f"got [{q.min().item()}, {q.max().item()}]"
        )
    nibbles = q.view(torch.uint8) & 0xF  # the int8 -> uint8 view keeps two's complement bits
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: Tensor, signed: bool) -> Tensor:
    """(..., n) uint8 -> (..., 2n) codes: int8 in [-8, 7] if ``signed``, else uint8 in [0, 15]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got {packed.dtype}")
    if signed:
        # Move each nibble to the top of an int8, then shift right arithmetically to sign-extend.
        low = (packed << 4).view(torch.int8) >> 4
        high = packed.view(torch.int8) >> 4
    else:
        low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def _signed_int4_byte_table(device: torch.device) -> Tensor:
    """(256, 2) float32: the two signed INT4 codes (low nibble first) of each byte."""
    from serq_ao.formats.mxfp4 import cached_constant

    def build():
        return unpack_int4(torch.arange(256, dtype=torch.uint8, device=device), signed=True).float().view(256, 2)

    return cached_constant("signed_int4_byte_table", build, torch.float32, device)


def dequantize_int4_groups(qdata: Tensor, scale: Tensor, columns: int) -> Tensor:
    """(N, G * g / 2) packed signed INT4 codes and (N, G) float32 scales -> (N, columns) float32.

    One table lookup per byte (as :func:`serq_ao.formats.mxfp4.dequantize_mxfp4`): the packed
    linears run this on every call. Each value is ``code * scale`` in float32, the product
    :func:`fake_quantize_int` computes."""
    codes = F.embedding(qdata.to(torch.int32), _signed_int4_byte_table(qdata.device))  # (N, G * g / 2, 2)
    groups = codes.reshape(qdata.shape[0], scale.shape[-1], -1) * scale.unsqueeze(-1)  # (N, G, g)
    return groups.flatten(-2)[:, :columns]
