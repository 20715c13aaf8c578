"""What a user may pass as calibration data, turned into the windows the engine runs.

Accepted (``calibration`` of :func:`~serq_ao.quant.pipeline.quantize_model` and friends):

- a tensor of input ids, (n, L) or one sequence (L,);
- a list, tuple or any iterable (a DataLoader) of such tensors, of any lengths;
- batches as tokenizers and collators give them: mappings (dict, ``BatchEncoding``) with
  ``input_ids`` (b, L) and optionally ``attention_mask``; the padding it marks is dropped,
  so each row becomes the window of its real tokens (left or right padded alike).

Each row is one calibration window, run alone (batch 1) as the protocol's windows are, so
statistics and Hessians count every real token once and nothing else. A tensor (n, L) gives
exactly the windows it always gave (its rows, as views): the numbers do not move.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from serq_ao.quant.input_checks import check_input_ids
from serq_ao.quant.statistics import CalibrationStats

Windows = list[torch.Tensor]  # each (1, L_i), integer token ids


def calibration_windows(calibration, option: str = "calibration") -> Windows:
    """The windows of ``calibration`` (see the module doc); an error naming ``option`` for
    anything else."""
    if isinstance(calibration, torch.Tensor) or isinstance(calibration, Mapping):
        items = [calibration]
    elif isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise ValueError(f"{option} must be input ids: a tensor (n, L), a list of tensors, or batches "
                         f"(dicts with input_ids), got {type(calibration).__name__}")
    else:
        items = list(calibration)
    windows: Windows = []
    for index, item in enumerate(items):
        where = option if len(items) == 1 and item is calibration else f"{option}[{index}]"
        windows.extend(_rows(item, where))
    if not windows:
        raise ValueError(f"{option} holds no calibration windows")
    return windows


def _rows(item, where: str) -> Windows:
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"{where} is a mapping without 'input_ids' (keys: {sorted(map(str, item))})")
        ids = _as_rows(item["input_ids"], f"{where}['input_ids']")
        mask = item.get("attention_mask")
        if mask is None:
            return list(ids.split(1))
        mask = _as_rows(mask, f"{where}['attention_mask']")
        if mask.shape != ids.shape:
            raise ValueError(f"{where}: attention_mask {tuple(mask.shape)} and input_ids {tuple(ids.shape)} differ "
                             "in shape")
        rows = []
        for row, (tokens, keep) in enumerate(zip(ids, mask.bool())):
            kept = keep.nonzero().flatten()
            if kept.numel() and kept[-1] - kept[0] + 1 != kept.numel():
                raise ValueError(f"{where}: row {row}'s attention_mask has gaps; only padding at either end can "
                                 "be dropped")
            if kept.numel():
                rows.append(tokens[kept][None])
        return rows
    if isinstance(item, torch.Tensor):
        return list(_as_rows(item, where).split(1))
    raise ValueError(f"{where} must be a tensor of input ids or a mapping with 'input_ids', got "
                     f"{type(item).__name__}")


def _as_rows(value, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where} must be a tensor, got {type(value).__name__}")
    if value.dim() == 1:
        value = value[None]
    if value.dim() != 2:
        raise ValueError(f"{where} must be input ids of shape (n, L) or (L,), got shape {tuple(value.shape)}")
    return value


def check_windows(windows: Windows, model: nn.Module, option: str = "calibration") -> None:
    """Every window: integer ids, at least one token, inside the model's vocabulary."""

    for index, window in enumerate(windows):
        check_input_ids(window, model, option if len(windows) == 1 else f"{option} window {index}")


def window_tokens(windows: Windows) -> int:
    return sum(w.numel() for w in windows)


def prepare_calibration(calibration, model: nn.Module, option: str = "calibration"):
    """What the public entry points do with ``calibration``: statistics or None pass through;
    input ids are checked against ``model`` and returned as windows."""

    if calibration is None or isinstance(calibration, CalibrationStats):
        return calibration
    if isinstance(calibration, torch.Tensor) and calibration.dim() == 2:
        check_input_ids(calibration, model, option)  # one check of the whole tensor, as always
        return list(calibration.split(1))
    windows = calibration_windows(calibration, option)
    check_windows(windows, model, option)
    return windows


def as_windows(calibration):
    """Windows from already-checked input ids (a tensor (n, L) or windows); statistics and None
    pass through."""
    if isinstance(calibration, torch.Tensor):
        return list(calibration.split(1))
    return calibration
