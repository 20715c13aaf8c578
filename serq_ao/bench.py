"""Latency of a causal LM: prefill (B x N tokens, no cache) and decode (one token per row
against a static KV cache of N tokens), eager and under ``torch.compile(fullgraph=True)``.

Decode rewrites the same cache slot on every call (the cache is rewound), so every call has
the same shapes and compiles once, as in gpt-fast. Medians of several calls after a warm-up;
the warm-up of a compiled function, which includes compilation, is reported apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from serq_ao.files import OutputError, atomic_path, strict_json


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


@torch.no_grad()
def time_model(model: nn.Module, *, batch: int = 1, prefill: int = 1024, prefill_calls: int = 3,
               decode_calls: int = 20, modes: tuple[str, ...] = ("eager", "compiled"),
               on_step=None) -> list[Timing]:
    """Timings of ``model`` for each phase and mode; ``on_step(description)`` before each."""
    from transformers import StaticCache

    if batch < 1 or prefill < 1 or prefill_calls < 1 or decode_calls < 1:
        raise ValueError("batch, prefill, prefill_calls and decode_calls must be positive")
    unknown = set(modes) - {"eager", "compiled"}
    if unknown:
        raise ValueError(f"modes must be 'eager' and/or 'compiled', got {sorted(unknown)}")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prefill), generator=generator)
    cache = StaticCache(config=model.config, max_cache_len=prefill + 1)
    model(ids, past_key_values=cache, use_cache=True)  # fill positions 0..N-1
    token, position = ids[:, -1:], torch.tensor([prefill])

    def prefill_forward(ids):
        return model(ids, use_cache=False).logits

    def decode_forward(token, position):
        return model(token, past_key_values=cache, cache_position=position, use_cache=True).logits

    def rewind():  # the static cache counts what it holds; rewrite slot N on every call
        for layer in cache.layers:
            layer.cumulative_length.fill_(prefill)

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
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info
