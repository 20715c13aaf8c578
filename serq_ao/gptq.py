"""GPTQ (Frantar et al. 2023) for the INT group grid and the MXFP4 grid.

Columns are quantized left to right; each column's rounding error is spread over the columns
not yet quantized, weighted by the inverse Hessian of the layer input, ``H = X^T X``. SERQ
runs it on the flattened, saliency-ordered weight (after R is taken out), with H of the
transformed input, so the salient columns come first.

Grids:
- INT4 symmetric, groups along K: a group's scale is taken from the current (already
  error-updated) weights when the sweep reaches the group's first column, as in the
  reference implementation.
- MXFP4: the block scales are fixed from the weight before the sweep; columns are then
  rounded to the E2M1 grid times their block's scale.
"""

from __future__ import annotations

import logging

import torch

from serq_ao.formats.mxfp4 import BLOCK_SIZE, mxfp4_block_scales, round_to_e2m1
from serq_ao.simulate import INT_GROUP_SIZE

logger = logging.getLogger(__name__)

DEFAULT_DAMPING = 0.01
MAX_DAMPING = 10.0
SWEEP_BLOCK = 128  # columns updated lazily together; also the INT group, so they align
assert SWEEP_BLOCK == INT_GROUP_SIZE


def _inverse_hessian_cholesky(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, raising damping (x10) until H + damp * mean(diag) I is
    positive definite; never fails (falls back to the identity past MAX_DAMPING)."""
    size = hessian.shape[0]
    mean_diagonal = torch.diagonal(hessian).mean().clamp(min=1e-12)
    identity = torch.eye(size, dtype=hessian.dtype, device=hessian.device)
    while damping <= MAX_DAMPING:
        factor, info = torch.linalg.cholesky_ex(hessian + damping * mean_diagonal * identity)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
        logger.warning("GPTQ: Hessian not positive definite at damping %g; raising it", damping)
        damping *= 10
    logger.warning("GPTQ: giving up on the Hessian; this linear falls back to round-to-nearest")
    return identity


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: str,
    *,
    scale_mode: str = "floor",
    damping: float = DEFAULT_DAMPING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` (d_out, K) with GPTQ against ``hessian`` (K, K).

    Returns the dequantized weight, on the grid of ``fmt`` ("mxfp4", or INT4 groups of 128
    otherwise), and the scale of every column (d_out, K): the quantized weight divided by it
    is an E2M1 value, or an integer in [-8, 7].
    """
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0  # channels never active: nothing to preserve there
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_hessian_cholesky(h, damping)

    d_out, k = w.shape
    if fmt == "mxfp4":
        column_scale = mxfp4_block_scales(w.float(), scale_mode).double().repeat_interleave(BLOCK_SIZE, dim=-1)[:, :k]
    else:
        column_scale = torch.empty_like(w)
    quantized = torch.zeros_like(w)
    for start in range(0, k, SWEEP_BLOCK):
        stop = min(start + SWEEP_BLOCK, k)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        if fmt != "mxfp4":  # this sweep block is exactly one INT group: its scale, from now
            amax = block.abs().amax(dim=1)
            column_scale[:, start:stop] = torch.where(amax > 0, amax / 7, torch.ones_like(amax))[:, None]
        for j in range(stop - start):
            column = start + j
            values = block[:, j]
            scale = column_scale[:, column]
            if fmt == "mxfp4":
                q = round_to_e2m1(values, scale)
            else:
                q = torch.clamp(torch.round(values / scale), -8, 7) * scale
            quantized[:, column] = q
            error = (values - q) / hinv[column, column]
            block[:, j:] -= error[:, None] * hinv[column, column : stop][None, :]
            errors[:, j] = error
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return quantized.to(weight.dtype), column_scale.to(weight.dtype)
