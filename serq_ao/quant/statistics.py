"""Calibration statistics as data: per linear group, max |x| and mean |x| of every input
channel, and how they save, load and follow a reordering. (quant/calibration.py collects them.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


@dataclasses.dataclass
class CalibrationStats:
    """Per group name, (d_in,) float32 over ``tokens`` tokens: ``amax`` max |x| per input
    channel (SERQ, SmoothQuant), ``abs_mean`` mean |x| (L2QER)."""

    amax: dict[str, torch.Tensor]
    tokens: int
    seconds: float = 0.0
    abs_mean: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def scales(self, group: str) -> torch.Tensor:
        """Flattening scales s = max |x|; a channel that was zero on every token gets 1."""
        amax = self.amax[group]
        return torch.where(amax > 0, amax, torch.ones_like(amax))

    def permuted(self, groups: set[str], order: torch.Tensor) -> "CalibrationStats":
        """The statistics after the input channels of ``groups`` are reordered by ``order``
        (new channel c is old channel order[c]), as a global residual order does."""
        def reorder(table):
            return {g: (v.index_select(0, order.to(v.device)) if g in groups else v) for g, v in table.items()}

        return CalibrationStats(reorder(self.amax), self.tokens, self.seconds, reorder(self.abs_mean))

    def save(self, path: str | Path) -> None:
        torch.save({"amax": self.amax, "abs_mean": self.abs_mean, "tokens": self.tokens, "seconds": self.seconds}, path)

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationStats":
        data = torch.load(path, weights_only=True)
        return cls(data["amax"], data["tokens"], data.get("seconds", 0.0), data.get("abs_mean", {}))
