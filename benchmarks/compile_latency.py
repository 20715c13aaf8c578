"""Eager vs compiled latency of the packed SERQ default model, next to the FP model.

    .venv/bin/python benchmarks/compile_latency.py                 # prefill 1x1024, decode at 1024
    .venv/bin/python benchmarks/compile_latency.py --prefill 256 --repeats 2

Two phases (serq_ao.bench, also behind ``serq bench``), each timed for the FP model and the
packed SERQ model (serq_ao.quantize_), eager and under ``torch.compile(fullgraph=True)``
(Inductor, C++ on CPU):

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
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serq_ao  # noqa: E402
from serq_ao.quant.config import SERQConfig  # noqa: E402
from serq_ao.data import calibration_batches  # noqa: E402
from serq_ao.models import load_model  # noqa: E402
from serq_ao.bench import machine_info, time_model, write_json  # noqa: E402
from serq_ao.quant.packing import storage_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"


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
        for timing in time_model(model, prefill=args.prefill, prefill_calls=args.repeats, decode_calls=args.decode_repeats):
            rows.append({"model": name, **timing.to_dict()})
            print(f"{name:5s} {timing.phase:8s} {timing.mode:9s} {timing.seconds * 1e3:10.2f} ms "
                  f"(first call {timing.first_call_seconds:.1f} s)", flush=True)

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
        "machine": machine_info(),
        "command": " ".join(["benchmarks/compile_latency.py", *sys.argv[1:]]),
    }
    write_json(args.out, record)

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
