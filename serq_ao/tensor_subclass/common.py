"""What the packed weight subclasses share: the stored pre-op and the check that packing is exact."""

from __future__ import annotations

import torch


def compact_perm(perm: torch.Tensor | None) -> torch.Tensor | None:
    """Store a channel order in int16 where it fits (the ops widen it to int32 to gather)."""
    if perm is None:
        return None
    dtype = torch.int16 if perm.numel() <= torch.iinfo(torch.int16).max + 1 else torch.int32
    return perm.to(dtype).contiguous()


def check_exact(what: str, packed: torch.Tensor, original: torch.Tensor, rtol: float = 0.0) -> None:
    """Packing takes values already on the format's grid; anything else is a caller's bug.

    ``rtol`` admits a last-bit difference where the original was computed in float64.
    """
    error = (packed - original.float()).abs()
    bound = rtol * original.float().abs()
    if bool((error > bound).any()):
        raise ValueError(
            f"{what} is not on the quantization grid (max error {error.max().item():.3g}): pack "
            "weights produced by serq_ao's quantizers (simulate.quantize_weight / quantize_correction)"
        )


def field_names(cls) -> list[str]:
    """Every tensor field a packed weight class may hold, required first."""
    return list(cls.tensor_data_names) + list(cls.optional_tensor_data_names)


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies: for a packed weight, all its present fields (codes, scales,
    pre-op vectors); for any other tensor, its elements."""
    if hasattr(tensor, "optional_tensor_data_names"):
        present = (getattr(tensor, n) for n in field_names(type(tensor)))
        return sum(stored_bytes(t) for t in present if t is not None)
    return tensor.numel() * tensor.element_size()


def stored_bits_per_weight(tensor: torch.Tensor) -> float:
    """Bits stored by a packed weight (codes, scales, pre-op vectors) per original weight."""
    return 8 * stored_bytes(tensor) / (tensor.shape[0] * tensor.shape[1])
