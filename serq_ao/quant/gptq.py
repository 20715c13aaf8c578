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

The sweep order (:class:`GPTQOrder`): ``"columns"``, left to right (for SERQ, the salient
columns first, as its order puts them); or ``"hessian"``, the static activation order of
MR-GPTQ (Egiazarian et al. 2025): columns by decreasing H_jj, the input energy they carry,
so that the columns whose error costs most are rounded while the most columns are left to
absorb it. Scales stay those of the columns' own groups in the stored layout, fixed before
the sweep ("static groups"; INT4's taken from the weight as it is then), so the record and
the kernels do not change.
"""

from __future__ import annotations

import logging

import torch

from serq_ao.formats import Quantized, QuantFormat, enum_value
# the orders (module doc) are named where the command line reads them without importing torch
from serq_ao.options import GPTQ_ORDERS, GPTQOrder  # noqa: F401

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
    order: GPTQOrder | str = GPTQOrder.COLUMNS,
) -> Quantized:
    """Quantize ``weight`` (d_out, K) with GPTQ against ``hessian`` (K, K) on ``fmt``'s grid,
    sweeping the columns in ``order``; returns the record of the codes and scales."""
    order = enum_value(GPTQOrder, order, "gptq_order")
    group = fmt.weight_group_size
    if SWEEP_BLOCK % group:
        raise ValueError(f"GPTQ sweeps {SWEEP_BLOCK} columns at a time: the format's group ({group}) must divide it")
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0  # channels never active: nothing to preserve there
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    d_out, k = w.shape
    frozen = fmt.gptq_frozen_scales(w)  # (d_out, n_groups) or None
    sweep = torch.arange(k, device=w.device)  # sweep position -> stored column
    if order is GPTQOrder.HESSIAN:
        if frozen is None:  # static groups: every group's scale from the weight before the sweep
            frozen = torch.stack([fmt.gptq_group_scale(w[:, g:g + group]) for g in range(0, k, group)], dim=1)
        sweep = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, sweep], h[sweep][:, sweep]
    hinv = _inverse_hessian_cholesky(h, damping)
    scales = frozen if frozen is not None else torch.empty(d_out, -(-k // group), dtype=torch.float32, device=w.device)
    group_of = (sweep // group).tolist()  # the stored group of each swept column
    stored = sweep.tolist()
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
            codes[:, stored[column]], q = fmt.gptq_round(values, scales[:, group_of[column]])
            error = (values - q) / hinv[column, column]
            block[:, j:] -= error[:, None] * hinv[column, column : stop][None, :]
            errors[:, j] = error
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return fmt.gptq_record(codes, scales, k)
