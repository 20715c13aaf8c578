"""Eager vs compiled latency of the packed SERQ default model, next to the FP model.

    .venv/bin/python benchmarks/compile_latency.py                 # prefill 1x1024, decode at 1024
    .venv/bin/python benchmarks/compile_latency.py --prefill 256 --repeats 2

Two phases, each timed for the FP model and the packed SERQ model (serq_ao.quantize_), eager
and under ``torch.compile(fullgraph=True)`` (Inductor, C++ on CPU):

- prefill: one forward over 1 x N tokens, no cache;
- decode: one token at position N against a static KV cache of N tokens (the same slot is
  rewritten every call, so every call has the same shapes and compiles once).

Medians of ``--repeats`` calls after one warm-up call (which, compiled, includes the
compilation, reported apart). Ratios (compiled / eager, SERQ / FP) come from the same run; on
this noisy 2-core machine only they mean much. Writes
benchmarks/results/compile_latency.json and prints a table last.

Latency does not depend on how good the calibration is, so a few calibration windows do.
The packed op's CPU body is the plain-PyTorch reference (it dequantizes the weight on every
call); the Triton kernels of the kernels issue are the fast path on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serq_ao  # noqa: E402
from serq_ao.config import SERQConfig  # noqa: E402
from serq_ao.data import calibration_batches  # noqa: E402
from serq_ao.models import load_model  # noqa: E402
from serq_ao.packing import storage_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of ``repeats`` further calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def phases(model, prefill: int):
    """Callables for the two phases on ``model``, eager and compiled."""
    from transformers import StaticCache

    ids = torch.randint(0, model.config.vocab_size, (1, prefill), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=prefill + 1)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)  # fill positions 0..N-1
    token = ids[:, -1:]
    position = torch.tensor([prefill])

    def prefill_forward(ids):
        return model(ids, use_cache=False).logits

    def decode_forward(token, position):
        return model(token, past_key_values=cache, cache_position=position, use_cache=True).logits

    def rewind():  # the static cache counts what it holds; rewrite slot N on every call
        for layer in cache.layers:
            layer.cumulative_length.fill_(prefill)

    compiled_prefill = torch.compile(prefill_forward, fullgraph=True)
    compiled_decode = torch.compile(decode_forward, fullgraph=True)
    return {
        ("prefill", "eager"): lambda: prefill_forward(ids),
        ("prefill", "compiled"): lambda: compiled_prefill(ids),
        ("decode", "eager"): lambda: (rewind(), decode_forward(token, position)),
        ("decode", "compiled"): lambda: (rewind(), compiled_decode(token, position)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefill", type=int, default=1024, help="prompt tokens (and KV cache length for decode)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell after the warm-up")
    parser.add_argument("--decode-repeats", type=int, default=20, help="timed decode calls per cell")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS / "compile_latency.json")
    args = parser.parse_args()
    if args.prefill < 1 or args.repeats < 1 or args.decode_repeats < 1:
        parser.error("--prefill, --repeats and --decode-repeats must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)

    fp_model, tokenizer = load_model(MODEL)
    serq_model, _ = load_model(MODEL)
    calibration = calibration_batches(tokenizer, "wiki", n_windows=4)
    config = SERQConfig(rank=args.rank)
    serq_ao.quantize_(serq_model, config, calibration)
    storage = storage_report(serq_model)

    rows = []
    for name, model in (("fp", fp_model), ("serq", serq_model)):
        for (phase, mode), fn in phases(model, args.prefill).items():
            repeats = args.repeats if phase == "prefill" else args.decode_repeats
            with torch.no_grad():
                first, median = timed(fn, repeats)
            tokens = args.prefill if phase == "prefill" else 1
            rows.append({"model": name, "phase": phase, "mode": mode, "seconds": median,
                         "first_call_seconds": first, "tokens_per_second": tokens / median, "repeats": repeats})
            print(f"{name:5s} {phase:8s} {mode:9s} {median * 1e3:10.2f} ms (first call {first:.1f} s)", flush=True)
        torch._dynamo.reset()

    def seconds(model, phase, mode):
        return next(r["seconds"] for r in rows if (r["model"], r["phase"], r["mode"]) == (model, phase, mode))

    ratios = []
    for phase in ("prefill", "decode"):
        ratios.append({
            "phase": phase,
            "fp_compiled_over_eager": seconds("fp", phase, "compiled") / seconds("fp", phase, "eager"),
            "serq_compiled_over_eager": seconds("serq", phase, "compiled") / seconds("serq", phase, "eager"),
            "serq_over_fp_eager": seconds("serq", phase, "eager") / seconds("fp", phase, "eager"),
            "serq_over_fp_compiled": seconds("serq", phase, "compiled") / seconds("fp", phase, "compiled"),
        })
    fp_bytes = sum(p.numel() * p.element_size() for p in fp_model.parameters())
    record = {
        "model": MODEL,
        "config": config.to_dict(),
        "prefill_tokens": args.prefill,
        "rows": rows,
        "ratios": ratios,
        "bytes": {"fp": fp_bytes, "serq": storage.model_bytes},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "serq_ao": serq_ao.__version__},
        "command": " ".join(["benchmarks/compile_latency.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, args.out)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{MODEL}: packed SERQ (r={args.rank}) vs FP, prefill 1x{args.prefill} and decode at {args.prefill}")
    for column in ("phase", "FP eager ms", "FP compiled ms", "SERQ eager ms", "SERQ compiled ms",
                   "compiled/eager FP", "compiled/eager SERQ", "SERQ/FP eager", "SERQ/FP compiled"):
        table.add_column(column, justify="right")
    for ratio in ratios:
        phase = ratio["phase"]
        table.add_row(phase, *(f"{seconds(m, phase, mode) * 1e3:.1f}" for m in ("fp", "serq") for mode in ("eager", "compiled")),
                      *(f"{ratio[k]:.2f}" for k in ("fp_compiled_over_eager", "serq_compiled_over_eager",
                                                      "serq_over_fp_eager", "serq_over_fp_compiled")))
    Console(width=200).print(table)
    print(f"model bytes: FP {fp_bytes / 2**20:.1f} MiB, SERQ {storage.model_bytes / 2**20:.1f} MiB; wrote {args.out}")


if __name__ == "__main__":
    main()
