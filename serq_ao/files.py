"""Everything serq writes to disk goes through here, so that no output can destroy anything.

The rules (docs/safety.md):

- A destination is checked before any work (:func:`claim_output`): an empty name, the current
  folder or one that contains it, a symbolic link, a file where a folder is wanted (or the
  reverse), and an unwritable parent are refused with the reason.
- A folder output is written only where nothing is lost: a new or empty folder, or one that
  holds exactly what an earlier serq run wrote, checked against the manifest that run left
  (:data:`MANIFEST`: every file's size and SHA-256, written last). Replacing an earlier output
  needs ``overwrite``; a folder with any file its manifest does not list, or a listed file that
  changed size, is refused whatever ``overwrite`` says.
- A file output replaces an existing file only with ``overwrite``.
- The new output is written under a temporary name beside the destination and swapped in by
  renames (one atomic exchange on Linux), the old one removed last, so an interrupt or a kill
  at any instant leaves the old or the new output complete under the destination's name.
- A lock (``flock`` on ``.<name>.serq-lock`` beside the destination, released by the kernel
  when the process dies) refuses a second concurrent writer; whoever holds it removes the
  temporaries of dead runs first.

This module needs nothing but the standard library (the interrupt tests load it alone).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# a Hugging Face folder holds a tokenizer when it has one of these
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
MANIFEST = "serq-manifest.json"
MANIFEST_FORMAT = "serq-ao output"
_HASH_CHUNK = 1 << 24
_NEW, _OLD, _LOCK = "serq-new", "serq-old", "serq-lock"
# the work folder of a resumable run (serq_ao.resume); never cleaned as stale: it is kept for --resume
_PARTIAL = "serq-partial"


class OutputError(ValueError):
    """A destination serq refuses to write to; the message names the option and the reason."""


class DiskFullError(OutputError):
    """A write that ran out of space; the message names the option, the folder and its free space."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# safetensors and torch raise their own exception types for a failed write, with the OS's text in them
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or an exception it was raised from) is a write that ran out of space."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def free_space(folder: str | os.PathLike) -> str:
    """"12.0 KiB free of 1.0 MiB" for the file system holding ``folder`` (its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return "free space unknown"
    return f"{human_bytes(usage.free)} free of {human_bytes(usage.total)}"


def disk_full_error(option: str, folder: str | os.PathLike, what: str) -> DiskFullError:
    """The one line for a write into ``folder`` (given as ``option``) that ran out of space
    while writing ``what``."""
    return DiskFullError(f"{option}: no space left on the disk holding {folder} while writing {what} "
                         f"(now {free_space(folder)})")


def check_writable_folder(path: str | os.PathLike, *, option: str, probe_bytes: int = 1 << 12) -> Path:
    """Check, before any work, that ``path`` is a folder serq can write files into (created if
    missing): not a file, not read-only, not full (a probe file of ``probe_bytes`` is written,
    synced and removed). Returns the absolute path."""
    folder = Path(path).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option}: {path} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{option}: cannot create the folder {path} ({e.strerror})") from None
    probe = folder / f".serq-probe-{secrets.token_hex(4)}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * probe_bytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise DiskFullError(f"{option}: the disk holding {path} is full ({free_space(folder)})") from None
        reason = "read-only file system" if e.errno == errno.EROFS else e.strerror
        raise OutputError(f"{option}: cannot write into {path} ({reason})") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return folder


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


# ---- strict JSON ----------------------------------------------------------------------------


def strict_json(record, *, indent: int | None = None) -> str:
    """``record`` as strict JSON (RFC 8259 has no NaN or Infinity): every non-finite float
    becomes null, and a dict record gets ``"non_finite"``, the paths of those values
    (``"linears[3].output_error"``), so that a reader can tell a missing value from a broken one."""
    replaced: list[str] = []

    def clean(value, path: str):
        if isinstance(value, float) and not math.isfinite(value):
            replaced.append(path or "$")
            return None
        if isinstance(value, dict):
            return {key: clean(item, f"{path}.{key}" if path else str(key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item, f"{path}[{index}]") for index, item in enumerate(value)]
        return value

    cleaned = clean(record, "")
    if replaced and isinstance(cleaned, dict):
        cleaned["non_finite"] = replaced
    return json.dumps(cleaned, indent=indent, allow_nan=False)


# ---- manifests ------------------------------------------------------------------------------


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(folder: Path, *, skip: str = MANIFEST) -> dict[str, int]:
    """Every entry under ``folder`` but ``skip``: relative path -> size in bytes (-1 for
    anything that is not a regular file: a link, a fifo; never something serq wrote)."""
    files = {}
    for item in sorted(folder.rglob("*")):
        relative = item.relative_to(folder).as_posix()
        if relative == skip or (item.is_dir() and not item.is_symlink()):
            continue
        files[relative] = item.lstat().st_size if item.is_file() and not item.is_symlink() else -1
    return files


def file_records(folder: Path, *, skip: str = MANIFEST) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under ``folder`` but ``skip``."""
    return {name: {"size": size, "sha256": sha256_of(folder / name)} for name, size in folder_files(folder, skip=skip).items()}


def _version() -> str:
    try:
        return importlib.metadata.version("serq-ao")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def write_manifest(folder: Path, **fields) -> dict:
    """Record every file of ``folder`` in its manifest (written last); returns the manifest."""
    manifest = {"format": MANIFEST_FORMAT, "serq_ao": _version(), **fields, "files": file_records(folder)}
    with open(folder / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a folder serq wrote, or None where there is none (or it is not one)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def foreign_files(folder: Path, manifest: dict) -> list[str]:
    """Files of ``folder`` that its manifest does not account for: not listed, or listed with
    another size (edited since). Listed files that are gone are not foreign."""
    listed = manifest["files"]
    return [
        name for name, size in folder_files(folder).items()
        if not isinstance(listed.get(name), dict) or listed[name].get("size") != size
    ]


# ---- the lock -------------------------------------------------------------------------------


class _Lock:
    """An exclusive, non-blocking ``flock`` on ``path``; the file is removed on release."""

    def __init__(self, path: Path, destination: Path, option: str):
        self.path = path
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputError(f"{option}: cannot write beside {destination} ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputError(f"{option}: another serq process (pid {holder}) is writing {destination}; "
                                  "wait for it to finish") from None
            # the holder before us may have removed the file between our open and our lock
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        with contextlib.suppress(OSError):  # the pid only informs a second writer; a full disk must not stop us here
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)


# ---- atomic exchange ------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where that is unavailable."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # filesystem or kernel without it
        return False
    raise OSError(code, os.strerror(code), str(a))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for a few renames, so that Ctrl-C cannot split them."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# ---- claiming a destination -----------------------------------------------------------------


class Output:
    """A destination claimed by :func:`claim_output`; :meth:`write` stages and commits it."""

    def __init__(self, path: Path, folder: bool, option: str):
        self.path, self.folder, self.option = path, folder, option

    @property
    def partial(self) -> Path:
        """Where a resumable run of this destination keeps its work (:mod:`serq_ao.resume`)."""
        return self.path.parent / f".{self.path.name}.{_PARTIAL}"

    def _temporary(self, tag: str) -> Path:
        suffix = "" if self.folder else self.path.suffix
        return self.path.parent / f".{self.path.name}.{tag}-{secrets.token_hex(4)}{suffix}"

    @contextlib.contextmanager
    def write(self, **manifest_fields) -> Iterator[Path]:
        """Yield a temporary folder (or file name) beside the destination to write into; when
        the block succeeds, a folder gets its manifest and the result replaces the destination
        atomically. On any error (Ctrl-C included) the temporary is removed and the
        destination is untouched."""
        staging = self._temporary(_NEW)
        try:
            if self.folder:
                staging.mkdir()
            yield staging
            if self.folder:
                write_manifest(staging, **manifest_fields)
            umask_permissions(staging)
            self._commit(staging)
        except Exception as e:
            if is_disk_full(e) and not isinstance(e, DiskFullError):
                raise disk_full_error(self.option, self.path.parent, self.path) from e
            raise
        finally:
            _remove(staging)

    def _commit(self, staging: Path) -> None:
        if not self.folder or not self.path.exists():
            os.replace(staging, self.path)  # a file, or a folder onto a missing or empty one
            return
        if self.path.is_dir() and not any(self.path.iterdir()):
            os.replace(staging, self.path)
            return
        old = self._temporary(_OLD)
        with _signals_deferred():
            if _exchange(staging, self.path):
                os.rename(staging, old)  # the old output, under a name the next run cleans
            else:
                os.rename(self.path, old)
                os.rename(staging, self.path)
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _clean_stale(path: Path) -> None:
    """Remove the temporaries of dead runs beside ``path`` (we hold its lock). Where a kill
    came between the two renames of a swap, the complete old output is put back first."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:({_NEW}|{_OLD})-[0-9a-f]{{8}}.*|[A-Za-z0-9_]{{8}}\.tmp.*)$")
    for item in path.parent.iterdir():
        match = pattern.match(item.name)
        if match is None:
            continue
        if match.group(1) == _OLD and not path.exists() and item.is_dir() and read_manifest(item) is not None \
                and not foreign_files(item, read_manifest(item)):
            logger.warning("restoring %s from %s (a run was killed while replacing it)", path, item.name)
            os.rename(item, path)
            continue
        logger.info("removing %s, left by a serq run that did not finish", item)
        _remove(item)


def check_destination(path: str | os.PathLike, *, option: str, folder: bool, overwrite: bool) -> Path:
    """The checks of :func:`claim_output` that need no lock; returns the destination path."""
    if str(path).strip() == "":
        raise OutputError(f"{option} must name a {'folder' if folder else 'file'}, got {str(path)!r}")
    destination = Path(path).expanduser().absolute()
    if destination.is_symlink():
        raise OutputError(f"{option}: {path} is a symbolic link (to {os.readlink(destination)}); name the real path")
    destination = Path(os.path.normpath(destination))
    real = destination.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise OutputError(f"{option}: {path} is the current folder or contains it; name a folder elsewhere")
    if folder and destination.exists() and not destination.is_dir():
        raise OutputError(f"{option}: {path} is a file, not a folder")
    if not folder and destination.is_dir():
        raise OutputError(f"{option}: {path} is a folder, not a file")
    if destination.exists():
        if not folder:
            if not overwrite:
                raise OutputError(f"{option}: {path} exists; pass --overwrite to replace it")
        elif any(destination.iterdir()):
            manifest = read_manifest(destination)
            if manifest is None:
                example = next(iter(folder_files(destination, skip="")), "?")
                raise OutputError(f"{option}: {path} holds files that no serq run wrote (such as {example}); "
                                  "serq replaces only its own outputs: name a new or empty folder")
            foreign = foreign_files(destination, manifest)
            unlisted = [name for name in foreign if not isinstance(manifest["files"].get(name), dict)]
            if unlisted:
                raise OutputError(f"{option}: {path} holds {', '.join(unlisted[:3])}{' and more' if len(unlisted) > 3 else ''}, "
                                  "which the serq run that wrote it did not write; move them away or name another folder")
            if foreign:  # files serq wrote, changed since: an edit is the user's work, and serq cannot tell one from damage
                name = foreign[0]
                others = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
                raise OutputError(f"{option}: {path} holds {name}{others}, which changed since the serq run that wrote "
                                  f"it ({(destination / name).lstat().st_size} bytes, {manifest['files'][name].get('size')} "
                                  "written): serq replaces only its own unchanged files, since an edit may be someone's "
                                  f"work; if the old output is damaged and not needed, delete it (rm -r {path}) or name "
                                  "another folder")
            if not overwrite:
                raise OutputError(f"{option}: {path} holds an earlier serq output; pass --overwrite to replace it")
    return destination


@contextlib.contextmanager
def claim_output(path: str | os.PathLike, *, option: str = "--out", folder: bool = True,
                 overwrite: bool = False) -> Iterator[Output]:
    """Check ``path`` as a destination and hold its lock for the block; see the module doc.

    Call it before the expensive work, so that a bad destination costs nothing, and write with
    ``output.write()`` inside the block. ``option`` names the destination in errors.
    """
    destination = check_destination(path, option=option, folder=folder, overwrite=overwrite)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in destination.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:  # mkdir's "File exists" would name neither the file nor why it matters
            raise OutputError(f"{option}: {blocker} is a file, so {path} cannot be made inside it") from None
        raise OutputError(f"{option}: cannot create the folder {destination.parent} ({e.strerror})") from None
    if not os.access(destination.parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option}: cannot write into {destination.parent} (permission denied or read-only)")
    lock = _Lock(destination.parent / f".{destination.name}.{_LOCK}", destination, option)
    try:
        _clean_stale(destination)
        # again under the lock: another run may have written it while we waited to check
        check_destination(path, option=option, folder=folder, overwrite=overwrite)
        yield Output(destination, folder, option)
    finally:
        lock.release()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True, option: str = "output") -> Iterator[str]:
    """Claim the file ``path`` and yield a temporary name beside it, renamed to ``path`` once
    the block succeeds (see :func:`claim_output`): ``path`` is the old file, absent, or complete."""
    with claim_output(path, option=option, folder=False, overwrite=overwrite) as output, output.write() as tmp:
        yield str(tmp)
