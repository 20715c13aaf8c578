"""Peak resident memory and wall time of one child process, optionally under a memory cap
(what benchmarks/scale.py measures every ``serq quantize`` run with).

The child's peak is the kernel's ``ru_maxrss`` for its pid (``os.wait4``). It is started by a
launcher, this file run under ``python -S`` (standard library only): a process's ru_maxrss
keeps the high-water mark of the process it was forked from, so a child forked by a
benchmark that has imported torch would never read below the benchmark's own peak.

A cap is the kernel's ``memory.max`` of a child cgroup where a cgroup v2 with the memory
controller can be delegated to, otherwise a watchdog that polls the child's ``VmHWM`` every
20 ms and kills it past the cap (measured, not enforced by the kernel).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

POLL_SECONDS = 0.02


def _own_cgroup_v2() -> Path | None:
    """Our cgroup in a cgroup v2 hierarchy where we may create a child with memory.max, or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    relative = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    if relative is None:
        return None
    for mount in mounts:
        fields = mount.split()
        if len(fields) < 3 or fields[2] != "cgroup2":
            continue
        group = Path(fields[1]) / relative.lstrip("/")
        try:
            controllers = (group / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if "memory" in controllers and os.access(group, os.W_OK):
            return group
    return None


class Cap:
    """A memory cap for child processes: ``mode`` is "cgroup-v2" (the kernel's memory.max of a
    child cgroup) or "watchdog" (VmHWM polled, the child killed past the cap, ru_maxrss checked)."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.group = None
        self.mode = "watchdog"
        self.why = ""
        parent = _own_cgroup_v2()
        if parent is None:
            self.why = "no writable cgroup v2 with the memory controller"
            return
        group = parent / f"serq-scale-{os.getpid()}"
        try:
            control = parent / "cgroup.subtree_control"
            if "memory" not in control.read_text().split():
                control.write_text("+memory")
            group.mkdir(exist_ok=True)
            (group / "memory.max").write_text(str(limit_bytes))
            if (group / "memory.swap.max").exists():
                (group / "memory.swap.max").write_text("0")
            self.group, self.mode = group, "cgroup-v2"
        except OSError as e:  # e.g. "no internal processes": our cgroup holds processes itself
            self.why = f"cgroup v2 not delegable ({e.strerror or e})"
            try:
                group.rmdir()
            except OSError:
                pass

    @property
    def enforcement(self) -> str:
        """How the cap holds, in words (for the results)."""
        if self.mode == "cgroup-v2":
            return "enforced by the kernel: memory.max of a child cgroup v2"
        return (f"measured, not enforced by the kernel ({self.why}): a watchdog polls VmHWM every "
                f"{POLL_SECONDS * 1000:.0f} ms and kills the child past the cap; a run is within the cap only if it "
                "finished with ru_maxrss <= cap")

    def close(self):
        if self.group is not None:
            try:
                self.group.rmdir()
            except OSError:
                pass


def _high_water(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def measure(command: list[str], log: Path, cap: Cap | None = None, env: dict | None = None) -> dict:
    """Run ``command`` as a child; its exit status, wall seconds, peak RSS (ru_maxrss of its
    pid, from os.wait4) and the last JSON line of its stdout. With a watchdog cap, the child is
    killed once its high-water mark passes the cap.

    The child is started by a small launcher process (this file under ``python -S``, stdlib
    only): a process's ru_maxrss keeps the high-water mark of the process it was forked from
    (across exec, and of the whole parent with vfork), so a child of this benchmark, which has
    imported torch, would never read below this process's own peak."""
    spec = {"command": command, "log": str(log), "env": env, "poll": POLL_SECONDS,
            "cap": None if cap is None else {"limit": cap.limit, "mode": cap.mode,
                                            "procs": None if cap.group is None else str(cap.group / "cgroup.procs")}}
    result = subprocess.run([sys.executable, "-S", str(Path(__file__).resolve()), LAUNCHER_FLAG],
                            input=json.dumps(spec), capture_output=True, text=True, check=True)
    record = json.loads(result.stdout)
    if cap is not None:
        # under the cgroup the kernel kills past memory.max (an OOM kill is a SIGKILL, -9)
        record["within_cap"] = record["returncode"] == 0 and record["peak_rss_bytes"] <= cap.limit
    if record["returncode"] != 0:
        record["stderr_tail"] = log.read_text(errors="replace")[-2000:]
    return record


LAUNCHER_FLAG = "--measure-child"


def _launch(spec: dict) -> dict:
    """The launcher's work (see :func:`measure`)."""
    cap = spec["cap"]
    preexec = None
    if cap is not None and cap["procs"] is not None:
        def preexec():
            with open(cap["procs"], "w") as handle:
                handle.write(str(os.getpid()))
    with open(spec["log"], "wb") as err, tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        child = subprocess.Popen(spec["command"], stdout=out, stderr=err, preexec_fn=preexec, env=spec["env"])
        killed = threading.Event()
        done = threading.Event()

        def watch():
            while not done.wait(spec["poll"]):
                hwm = _high_water(child.pid)
                if hwm is not None and hwm > cap["limit"]:
                    killed.set()
                    try:
                        os.kill(child.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    return

        watcher = None
        if cap is not None and cap["mode"] == "watchdog":
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        if watcher is not None:
            watcher.join()
        out.seek(0)
        stdout = out.read().decode(errors="replace")
    summary = None
    for line in reversed(stdout.strip().splitlines()):
        try:
            summary = json.loads(line)
            break
        except ValueError:
            continue
    return {"returncode": child.returncode, "seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024,  # KiB
            "killed_by_watchdog": killed.is_set(), "summary": summary}


if __name__ == "__main__":
    if sys.argv[1:] == [LAUNCHER_FLAG]:
        print(json.dumps(_launch(json.loads(sys.stdin.read()))))
