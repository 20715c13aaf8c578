"""serq_ao.memory: the allocator settings a layer-by-layer process makes (each in a
subprocess of its own: they change the whole process's heap)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serq_ao.memory import fix_mmap_threshold

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None


def _run(code: str, *argv: str, **env) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT,
                            env={**environment, **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("nbytes", [0, -1, (32 << 20) + 1])
def test_threshold_outside_glibcs_range_is_refused(nbytes):
    with pytest.raises(ValueError, match=r"nbytes must be in \(0, 32 MiB\]"):
        fix_mmap_threshold(nbytes)


# glibc's own malloc, so that the test sees the allocator and nothing above it: a 16 MiB block
# freed (the dynamic threshold rises to it), then 64 x 2 MiB blocks, each followed by a 256 KiB
# block that stays (16 MiB in all; large enough not to fit a hole the imports left), the 2 MiB
# ones freed: kept in the arena unless the threshold was pinned below 2 MiB
HEAP_AFTER_FREES = """
import ctypes, sys
from serq_ao.memory import fix_mmap_threshold
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

def touched(n):
    block = libc.malloc(n)
    ctypes.memset(block, 1, n)
    return block

pinned = fix_mmap_threshold() if sys.argv[1] == "pin" else False
libc.free(touched(16 << 20))
before = rss()
blocks = []
for _ in range(64):
    blocks.append(touched(2 << 20))
    touched(256 << 10)
for block in blocks:
    libc.free(block)
print(pinned, (rss() - before) >> 20)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_pinned_threshold_returns_freed_blocks_to_the_system():
    pinned, kept = _run(HEAP_AFTER_FREES, "pin").split()
    assert pinned == "True" and int(kept) < 16 + 8  # the small blocks that stay, and no more
    _, kept_by_default = _run(HEAP_AFTER_FREES, "default").split()
    assert int(kept_by_default) >= 16 + 100  # the creep the pin prevents, as glibc does by default


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_the_environments_threshold_rules():
    out = _run("from serq_ao.memory import fix_mmap_threshold; print(fix_mmap_threshold())",
               MALLOC_MMAP_THRESHOLD_="4194304")
    assert out == "False"
