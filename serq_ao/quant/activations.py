"""Calibration activations at one decoder-layer boundary, kept on the CPU up to a budget, then
on disk.

Layer-by-layer quantization (:mod:`serq_ao.quant.layerwise`) keeps, per calibration window,
the hidden states entering the current layer: the float model's (for statistics and output
errors) and, with GPTQ, the quantized model's. Each is an :class:`ActivationStream`, one
tensor per window. All streams of a run share one :class:`ActivationCache`: the first
``memory_bytes`` of activations stay in CPU memory, every window after that is written to a
safetensors file under ``folder`` and read back when its turn comes, so peak memory does not
grow with the number or length of the windows.

The default budget is a quarter of this machine's physical memory, at most 8 GiB: at most
four streams are alive at a layer (the float and quantized inputs, and the outputs being
produced), and the layer itself and the writer need the rest.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GiB = 2**30


def default_memory_bytes() -> int:
    """A quarter of physical memory, at most 8 GiB (see the module doc)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        physical = 16 * GiB
    return min(8 * GiB, physical // 4)


class ActivationCache:
    """The shared budget and spill folder of a run's streams; a context manager that removes
    the spill folder on exit."""

    def __init__(self, memory_bytes: int | None = None, folder: str | os.PathLike | None = None):
        if memory_bytes is not None and (not isinstance(memory_bytes, int) or memory_bytes < 0):
            raise ValueError(f"activation memory must be a whole number of bytes >= 0, got {memory_bytes!r}")
        self.memory_bytes = default_memory_bytes() if memory_bytes is None else memory_bytes
        self.parent = None if folder is None else Path(folder)
        self.in_memory = 0  # bytes held by live streams in memory
        self.spilled_bytes = 0  # bytes written to disk over the run (reported)
        self._folder: Path | None = None
        self._files = 0

    def stream(self) -> "ActivationStream":
        return ActivationStream(self)

    def _spill_path(self) -> Path:
        if self._folder is None:
            if self.parent is not None:
                self.parent.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix=".serq-activations-", dir=self.parent))
        self._files += 1
        return self._folder / f"{self._files:08d}.safetensors"

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> "ActivationCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ActivationStream:
    """One tensor per calibration window, in window order; CPU memory or a file each."""

    def __init__(self, cache: ActivationCache):
        self.cache = cache
        self._items: list[torch.Tensor | Path] = []
        self._memory = 0

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        size = tensor.numel() * tensor.element_size()
        if self.cache.in_memory + size <= self.cache.memory_bytes:
            self._items.append(tensor.to("cpu"))
            self.cache.in_memory += size
            self._memory += size
        else:
            path = self.cache._spill_path()
            save_file({"x": tensor.to("cpu").contiguous()}, str(path))
            self.cache.spilled_bytes += size
            self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self._items[index]
        return load_file(str(item))["x"] if isinstance(item, Path) else item

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def release(self) -> None:
        """Free the memory and files of this stream (it is empty afterwards)."""
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self._items = []
        self.cache.in_memory -= self._memory
        self._memory = 0
