"""What quantization refuses before it starts, each with an error naming what is wrong: non-finite
weights, and calibration input ids that are malformed, outside the vocabulary or longer than
the model's positions."""

from __future__ import annotations

import torch
from torch import nn


class NonFiniteError(ValueError):
    """NaN or inf where quantization needs finite numbers (weights, calibration activations)."""


def check_finite_weights(model: nn.Module, prefix: str = "") -> None:
    """Refuse a model with a NaN or inf in any floating-point parameter or buffer, naming it
    (``prefix`` + its name): quantizing it would give NaN codes or scales without a word."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_floating_point() and tensor.device.type != "meta":
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    raise NonFiniteError(f"{kind} {prefix}{name} has {bad} NaN or inf value(s) of {tensor.numel()}: "
                                         "a model with non-finite weights cannot be quantized")


def positions_error(model, what: str, positions: int) -> str | None:
    """Why sequences of ``positions`` tokens do not fit ``model`` (or a model config), or None.
    The one rule the library's calibration checks and the CLI's options share: a model has
    position embeddings (or RoPE tables trained) for ``max_position_embeddings`` positions;
    past them it still runs, but on positions it never saw, and its statistics mean nothing."""
    limit = getattr(getattr(model, "config", model), "max_position_embeddings", None)
    if isinstance(limit, int) and positions > limit:
        return (f"{what} needs {positions} positions per sequence, the model has "
                f"max_position_embeddings {limit}")
    return None


def check_input_ids(ids, model: nn.Module, option: str = "calibration") -> None:
    """Calibration input ids must be an integer tensor (n, L), n, L >= 1, of token ids the
    vocabulary of ``model`` (or of a model config) has, L within its positions; anything else
    is an error naming ``option``."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{option} must be a tensor of input ids (n, L), got {type(ids).__name__}")
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"{option} must be input ids of shape (n, L) with n, L >= 1, got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{option} must hold integer token ids, got dtype {ids.dtype}")
    vocab = getattr(getattr(model, "config", model), "vocab_size", None)  # a model, or a model config
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(f"{option} holds token ids in [{low}, {high}], outside the model's vocabulary "
                         f"[0, {vocab if vocab is not None else '?'})")
    too_long = positions_error(model, option, ids.shape[1])
    if too_long:
        raise ValueError(too_long)
