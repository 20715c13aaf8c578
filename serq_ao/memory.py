"""The process's heap, for runs that allocate and free a layer's worth of tensors over and over.

glibc serves a request of at least its *mmap threshold* with a mapping of its own, returned
to the system when freed, and anything smaller from its arenas, where freed space stays with
the process, fragmented by the small allocations made in between. The threshold starts at
128 KiB and, by default, rises to the size of each mapped block that is freed, up to 32 MiB.
A layer-by-layer run frees blocks that large all the time (GPTQ's Hessians, a layer's
weights), so after the first layers nearly every tensor comes from the arenas and the resident
size creeps up with depth although nothing is held (benchmarks/scale.py: SERQ + GPTQ streamed,
1.70 GB at 4 layers, 2.13 GB at 32). Two remedies, both no-ops where there is no glibc:

- :func:`release_freed_memory` after every layer (``malloc_trim``: the arenas' free pages back);
- :func:`fix_mmap_threshold` once per process: the threshold pinned (1 MiB by default), so
  every tensor of that size or more is a mapping of its own again. It changes the whole
  process's allocator, so the library never calls it; ``serq quantize`` does, for its own
  process, unless ``MALLOC_MMAP_THRESHOLD_`` in the environment says otherwise.
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
DEFAULT_MMAP_THRESHOLD = 1 << 20


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Hand the heap memory freed since the last call back to the system (``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def fix_mmap_threshold(nbytes: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold at ``nbytes`` for this process (see the module doc); False
    where there is no glibc or the environment's ``MALLOC_MMAP_THRESHOLD_`` rules already."""
    if not 0 < nbytes <= 32 << 20:
        raise ValueError(f"nbytes must be in (0, 32 MiB] (glibc's ceiling), got {nbytes}")
    libc = _libc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    logger.debug("mmap threshold pinned at %d bytes: %s", nbytes, done)
    return done
