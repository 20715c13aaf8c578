"""Accuracy of every method and format on the default model, per docs/protocol.md.

    .venv/bin/python benchmarks/accuracy.py                      # everything (hours on 2 cores)
    .venv/bin/python benchmarks/accuracy.py --formats mxfp4 --methods rtn,serq --ranks 64

Each cell (method, format, rank, calibration corpus) is quantized from a fresh copy of the
model, evaluated on 32 wiki windows, and appended to
benchmarks/results/accuracy_smollm2.cells.jsonl as soon as it is done, so an interrupted run
resumes where it stopped (``--fresh`` starts over). Calibration statistics are computed once
per corpus and shared by all cells. The tables (.json and .md) are rebuilt from all cells at
the end of every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import serq_ao  # noqa: E402,F401
from cells import CELL_SETTINGS, cell_setting, is_default_cell, rank_sweep  # noqa: E402
from serq_ao.bench import write_json, write_text  # noqa: E402
from serq_ao.quant.calibration import calibrate  # noqa: E402
from serq_ao.quant.statistics import CalibrationStats  # noqa: E402
from serq_ao.quant.config import FORMATS, METHODS, SERQConfig  # noqa: E402
from serq_ao.data import calibration_batches, evaluation_windows  # noqa: E402
from serq_ao.eval import perplexity  # noqa: E402
from serq_ao.models import load_model  # noqa: E402
from serq_ao.passes import analyze  # noqa: E402
from serq_ao.quant.pipeline import quantize_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"
ROW_ORDER = ["fp", "rtn", "smoothquant", "lqer", "l2qer", "serq", "serq+gptq"]


# A cell's settings beyond (method, format, rank, corpus, scale rule) and their defaults
SETTINGS = CELL_SETTINGS


def cell_settings(method: str, fmt: str, args) -> dict:
    """The settings a cell of ``method`` at ``fmt`` runs with: the command line's where they
    apply, the default where they do not (so one key names one quantization)."""
    serq, gptq = method.startswith("serq"), method.endswith("+gptq")
    return {
        "folds": args.folds,
        "residual_order": args.residual_order if serq else "per_group",
        "weight_scales": args.weight_scales if method != "fp" else "rule",
        "rotation": args.rotation if method != "fp" else 0,
        "gptq_order": args.gptq_order if gptq else "columns",
        "rank_allocation": args.rank_allocation if serq else "uniform",
        "flattening_strength": args.flattening_strength if serq else 1.0,
        "saliency_unit": args.saliency_unit if serq else "channel",
    }


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """The command-line options of :data:`SETTINGS` (defaults: SETTINGS')."""
    parser.add_argument("--folds", choices=("all", "norms"), default="all",
                        help="norms: keep 1/s of linear-produced inputs a run-time pre-op (no quantized weight absorbs it)")
    parser.add_argument("--residual-order", choices=("per_group", "global"), default="per_group",
                        help="SERQ's order for norm-fed linears (SERQConfig.residual_order); other methods have none")
    parser.add_argument("--weight-scales", choices=("rule", "search"), default="rule",
                        help="weight and R scales by the format's rule or by error (SERQConfig.weight_scales)")
    parser.add_argument("--rotation", type=int, choices=(0, 32, 64, 128), default=0,
                        help="block Hadamard rotation of every quantized linear's input (SERQConfig.rotation)")
    parser.add_argument("--gptq-order", choices=("columns", "hessian"), default="columns",
                        help="GPTQ's column order for the +gptq methods (SERQConfig.gptq_order)")
    parser.add_argument("--rank-allocation", choices=("uniform", "error"), default="uniform",
                        help="SERQ's rank per linear (SERQConfig.rank_allocation): --ranks is then the budget")
    parser.add_argument("--flattening-strength", type=float, default=1.0,
                        help="SERQ's s = max|x| ** strength (SERQConfig.flattening_strength); 1: the paper")
    parser.add_argument("--saliency-unit", choices=("channel", "block"), default="channel",
                        help="what SERQ's order moves (SERQConfig.saliency_unit): block needs --rotation")


def cell_key(cell: dict) -> tuple:
    return (cell["method"], cell["format"], cell["rank"], cell["calib_corpus"], cell["scale_mode"],
            *(cell_setting(cell, name) for name in SETTINGS))


def load_cells(path: Path) -> list[dict]:
    """The cells appended so far; a last line cut short by a kill is dropped (its cell reruns)."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    cells = []
    for number, line in enumerate(lines, 1):
        try:
            cells.append(json.loads(line))
        except ValueError:
            if number != len(lines):
                raise ValueError(f"{path}, line {number}: not a JSON cell") from None
            print(f"{path}: dropping a cut-short last line", file=sys.stderr)
    return cells


def statistics(corpus: str, windows: int, cache: Path) -> CalibrationStats:
    path = cache / f"calibration_{MODEL}_{corpus}_{windows}.pt"
    if path.exists():
        return CalibrationStats.load(path)
    model, tokenizer = load_model(MODEL)
    stats = calibrate(model, analyze(model), calibration_batches(tokenizer, corpus, windows))
    stats.save(path)
    return stats


def quantized_model(method: str, fmt: str, rank: int, corpus: str, scale_mode: str, calib_windows: int,
                    folds: str, cache: Path, residual_order: str = "per_group", weight_scales: str = "rule",
                    rotation: int = 0, gptq_order: str = "columns", rank_allocation: str = "uniform",
                    flattening_strength: float = 1.0, saliency_unit: str = "channel"):
    """A fresh copy of the model quantized for one cell: (model, tokenizer, bits, quantize seconds)."""
    model, tokenizer = load_model(MODEL)
    if method == "fp":
        return model, tokenizer, 32.0, 0.0
    base, gptq = method.removesuffix("+gptq"), method.endswith("+gptq")
    config = SERQConfig(
        method=base, format=fmt, rank=rank, scale_mode=scale_mode, gptq=gptq, fold_into_linears=folds == "all",
        residual_order=residual_order if base == "serq" else "per_group", weight_scales=weight_scales,
        rotation=rotation, gptq_order=gptq_order, rank_allocation=rank_allocation,
        flattening_strength=flattening_strength, saliency_unit=saliency_unit,
    )
    if config.needs_input_ids:  # GPTQ and the rank allocation calibrate inside, on the layers' own inputs
        calibration = calibration_batches(tokenizer, corpus, calib_windows)
    else:
        calibration = statistics(corpus, calib_windows, cache) if base != "rtn" else None
    started = time.perf_counter()
    report = quantize_model(model, config, calibration)
    # shared statistics were computed once; count them in every cell's wall time
    shared = calibration.seconds if isinstance(calibration, CalibrationStats) else 0.0
    return model, tokenizer, report.effective_bits, time.perf_counter() - started + shared


def run_cell(method: str, fmt: str, rank: int, corpus: str, scale_mode: str, args, cache: Path) -> dict:
    settings = cell_settings(method, fmt, args)
    model, tokenizer, bits, seconds = quantized_model(method, fmt, rank, corpus, scale_mode, args.calib_windows,
                                                      cache=cache, **settings)
    windows = evaluation_windows(tokenizer, "wiki", n_windows=args.windows)
    result = perplexity(model, windows)
    return {
        "method": method,
        "format": fmt,
        "rank": rank,
        "calib_corpus": corpus,
        "scale_mode": scale_mode,
        **settings,
        "ppl": result.ppl,
        "windows": result.windows,
        "tokens": result.tokens,
        "bits": bits,
        "quantize_seconds": seconds,
        "eval_seconds": result.seconds,
    }


def flattening_label(strength: float) -> str:
    return "" if strength == 1.0 else " (no flattening)" if strength == 0.0 else f" (flattening {strength:g})"


def tables(cells: list[dict]) -> str:
    """Markdown: the method x format table, the rank sweep and the calibration check."""
    by_key = {cell_key(c): c for c in cells}
    lines = [
        "## Perplexity, smollm2-135m, wiki, 32 windows",
        "",
        "In brackets: effective bits per weight of the quantized linears, and quantization wall",
        "time in seconds on 2 CPU cores (calibration on 32 wiki windows included).",
        "",
    ]
    lines += ["| method | " + " | ".join(f.upper() if f != "mxfp4" else "MXFP4 W4A4" for f in FORMATS) + " |"]
    lines += ["|---|" + "---:|" * len(FORMATS)]
    shown = []  # the cells the tables above "Other settings" show
    for method in ROW_ORDER:
        row = []
        for fmt in FORMATS:
            rank = 64 if method.startswith("serq") else 0
            fmt_key = "fp" if method == "fp" else fmt
            # the default of every setting: cell_key fills in SETTINGS' values
            cell = by_key.get(cell_key({"method": method, "format": fmt_key, "rank": rank, "calib_corpus": "wiki",
                                        "scale_mode": "floor"}))
            if cell is not None:
                shown.append(cell)
            if cell is None:
                row.append("—")
            elif method == "fp":
                row.append(f"{cell['ppl']:.2f}")
            else:
                row.append(f"{cell['ppl']:.2f} ({cell['bits']:.2f} b, {cell['quantize_seconds']:.0f} s)")
        names = {"fp": "FP32", "smoothquant": "SmoothQuant", "serq": "SERQ (r = 64)", "serq+gptq": "SERQ + GPTQ (r = 64)"}
        name = names.get(method, method.upper())
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    default = [c for c in cells if c["calib_corpus"] == "wiki" and c["scale_mode"] == "floor" and is_default_cell(c)]
    sweep = sorted((c for c in default if c["method"] == "serq" and c["format"] == "mxfp4"), key=lambda c: c["rank"])
    if sweep:
        lines += ["", "## SERQ-MXFP4 rank sweep", "", "| rank | bits | perplexity |", "|---:|---:|---:|"]
        lines += [f"| {c['rank']} | {c['bits']:.2f} | {c['ppl']:.2f} |" for c in sweep]
    shown += sweep
    other = [c for c in cells if c not in shown]
    if other:
        lines += ["", "## Other settings", "",
                  "| method | format | rank | calibration | scale rule | weight scales | rotation | folds into "
                  "| residual order | perplexity | bits | seconds |",
                  "|---|---|---:|---|---|---|---:|---|---|---:|---:|---:|"]
        lines += [
            f"| {c['method']}{' (hessian order)' if c.get('gptq_order', 'columns') == 'hessian' else ''}"
            f"{' (ranks by error)' if c.get('rank_allocation', 'uniform') != 'uniform' else ''}"
            f"{flattening_label(c.get('flattening_strength', 1.0))}"
            f"{' (block order)' if c.get('saliency_unit', 'channel') == 'block' else ''} | {c['format']} | "
            f"{c['rank']} | {c['calib_corpus']} | {c['scale_mode']} | "
            f"{c.get('weight_scales', 'rule')} | {c.get('rotation', 0) or 'none'} | "
            f"{'norms and linears' if c.get('folds', 'all') == 'all' else 'norms only'} | "
            f"{c.get('residual_order', 'per_group').replace('_', ' ')} | {c['ppl']:.2f} | {c['bits']:.2f} | "
            f"{c['quantize_seconds']:.0f} |"
            for c in other
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(ROW_ORDER), help="from: " + ", ".join(ROW_ORDER))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--ranks", default="64", help="SERQ ranks (comma-separated)")
    parser.add_argument("--calib-corpora", default="wiki")
    parser.add_argument("--scale-modes", default="floor")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--calib-windows", type=int, default=32)
    add_settings_options(parser)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fresh", action="store_true", help="forget earlier cells")
    parser.add_argument("--tables-only", action="store_true",
                        help="run no cell: rebuild the .json and .md from the cells on file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m.removesuffix("+gptq") not in ("fp", *METHODS)]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed: fp, {', '.join(METHODS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    cells_path = RESULTS / "accuracy_smollm2.cells.jsonl"
    cache = RESULTS / ".cache"
    cache.mkdir(exist_ok=True)
    if args.fresh and cells_path.exists():
        cells_path.unlink()
    done = {cell_key(c) for c in load_cells(cells_path)}
    plan = []
    for method in methods:
        for fmt in (["fp"] if method == "fp" else args.formats.split(",")):
            for rank in ([int(r) for r in args.ranks.split(",")] if method.startswith("serq") else [0]):
                for corpus in (["wiki"] if method in ("fp", "rtn") else args.calib_corpora.split(",")):
                    for mode in (["floor"] if fmt != "mxfp4" else args.scale_modes.split(",")):
                        plan.append((method, fmt, rank, corpus, mode))
    for index, cell_args in enumerate([] if args.tables_only else plan, 1):
        key = (*cell_args, *cell_settings(cell_args[0], cell_args[1], args).values())
        if key in done:
            continue
        print(f"[{index}/{len(plan)}] {key}", file=sys.stderr, flush=True)
        cell = run_cell(*cell_args, args, cache)
        with open(cells_path, "a") as f:
            f.write(json.dumps(cell) + "\n")
    cells = load_cells(cells_path)
    summary = {
        "model": MODEL,
        "protocol": "docs/protocol.md: wiki evaluation split, 32 windows of 1024 + BOS, fp32",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "processor": platform.machine()},
        "cells": cells,
        "rank_sweep": rank_sweep(cells),  # what `serq inspect --plot DIR --sweep THIS_FILE` plots
    }
    write_json(RESULTS / "accuracy_smollm2.json", summary)
    markdown = tables(cells)
    write_text(RESULTS / "accuracy_smollm2.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
