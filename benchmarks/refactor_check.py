"""Do the accuracy cells move? A refactor's check, per docs/protocol.md with fewer windows.

    .venv/bin/python benchmarks/refactor_check.py --label before          # on the old code
    .venv/bin/python benchmarks/refactor_check.py --label after           # on the new code
    .venv/bin/python benchmarks/refactor_check.py --label after --dtype bfloat16

Each cell is quantized (evaluation mode, ``quantize_model``) from a fresh copy of the default
model calibrated on the protocol's 32 wiki windows, then evaluated on the first ``--windows``
wiki evaluation windows. A cell records its perplexity (the float as ``repr``, so equal means
bitwise equal) and the SHA-256 of the logits of the first evaluation window, in the model's
dtype: two runs agree bitwise when both match. Results go to
``benchmarks/results/refactor_check_<label>_<dtype>.json``; ``--compare A B`` prints a table
of two such files side by side. Only the public API is used, so the same script runs on the
code before and after a refactor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serq_ao  # noqa: E402
from serq_ao.bench import write_json  # noqa: E402
from serq_ao.data import calibration_batches, evaluation_windows  # noqa: E402
from serq_ao.eval import perplexity  # noqa: E402
from serq_ao.models import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"
# (name, SERQConfig fields): the cells issue 12 asks to hold still
CELLS = [
    ("rtn-mxfp4", {"method": "rtn", "format": "mxfp4", "rank": 0}),
    ("serq-mxfp4", {"method": "serq", "format": "mxfp4", "rank": 64}),
    ("l2qer-mxfp4", {"method": "l2qer", "format": "mxfp4", "rank": 0}),
    ("serq-w4a8", {"method": "serq", "format": "w4a8", "rank": 64}),
    ("serq+gptq-mxfp4", {"method": "serq", "format": "mxfp4", "rank": 64, "gptq": True}),
]


def run_cell(fields: dict, dtype: torch.dtype, windows: int, calib_windows: int) -> dict:
    model, tokenizer = load_model(MODEL, dtype=dtype)
    config = serq_ao.SERQConfig(**fields)
    calibration = None if fields["method"] == "rtn" and not fields.get("gptq") else calibration_batches(
        tokenizer, "wiki", calib_windows)
    started = time.perf_counter()
    report = serq_ao.quantize_model(model, config, calibration)
    seconds = time.perf_counter() - started
    evaluation = evaluation_windows(tokenizer, "wiki", n_windows=windows)
    with torch.no_grad():
        logits = model(input_ids=evaluation[:1], use_cache=False).logits.contiguous()
    result = perplexity(model, evaluation)
    return {
        "config": fields,
        "ppl": repr(result.ppl),
        "logits_sha256": hashlib.sha256(logits.view(torch.uint8).numpy().tobytes()).hexdigest(),
        "bits": report.effective_bits,
        "quantize_seconds": seconds,
        "windows": result.windows,
    }


def compare(paths: list[Path]) -> None:
    runs = [json.loads(p.read_text()) for p in paths]
    names = [n for n in runs[0]["cells"] if all(n in r["cells"] for r in runs)]
    print("| cell | " + " | ".join(f"{r['label']} ({r['dtype']})" for r in runs) + " | bitwise equal |")
    print("|---|" + "---:|" * len(runs) + "---|")
    for name in names:
        cells = [r["cells"][name] for r in runs]
        same = all(c["ppl"] == cells[0]["ppl"] and c["logits_sha256"] == cells[0]["logits_sha256"] for c in cells)
        print(f"| {name} | " + " | ".join(f"{float(c['ppl']):.4f}" for c in cells) + f" | {'yes' if same else 'no'} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", help="names the results file (e.g. before, after)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows (default 8)")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--cells", default=",".join(n for n, _ in CELLS), help="from: " + ", ".join(n for n, _ in CELLS))
    parser.add_argument("--compare", nargs="+", type=Path, metavar="JSON", help="print these results side by side")
    args = parser.parse_args(argv)
    if args.compare:
        compare(args.compare)
        return 0
    if not args.label:
        parser.error("--label is required (unless --compare)")
    known = dict(CELLS)
    chosen = args.cells.split(",")
    unknown = [c for c in chosen if c not in known]
    if unknown:
        parser.error(f"--cells: unknown {unknown}; allowed: {', '.join(known)}")
    path = RESULTS / f"refactor_check_{args.label}_{args.dtype}.json"
    run = json.loads(path.read_text()) if path.exists() else {"label": args.label, "dtype": args.dtype, "cells": {}}
    for name in chosen:
        if name in run["cells"]:
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        run["cells"][name] = run_cell(known[name], getattr(torch, args.dtype), args.windows, args.calib_windows)
        write_json(path, run)  # after every cell, so a rerun resumes
        print(f"{name}: ppl {float(run['cells'][name]['ppl']):.4f}", file=sys.stderr, flush=True)
    compare([path])
    return 0


if __name__ == "__main__":
    sys.exit(main())
