"""Helpers for outputs written atomically (a temporary name in the destination folder, then a rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the permissions a plain ``open`` /
    ``mkdir`` would have given it.

    ``tempfile.mkstemp`` and ``mkdtemp`` create 0600 files and 0700 folders, and safetensors
    writes 0600 files: a saved model or figure would be unreadable to anyone else once renamed
    into place.
    """
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; once the block succeeds, give it the usual
    permissions and rename it to ``path``. On any error (Ctrl-C included) it is removed, so
    ``path`` is either the old file, absent, or complete."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(handle)
    try:
        yield tmp
        umask_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
