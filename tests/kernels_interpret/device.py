"""Where the Triton kernel tests run: the interpreter on CPU tensors, or the real backend on CUDA.

- ``TRITON_INTERPRET=1`` (set before triton is first imported, hence a pytest process of its
  own): the kernels run in Triton's interpreter on CPU tensors; ``DEVICE`` is the CPU.
- otherwise, on a machine with CUDA: the kernels are compiled and run on the GPU; ``DEVICE``
  is ``cuda``.

Inputs are made on the CPU with seeded generators (the same data either way), then moved to
``DEVICE`` for the kernels; results come back with ``.cpu()`` to be compared with references
computed on the CPU. Each test module calls :func:`skip_unless_runnable` at import, before it
imports anything that imports triton.
"""

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu") if INTERPRETED else torch.device("cuda")

SKIP_REASON = ("Triton kernel tests need TRITON_INTERPRET=1 set before triton is imported (the interpreter, "
               "on CPU tensors) or a CUDA device (the real Triton backend)")


def skip_unless_runnable() -> None:
    """Skip the calling test module unless the interpreter is on or CUDA is available."""
    if not (INTERPRETED or torch.cuda.is_available()):
        pytest.skip(SKIP_REASON, allow_module_level=True)


def on_device(value):
    """``value`` moved to ``DEVICE`` if it is a tensor; anything else (None, ints, strings,
    dtypes) as it is. A tensor already there is returned as it is (views keep their strides)."""
    return value.to(DEVICE) if isinstance(value, torch.Tensor) else value
