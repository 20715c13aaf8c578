"""Wall time to quantize the default model: SERQ vs L2QER vs LQER, same calibration.

    .venv/bin/python benchmarks/quantize_time.py
    .venv/bin/python benchmarks/quantize_time.py --repeats 1 --calib-windows 8

The paper claims SERQ's error reconstruction is 4.5x faster than L2QER's: SERQ's correction
is the quantized salient columns (no decomposition), LQER and L2QER take an SVD of every
linear's weight error. All methods get the same calibration statistics, computed once and
timed apart; each method then quantizes a fresh copy of the model (MXFP4, evaluation mode,
which does exactly the packed model's arithmetic), ``--repeats`` times, and we keep the
median of each stage: transform (flattening / folding) and quantize (reconstruction plus
rounding of every linear). Writes benchmarks/results/quantize_time.json; a table last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serq_ao  # noqa: E402
from serq_ao.bench import machine_info, write_json  # noqa: E402
from serq_ao.quant.calibration import calibrate  # noqa: E402
from serq_ao.quant.config import SERQConfig  # noqa: E402
from serq_ao.data import calibration_batches  # noqa: E402
from serq_ao.models import load_model  # noqa: E402
from serq_ao.passes import analyze  # noqa: E402
from serq_ao.quant.pipeline import quantize_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"
METHODS = ("serq", "l2qer", "lqer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--rank", type=int, default=64, help="SERQ's r")
    parser.add_argument("--lowrank-rank", type=int, default=32, help="LQER / L2QER's k")
    parser.add_argument("--format", default="mxfp4", choices=("mxfp4", "w4a8", "w4a4"))
    parser.add_argument("--out", type=Path, default=RESULTS / "quantize_time.json")
    args = parser.parse_args()
    if args.repeats < 1 or args.calib_windows < 1:
        parser.error("--repeats and --calib-windows must be positive")

    model, tokenizer = load_model(MODEL)
    stats = calibrate(model, analyze(model), calibration_batches(tokenizer, "wiki", args.calib_windows))
    del model

    results = []
    for method in METHODS:
        config = SERQConfig(method=method, format=args.format, rank=args.rank, lowrank_rank=args.lowrank_rank)
        runs = []
        for _ in range(args.repeats):
            model, _ = load_model(MODEL)
            report = quantize_model(model, config, stats)
            runs.append(report.seconds)
            del model
        median = {stage: statistics.median(run[stage] for run in runs) for stage in ("transform", "quantize", "total")}
        results.append({"method": method, "config": config.to_dict(), "seconds": median, "runs": runs})
        print(f"{method:6s} quantize {median['quantize']:.2f} s, total {median['total']:.2f} s", flush=True)

    serq = next(r for r in results if r["method"] == "serq")["seconds"]
    for result in results:
        result["over_serq"] = {stage: result["seconds"][stage] / serq[stage] for stage in ("quantize", "total")}
    record = {
        "model": MODEL,
        "calibration": {"corpus": "wiki", "windows": args.calib_windows, "seconds": stats.seconds},
        "results": results,
        "machine": machine_info(),
        "command": " ".join(["benchmarks/quantize_time.py", *sys.argv[1:]]),
    }
    write_json(args.out, record)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Time to quantize {MODEL} ({args.format}, calibration {stats.seconds:.0f} s not included)")
    for column in ("method", "transform s", "reconstruct + quantize s", "total s", "quantize / SERQ", "total / SERQ"):
        table.add_column(column, justify="right")
    for r in results:
        s = r["seconds"]
        table.add_row(r["method"], f"{s['transform']:.2f}", f"{s['quantize']:.2f}", f"{s['total']:.2f}",
                      f"{r['over_serq']['quantize']:.2f}", f"{r['over_serq']['total']:.2f}")
    Console(width=200).print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
