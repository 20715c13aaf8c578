"""GPTQ (Frantar et al. 2023) for the INT group grid and the MXFP4 grid.

Columns are quantized left to right; each column's rounding error is spread over the columns
not yet quantized, weighted by the inverse Hessian of the layer input, ``H = X^T X``. SERQ
runs it on the flattened, saliency-ordered weight (after R is taken out), with H of the
transformed input, so the salient columns come first.

The grid is the format's (:class:`~serq_ao.formats.QuantFormat`): its scales are either
frozen from the whole weight before the sweep (MXFP4's blocks) or taken per group from the
current, already error-updated weights when the sweep reaches the group's first column
(INT4, as in the reference implementation); each column is then rounded to codes with its
scales. The result is the record of those codes and scales: nothing is re-quantized later.
"""

from __future__ import annotations

import logging

import torch

from serq_ao.formats import Quantized, QuantFormat

logger = logging.getLogger(__name__)

DEFAULT_DAMPING = 0.01
MAX_DAMPING = 10.0
SWEEP_BLOCK = 128  # columns updated lazily together; a multiple of every format's group


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
    fmt: QuantFormat,
    *,
    damping: float = DEFAULT_DAMPING,
) -> Quantized:
    """Quantize ``weight`` (d_out, K) with GPTQ against ``hessian`` (K, K) on ``fmt``'s grid;
    returns the record of the codes and scales."""
    group = fmt.weight_group_size
    if SWEEP_BLOCK % group:
        raise ValueError(f"GPTQ sweeps {SWEEP_BLOCK} columns at a time: the format's group ({group}) must divide it")
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0  # channels never active: nothing to preserve there
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_hessian_cholesky(h, damping)

    d_out, k = w.shape
    frozen = fmt.gptq_frozen_scales(w)  # (d_out, n_groups) or None
    scales = frozen if frozen is not None else torch.empty(d_out, -(-k // group), dtype=torch.float32, device=w.device)
    codes = torch.zeros(d_out, k, dtype=torch.int16, device=w.device)
    for start in range(0, k, SWEEP_BLOCK):
        stop = min(start + SWEEP_BLOCK, k)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        for j in range(stop - start):
            column = start + j
            if frozen is None and column % group == 0:  # the group's scale, from now
                scales[:, column // group] = fmt.gptq_group_scale(block[:, j : j + group])
            values = block[:, j]
            codes[:, column], q = fmt.gptq_round(values, scales[:, column // group])
            error = (values - q) / hinv[column, column]
            block[:, j:] -= error[:, None] * hinv[column, column : stop][None, :]
            errors[:, j] = error
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return fmt.gptq_record(codes, scales, k)
