"""The per-linear math of each method, as pure functions of tensors (no modules, no hooks).

Quantizers return :class:`~serq_ao.formats.Quantized` records (codes and scales); whatever
needs the values dequantizes the record.
"""

from __future__ import annotations

import torch

from serq_ao.formats import Quantized, QuantFormat, fake_quantize_int


# Flattening maps each channel's calibration maximum to |x / s| = 1.0, a power of two: the
# FLOOR block-scale rule is discontinuous there. Exactly 1.0 gives e = -2 and the element
# lands on the grid (4 * 2**-2); one ulp below (as folding 1/s into a norm weight can round)
# gives e = -3 and clips it from ~8 to 6, a 25% error on the most salient value, for tokens
# such as the BOS position that recur in every window. Shrinking s by 2**-20 puts that value
# just above 1.0 whichever way fp32 rounds, matching runtime division, at a cost of 1e-6.
FLATTEN_SHRINK = 1.0 - 2.0**-20


def flattening_scales(amax: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """s = (max |x|)**strength per channel (1 for a channel that was always zero).

    ``strength`` 1 is the paper's flattening (see FLATTEN_SHRINK); 0 gives s = 1 exactly
    (no flattening: every fold is a no-op); in between, SmoothQuant's migration of part of
    each channel's range into the weights. Saliency is always ranked by max |x| itself
    (:func:`saliency_order` of the strength-1 scales), whatever the strength."""
    if strength == 0:
        return torch.ones_like(amax)
    base = torch.where(amax > 0, amax, torch.ones_like(amax))
    return (base if strength == 1 else base.pow(strength)) * FLATTEN_SHRINK


def saliency_order(scales: torch.Tensor, block: int = 0) -> torch.Tensor:
    """pi: channels by flattening scale, largest first (stable, so ties keep channel order).

    With ``block`` > 0, pi moves whole blocks instead: the full blocks of ``block``
    consecutive channels by their largest scale, largest first (stable); the channels inside a
    block, and the tail past the last full block, keep their order. This is for a block
    rotation of that size (:mod:`serq_ao.formats.hadamard`): the rotation mixes a block's
    channels, so saliency is the block's, and keeping the model's own blocks keeps what the
    rotation mixes (an outlier channel among ordinary ones) instead of putting the outliers
    together in the first blocks."""
    if not block:
        return torch.sort(scales, descending=True, stable=True).indices
    full = scales.numel() // block * block
    blocks = torch.sort(scales[:full].reshape(-1, block).amax(dim=1), descending=True, stable=True).indices
    head = (blocks[:, None] * block + torch.arange(block, device=scales.device)).flatten()
    return torch.cat([head, torch.arange(full, scales.numel(), device=scales.device)])


def salient_order(amax: torch.Tensor, block: int = 0) -> torch.Tensor:
    """SERQ's pi from the calibration maxima: by max |x| itself (the strength-1 scales),
    whatever the flattening strength; by channels, or by blocks of ``block`` (> 0)."""
    return saliency_order(flattening_scales(amax), block)


def residual_stream_order(scales: list[torch.Tensor]) -> torch.Tensor:
    """One saliency order for the residual stream from the flattening scales of every group
    that reads it: channels by their mean share of each group's largest scale, largest first.

    Each group counts alike whatever its activation range; a channel that is large in most
    layers (the stream's persistent outlier channels) comes first."""
    shares = torch.stack([s.double() / s.double().max() for s in scales]).mean(dim=0)
    return torch.sort(shares, descending=True, stable=True).indices


def smoothquant_scales(amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|x_j|**alpha / max|w_j|**(1 - alpha), max|w_j| over all rows of
    the group's linears; channels with a zero statistic get 1."""
    weight_amax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).float()
    scales = amax.float().clamp(min=0) ** alpha / weight_amax.clamp(min=1e-12) ** (1 - alpha)
    return torch.where((amax > 0) & (weight_amax > 0), scales, torch.ones_like(scales))


def serq_reconstruct(weight: torch.Tensor, rank: int, fmt: QuantFormat) -> tuple[Quantized, Quantized | None]:
    """Single-matrix error reconstruction on a flattened, saliency-ordered weight W^ (d_out, K).

    ``R = Q(W^[:, :r])``; the main weight keeps the residual on those columns,
    ``W^[:, :r] -= R``, then ``W^q = Q(W^)``. Returns the records of (W^q, R), R None for
    r = 0. The salient columns are thus quantized twice; R needs no SVD.
    """
    if rank == 0:
        return fmt.quantize_weight(weight), None
    correction = salient_correction(weight, rank, fmt)
    return fmt.quantize_weight(residual_after(weight, correction)), correction


def salient_correction(weight: torch.Tensor, rank: int, fmt: QuantFormat) -> Quantized:
    """R = Q(W^[:, :r]), the record of SERQ's correction (d_out, r)."""
    if rank > weight.shape[1]:
        raise ValueError(f"rank ({rank}) must be at most d_in ({weight.shape[1]})")
    return fmt.quantize_correction(weight[:, :rank])


def residual_after(weight: torch.Tensor, correction: Quantized | None) -> torch.Tensor:
    """W^ with R taken out of its first r columns (float32): what the main weight quantizes."""
    residual = weight.float().clone()
    if correction is not None:
        residual[:, : correction.columns] -= correction.dequantize()
    return residual


def lowrank_error_factors(
    weight: torch.Tensor, weight_q: torch.Tensor, rank: int, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LQER: the rank-k SVD of the quantization error ``E = W - Q(W) ~ A @ B``.

    L2QER (``input_scale`` s, e.g. mean |x| per input channel): the SVD of ``E diag(s)``,
    so the channels that carry large activations are reconstructed first, then
    ``B <- B diag(s)^-1``. Returns A (d_out, k) and B (k, d_in), each quantized to symmetric
    INT8 per row, as LQER stores them.
    """
    if not 0 < rank <= min(weight.shape):
        raise ValueError(f"rank must be in [1, {min(weight.shape)}], got {rank}")
    error = (weight.double() - weight_q.double())  # (d_out, d_in)
    if input_scale is not None:
        scale = input_scale.double().clamp(min=1e-8)
        error = error * scale
    u, singular, vh = torch.linalg.svd(error, full_matrices=False)
    a, b = u[:, :rank] * singular[:rank], vh[:rank]
    if input_scale is not None:
        b = b / scale
    # contiguous: the layout a saved and reloaded factor has (the CPU matmul may round the
    # last bit differently for a transposed view of the same values)
    return (
        fake_quantize_int(a.float().contiguous(), 8, granularity="channel").contiguous(),
        fake_quantize_int(b.float().contiguous(), 8, granularity="channel").contiguous(),
    )


def lowrank_bits(d_in: int, d_out: int, rank: int) -> float:
    """Bits per original weight added by INT8 factors A, B with one fp16 scale per row."""
    return (8 * rank * (d_in + d_out) + 16 * (d_out + rank)) / (d_in * d_out)
