"""Latency of a causal LM: prefill (B x N tokens, no cache) and decode (one token per row
against a static KV cache of N tokens), eager and under ``torch.compile(fullgraph=True)``.

Decode rewrites the same cache slot on every call (the cache is rewound), so every call has
the same shapes and compiles once, as in gpt-fast. Medians of several calls after a warm-up;
the warm-up of a compiled function, which includes compilation, is reported apart.

``serq bench`` times each model in a child process of its own (:func:`run_child`, this module
run as ``python -m serq_ao.bench --child SPEC``), so each model's peak resident memory is its
own and every model is timed from the same fresh start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from serq_ao.files import OutputError, atomic_path, strict_json
from serq_ao.messages import user_error_status


@dataclasses.dataclass(frozen=True)
class Timing:
    phase: str  # "prefill" or "decode"
    mode: str  # "eager" or "compiled"
    seconds: float  # median per call
    first_call_seconds: float  # the warm-up (compilation included when compiled)
    tokens_per_second: float
    calls: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _median_seconds(fn, calls: int) -> tuple[float, float]:
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def prepared_decode(model: nn.Module, batch: int, prefill: int):
    """A static KV cache holding ``prefill`` random tokens per row (seed 0), and what one decode
    step against it needs: ``(ids, decode_forward(token, position), rewind(), token, position)``.
    Call ``rewind()`` before each step: the cache counts what it holds, and every step rewrites
    slot ``prefill``, so every step has the same shapes."""
    from transformers import StaticCache

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prefill), generator=generator)
    cache = StaticCache(config=model.config, max_cache_len=prefill + 1)
    model(ids, past_key_values=cache, use_cache=True)  # fill positions 0..N-1

    def decode_forward(token, position):
        return model(token, past_key_values=cache, cache_position=position, use_cache=True).logits

    def rewind():
        for layer in cache.layers:
            layer.cumulative_length.fill_(prefill)

    return ids, decode_forward, rewind, ids[:, -1:], torch.tensor([prefill])


@torch.no_grad()
def time_model(model: nn.Module, *, batch: int = 1, prefill: int = 1024, prefill_calls: int = 3,
               decode_calls: int = 20, modes: tuple[str, ...] = ("eager", "compiled"),
               on_step=None) -> list[Timing]:
    """Timings of ``model`` for each phase and mode; ``on_step(description)`` before each."""
    if batch < 1 or prefill < 1 or prefill_calls < 1 or decode_calls < 1:
        raise ValueError("batch, prefill, prefill_calls and decode_calls must be positive")
    unknown = set(modes) - {"eager", "compiled"}
    if unknown:
        raise ValueError(f"modes must be 'eager' and/or 'compiled', got {sorted(unknown)}")
    ids, decode_forward, rewind, token, position = prepared_decode(model, batch, prefill)

    def prefill_forward(ids):
        return model(ids, use_cache=False).logits

    timings = []
    for mode in modes:
        run_prefill = torch.compile(prefill_forward, fullgraph=True) if mode == "compiled" else prefill_forward
        run_decode = torch.compile(decode_forward, fullgraph=True) if mode == "compiled" else decode_forward
        for phase, fn, calls, tokens in (
            ("prefill", lambda: run_prefill(ids), prefill_calls, batch * prefill),
            ("decode", lambda: (rewind(), run_decode(token, position)), decode_calls, batch),
        ):
            if on_step is not None:
                on_step(f"{phase}, {mode}")
            first, median = _median_seconds(fn, calls)
            timings.append(Timing(phase, mode, median, first, tokens / median, calls))
        torch._dynamo.reset()
    return timings


def write_text(path, text: str) -> None:
    """Replace ``path`` by ``text`` under the rules of :mod:`serq_ao.files` (a temporary file
    renamed into place, one writer at a time): a result file is the old one or the new one."""
    with atomic_path(path, option=str(path)) as tmp:
        Path(tmp).write_text(text)


def check_json_result_path(path, option: str | None = None) -> None:
    """Refuse to replace an existing file that is not a JSON object itself (an earlier
    result): a benchmark's ``--out`` pointed at anything else, your notes say, is refused
    rather than overwritten. ``option`` names the argument in the message."""
    path = Path(path)
    if path.is_file():
        try:
            earlier = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            earlier = None
        if not isinstance(earlier, dict):
            raise OutputError(f"{option + ': ' if option else ''}{path} exists and is not a JSON result; "
                              "remove it or write elsewhere")


def write_json(path, record: dict) -> None:
    """:func:`write_text` of ``record`` as JSON, under :func:`check_json_result_path`'s rule."""
    check_json_result_path(path)
    write_text(path, strict_json(record, indent=1))


def machine_info() -> dict:
    """What the numbers were measured on."""
    import transformers

    import serq_ao

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "serq_ao": serq_ao.__version__}
    info.update(cpu_model())
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


# the instruction sets a CPU figure depends on (serq's kernels, oneDNN's bf16 and AMX paths)
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_model() -> dict:
    """The CPU's model name and which of CPU_FEATURES it has (Linux's /proc/cpuinfo; empty
    elsewhere): this project's machine changes CPU between sessions."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "flags") and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name", "unknown"), "cpu_features": [f for f in CPU_FEATURES if f in flags]}


def peak_rss_bytes() -> tuple[int, str]:
    """This process's peak resident memory so far, and where the figure comes from.

    The kernel's ``VmHWM`` of this process: its address space is new since it was exec'd,
    so the figure is this program's own. (``ru_maxrss``, which benchmarks/child_memory.py
    reads for a child, keeps the high-water mark of the process it was forked from; that file
    needs a standard-library-only launcher for that reason; a process that reads its own
    ``VmHWM`` does not.) Where there is no /proc, ``ru_maxrss`` (Linux: KiB; macOS: bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "VmHWM"
    except (OSError, ValueError, IndexError):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024), "ru_maxrss"


def native_kernel_info() -> dict:
    """Which native CPU kernel the packed ops dispatch to, where serq-ao has native kernels."""
    try:
        from serq_ao.kernels.cpu_native import kernel_info
    except ImportError:
        return {"native": None}
    return kernel_info()


# What a child writes on stdout starts with this, so that anything a library prints there
# cannot be taken for a message.
CHILD_MARK = "serq-bench-child: "


def _tell(message: dict) -> None:
    print(CHILD_MARK + strict_json(message), flush=True)


def run_child(spec: dict) -> int:
    """Load and time one model as ``spec`` says (the keys of :func:`child_spec`), telling the
    parent each step, then its result or the one-line error a user would see, on stdout."""
    from serq_ao.models import load_model

    try:
        if spec["threads"] is not None:
            torch.set_num_threads(spec["threads"])
        model = load_model(spec["model"], dtype=spec["dtype"], device=spec["device"],
                           trust_remote_code=spec["trust_remote_code"])[0]
        if spec["check_positions"] is not None:
            from serq_ao.cli.common import check_positions

            check_positions(model, *spec["check_positions"])
        timings = time_model(model, batch=spec["batch"], prefill=spec["prefill"], prefill_calls=spec["prefill_calls"],
                             decode_calls=spec["decode_calls"], modes=tuple(spec["modes"]),
                             on_step=lambda step: _tell({"step": step}))
    except KeyboardInterrupt:  # the parent, in the same process group, says so
        return 130
    except Exception as e:
        status = user_error_status(e)
        if status is None:
            raise  # a fault of ours: the traceback goes to stderr, which the parent shows
        _tell({"error": str(e), "status": status, "class": f"{type(e).__module__}:{type(e).__qualname__}"})
        return status
    peak, source = peak_rss_bytes()
    dtype = getattr(model.config, "dtype", None) or model.dtype
    _tell({"result": {"dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                      "peak_rss_bytes": peak, "peak_rss_source": source, "native_kernel": native_kernel_info(),
                      "timings": [t.to_dict() for t in timings]}})
    return 0


def child_spec(model: str, *, dtype: str, device: str, trust_remote_code: bool, threads: int | None, batch: int,
               prefill: int, prefill_calls: int, decode_calls: int, modes: tuple[str, ...],
               check_positions: tuple[str, int] | None = None) -> dict:
    """What :func:`run_child` needs: the arguments of :func:`load_model` and :func:`time_model`,
    the thread count (None: torch's default) and ``(option, positions)`` to check first."""
    return {"model": str(model), "dtype": dtype, "device": str(device), "trust_remote_code": trust_remote_code,
            "threads": threads, "batch": batch, "prefill": prefill, "prefill_calls": prefill_calls,
            "decode_calls": decode_calls, "modes": list(modes),
            "check_positions": None if check_positions is None else list(check_positions)}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        sys.exit(run_child(json.loads(sys.argv[2])))
    sys.exit("usage: python -m serq_ao.bench --child SPEC (serq bench runs this; run serq bench)")
