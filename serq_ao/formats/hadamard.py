"""Block-diagonal Hadamard rotation of a linear's input (MR-GPTQ's "Hadamard-32").

A rotation of size b multiplies a linear's transformed input by an orthonormal block-diagonal
matrix H and its weight rows by the same H, so ``(X^ H)(W^ H)^T = X^ W^T``. The activation side
runs online, inside the activation quantization; the weight side is applied once, offline,
before the weight is quantized. It comes after SERQ's order, so the first r columns (the
salient ones, r a multiple of b or of 32) are rotated among themselves only when b divides r.

Blocks: b columns each from column 0; the t = K mod b columns left over are split by the
binary digits of t, largest first (K = 576 with b = 128: four blocks of 128, one of 64). Every
block starts at a multiple of its size, so column c's partner at butterfly stage h is c ^ h,
and a block's size is b below ``K - t``, else the highest set bit of ``t ^ (c - (K - t))``.

Numerics: the Sylvester-Hadamard butterfly, stages h = 1, 2, 4, ..., size / 2, each mapping the
pair (x_c, x_{c+h}) of a group of 2h columns to (x_c + x_{c+h}, x_c - x_{c+h}), in the dtype
it is given (float32 at run time, float64 for weights and Hessians), then one multiply by
1/sqrt(size) rounded to that dtype (:func:`inverse_sqrt_table`). The Triton kernel
(:mod:`serq_ao.kernels.triton_quantize`) does the same adds in the same order with the same
constants, so the two agree bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from serq_ao.formats.mxfp4 import cached_constant
from serq_ao.options import ROTATION_SIZES  # the choices, and why: there (the CLI reads them without torch)


def check_rotation(value, option: str = "rotation") -> int:
    """``value`` as a rotation size; a clear error naming ``option`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in ROTATION_SIZES:
        raise ValueError(f"{option} must be one of {ROTATION_SIZES} (block size of the Hadamard rotation; "
                         f"0: none), got {value!r}")
    return value


def rotation_blocks(columns: int, size: int) -> list[tuple[int, int]]:
    """(start, size) of every block of a rotation of ``size`` over ``columns`` (module doc)."""
    blocks = [(start, size) for start in range(0, columns - columns % size, size)]
    start, left = columns - columns % size, columns % size
    for bit in reversed(range(left.bit_length())):
        if left >> bit & 1:
            blocks.append((start, 1 << bit))
            start += 1 << bit
    return blocks


def inverse_sqrt_table(dtype: torch.dtype, device=None) -> Tensor:
    """(8,) the factors 1/sqrt(2**i) rounded to ``dtype``: entry i is block size 2**i's."""
    values = [1.0 / math.sqrt(1 << i) for i in range(max(ROTATION_SIZES).bit_length())]
    return cached_constant("hadamard_inverse_sqrt", values, dtype, torch.device("cpu") if device is None else device)


def _butterfly(x: Tensor, size: int) -> Tensor:
    """Unnormalized Hadamard of every ``size`` columns of x (..., n * size), stage by stage,
    between two buffers (x itself is never written)."""
    lead = x.shape[:-1]

    def buffer():  # contiguous, whatever x's layout, so that views of it pair the columns
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    source, target = x, buffer()
    h = 1
    while h < size:
        pairs = source.reshape(*lead, -1, 2, h)  # (..., groups of 2h, 2, h): columns c and c + h
        out = target.view(*lead, -1, 2, h)
        torch.add(pairs[..., 0, :], pairs[..., 1, :], out=out[..., 0, :])
        torch.sub(pairs[..., 0, :], pairs[..., 1, :], out=out[..., 1, :])
        source, target = target, (source if source is not x else buffer())
        h *= 2
    return source


def block_hadamard(x: Tensor, size: int) -> Tensor:
    """x (..., K) times the orthonormal block-diagonal Hadamard of ``size`` (module doc), in
    x's dtype; ``size`` 0 returns x."""
    if not size:
        return x
    columns = x.shape[-1]
    inverse_sqrt = inverse_sqrt_table(x.dtype, x.device)
    parts = []
    full = columns - columns % size
    if full:
        parts.append(_butterfly(x[..., :full], size) * inverse_sqrt[size.bit_length() - 1])
    for start, block in rotation_blocks(columns, size)[full // size:]:
        parts.append(_butterfly(x[..., start:start + block], block) * inverse_sqrt[block.bit_length() - 1])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def rotate_weight(weight: Tensor, size: int) -> Tensor:
    """W H (d_out, d_in), computed in float64 and returned in float32 (quantization's dtype)."""
    return block_hadamard(weight.double(), size).float() if size else weight


def rotate_hessian(hessian: Tensor, size: int) -> Tensor:
    """H^T Hess H, the Hessian of the rotated input (Sylvester H is symmetric), float64."""
    if not size:
        return hessian
    rotated_rows = block_hadamard(hessian.double(), size)  # Hess H
    return block_hadamard(rotated_rows.T.contiguous(), size).T.contiguous()  # (Hess H)^T H, transposed back
