"""A writer that interrupts itself: ``python files_fault_writer.py DEST TAG SIGNAL STEP [rename]``.

It loads serq_ao/files.py alone (standard library only, so each run takes milliseconds),
replaces ``DEST`` (with overwrite) by a folder of three files whose bytes all carry ``TAG``,
and sends itself ``SIGNAL`` (KILL or INT) just before the STEP-th file-system step: every
write of the writer, the manifest, the permission pass, every rename, exchange, unlink and
rmdir. STEP 0 runs to the end and prints the number of steps it took. ``rename``: swap by two
renames, as on a file system without an atomic exchange.
"""

import importlib.util
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("serq_files", ROOT / "serq_ao" / "files.py")
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)

dest, tag, signal_name, stop_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if sys.argv[5:] == ["rename"]:
    files._exchange = lambda a, b: False
steps = 0


def step():
    global steps
    steps += 1
    if steps == stop_at:
        os.kill(os.getpid(), getattr(signal, f"SIG{signal_name}"))


def counted(function):
    def wrapper(*args, **kwargs):
        step()
        return function(*args, **kwargs)

    return wrapper


for module, name in [(os, "rename"), (os, "replace"), (os, "unlink"), (os, "rmdir"), (os, "remove"),
                     (files, "_exchange"), (files, "write_manifest"), (files, "umask_permissions")]:
    setattr(module, name, counted(getattr(module, name)))
# shutil.rmtree removes through os.unlink / os.rmdir, so a removal is many counted steps

try:
    with files.claim_output(dest, overwrite=True) as output, output.write() as folder:
        for relative in ("a.bin", "b.bin", "sub/c.bin"):
            step()
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_bytes(f"{tag}:{relative}".encode() * 1000)
except KeyboardInterrupt:
    sys.exit(130)
print(steps)
