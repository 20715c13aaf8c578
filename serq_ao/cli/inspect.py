"""serq inspect: the dataflow plan of a float model, and the linears of a quantized one.

Per quantized linear: rank, bits per weight, the spread of the flattening scales, the share
of saliency in the top-r channels and the relative output error on calibration data
(:mod:`serq_ao.quant.diagnostics`). A quantized folder carries these from ``serq quantize``; for a
float model ``--stats`` (or ``--plot``) quantizes a copy in memory to measure them. Where the
ranks differ per linear (``--rank-allocation error``), a table gives each layer's rank per
linear kind.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from serq_ao.cli.common import (
    StageProgress,
    UsageError,
    calibration_from_args,
    check_error_windows,
    checked_plan,
    config_from_args,
    progress_bar,
    status,
)
from serq_ao.files import strict_json

def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _linear_rows(report: dict, storage, diagnostics) -> list[dict]:
    """One dict per quantized linear: the pipeline's report, stored bits and diagnostics merged."""
    rows = {r["name"]: {"name": r["name"], "in_features": r["in_features"], "out_features": r["out_features"],
                        "rank": r["rank"], "bits_per_weight": r["bits"], "pre_op": r["pre_op"]}
            for r in report.get("linears", [])}
    for linear in storage.linears if storage is not None else []:
        rows.setdefault(linear.name, {"name": linear.name, "in_features": linear.in_features,
                                      "out_features": linear.out_features, "rank": linear.rank})
        rows[linear.name].update(bits_per_weight=linear.bits_per_weight,
                                 pre_op_bits_per_weight=linear.pre_op_bits_per_weight,
                                 pre_op=linear.pre_op_bits_per_weight > 0)
    for d in diagnostics.linears if diagnostics is not None else []:
        rows.setdefault(d.name, {"name": d.name, "in_features": d.in_features, "out_features": d.out_features,
                                 "rank": d.rank, "bits_per_weight": d.bits_per_weight})
        rows[d.name].update(layer=d.layer, kind=d.kind, scale_spread=d.scale_spread,
                            saliency_share=d.saliency_share, output_error=d.output_error)
    return list(rows.values())


# Column notes, shown under the tables.
LEGEND = ("spread: max / median of the flattening scales s = max|x|; top-r: share of sum s in the r "
          "largest channels; error: ||Y_q - Y|| / ||Y|| on calibration tokens")


def _linears_table(rows: list[dict], title: str, layer_limit: int | None) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("layer", "linear", "shape", "rank", "bits", "pre-op", "spread", "top-r", "error"):
        table.add_column(column, justify="left" if column == "linear" else "right", no_wrap=True)
    shown = [r for r in rows if layer_limit is None or r.get("layer") is None or r["layer"] < layer_limit]
    for r in shown:
        table.add_row(_fmt(r.get("layer"), "d"), r.get("kind", r["name"]), f"{r['in_features']}→{r['out_features']}",
                      str(r["rank"]), _fmt(r.get("bits_per_weight"), ".3f"), "yes" if r.get("pre_op") else "no",
                      _fmt(r.get("scale_spread"), ".1f"), _fmt(r.get("saliency_share"), ".3f"),
                      _fmt(r.get("output_error"), ".4f"))
    if len(shown) < len(rows):
        table.caption = f"{len(rows) - len(shown)} more linears: --layers 0 lists all"
    return table


def _kinds_table(rows: list[dict]) -> Table | None:
    """Means over layers, per linear kind: the shape of the whole model in a few rows."""
    by_kind = defaultdict(list)
    for r in rows:
        if r.get("kind") is not None:
            by_kind[r["kind"]].append(r)
    if not by_kind:
        return None
    table = Table(title="By linear kind, over all layers", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("linear", "count", "spread", "top-r", "error mean", "error max"):
        table.add_column(column, justify="left" if column == "linear" else "right", no_wrap=True)
    for kind, group in by_kind.items():
        mean = lambda key: sum(r[key] for r in group) / len(group)  # noqa: E731
        errors = [r["output_error"] for r in group if r.get("output_error") is not None]
        table.add_row(kind, str(len(group)), f"{mean('scale_spread'):.1f}", f"{mean('saliency_share'):.3f}",
                      f"{sum(errors) / len(errors):.4f}" if errors else "—", f"{max(errors):.4f}" if errors else "—")
    return table


def _ranks_table(rows: list[dict], layer_limit: int | None) -> Table | None:
    """The correction rank of each linear kind (columns) in each layer (rows), where the ranks
    differ (``--rank-allocation error``); None otherwise."""
    if len({r["rank"] for r in rows}) < 2:
        return None
    by_layer: dict[int | None, dict[str, int]] = defaultdict(dict)
    kinds: list[str] = []
    for r in rows:
        layer, kind = r.get("layer"), r.get("kind")
        if kind is None:  # a folder without diagnostics: the layer index and kind from the name
            found = re.search(r"\.(\d+)\.(.+)$", r["name"])
            layer, kind = (int(found[1]), found[2]) if found else (None, r["name"])
        if kind not in kinds:
            kinds.append(kind)
        by_layer[layer][kind] = r["rank"]
    table = Table(title="Correction rank by layer and linear kind", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    table.add_column("layer", justify="right")
    short = [kind.rsplit(".", 1)[-1] for kind in kinds]  # q_proj, not self_attn.q_proj, where unambiguous
    for header in short if len(set(short)) == len(short) else kinds:
        table.add_column(header, justify="right")
    shown = [layer for layer in by_layer if layer_limit is None or layer is None or layer < layer_limit]
    for layer in shown:
        table.add_row(_fmt(layer, "d"), *(_fmt(by_layer[layer].get(kind), "d") for kind in kinds))
    means = [[ranks[kind] for ranks in by_layer.values() if kind in ranks] for kind in kinds]
    table.add_row("mean", *(f"{sum(m) / len(m):.1f}" for m in means), style="bold")
    if len(shown) < len(by_layer):
        table.caption = f"{len(by_layer) - len(shown)} more layers: --layers 0 lists all"
    return table


def _rank_sweep(args: argparse.Namespace) -> dict | None:
    """--sweep FILE's rank sweep: a JSON object with one under "rank_sweep" (as
    benchmarks/accuracy.py's results have), or the sweep itself; None without --sweep."""
    from serq_ao.plots import check_rank_sweep

    if not args.sweep:
        return None
    path = Path(args.sweep)
    if not path.is_file():
        raise UsageError(f"--sweep: no such file: {args.sweep}")
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise UsageError(f"--sweep: {path} is not JSON: {e}") from None
    try:
        return check_rank_sweep(record.get("rank_sweep", record) if isinstance(record, dict) else record,
                                f"--sweep: {path}")
    except ValueError as e:
        raise UsageError(str(e)) from None


def _diagnose_float_model(model, tokenizer, args, err: Console):
    from serq_ao.quant.diagnostics import quantize_with_diagnostics
    from serq_ao.quant.pipeline import quantize_model

    config = config_from_args(args)
    plan = checked_plan(model, config)
    check_error_windows(args)
    batches = calibration_from_args(tokenizer, args, model)
    with progress_bar(err, args.quiet) as progress:
        report, diagnostics = quantize_with_diagnostics(
            model, config, batches, quantize=quantize_model, error_windows=args.error_windows, plan=plan,
            progress=StageProgress(progress),
        )
    return config, report, diagnostics


def cmd_inspect(args: argparse.Namespace, err: Console) -> int:
    from serq_ao.quant.diagnostics import Diagnostics
    from serq_ao.models import load_model
    from serq_ao.quant.packing import storage_report
    from serq_ao.passes import analyze, plan_table
    from serq_ao.integrations.serialization import is_quantized_folder, read_report

    if args.sweep and args.plot is None:
        raise UsageError("--sweep applies with --plot only")
    sweep = _rank_sweep(args)  # before any work
    if args.plot is not None:
        from serq_ao.files import check_destination
        from serq_ao.plots import FIGURES, require_matplotlib

        require_matplotlib()
        if Path(args.plot).exists() and not Path(args.plot).is_dir():
            raise UsageError(f"--plot must be a folder to write PNG files into, got the file {args.plot}")
        for name in FIGURES:  # before any work; checked again, under a lock, when written
            check_destination(Path(args.plot) / name, option="--plot", folder=False, overwrite=args.overwrite)
    layer_limit = args.layers or None
    record: dict = {"model": str(args.model)}
    tables: list = []
    quantized = is_quantized_folder(args.model)
    source = str(args.model)
    with status(err, f"loading {args.model}", args.quiet):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    if quantized:
        saved = read_report(args.model)
        source = saved.get("source", source)
        config = getattr(model, "serq_config", None)
        storage = storage_report(model)
        diagnostics = Diagnostics.from_dict(saved["diagnostics"]) if saved.get("diagnostics") else None
        rows = _linear_rows(saved.get("report", {}), storage if storage.linears else None, diagnostics)
        record.update(config=None if config is None else config.to_dict(), source=source)
        if storage.linears:
            record.update(model_bytes=storage.model_bytes, unquantized_bytes=storage.unquantized_bytes)
        title = "Quantized linears" + (f": {config.method}, {config.format}" if config is not None else "")
        if config is not None and config.rotation:
            title += f", Hadamard rotation {config.rotation}"
        if config is not None and config.correction_rank and config.rank_allocation != "uniform":
            title += f", ranks allocated by {config.rank_allocation} (budget rank {config.rank})"
        if storage.linears:
            title += f", {storage.model_bytes / 2**20:.1f} MiB in all"
        if diagnostics is None:
            err.print("serq: this folder has no diagnostics (quantized with --no-diagnostics or by an older serq)")
    else:
        with status(err, f"tracing {args.model}", args.quiet):
            plan = analyze(model)
        record["plan"] = plan.to_dict()
        tables.append(plan_table(plan, layer_limit=layer_limit))
        diagnostics, rows = None, None
        if args.stats or args.plot is not None:  # quantizes this in-memory copy
            config, report, diagnostics = _diagnose_float_model(model, tokenizer, args, err)
            rows = _linear_rows(report.to_dict(), None, diagnostics)
            record["config"] = config.to_dict()
            title = f"Linears if quantized: {config.method}, {config.format}, rank {config.correction_rank}"
            if config.correction_rank and config.rank_allocation != "uniform":
                title += f" (allocated by {config.rank_allocation})"
            if config.rotation:
                title += f", Hadamard rotation {config.rotation}"
    if rows is not None:
        record["linears"] = rows
        tables.append(_linears_table(rows, title, layer_limit))
        kinds = _kinds_table(rows)
        if kinds is not None:
            tables.append(kinds)
        ranks = _ranks_table(rows, layer_limit)
        if ranks is not None:
            tables.append(ranks)
    if diagnostics is not None:
        record["saliency_curves"] = diagnostics.to_dict()["curves"]
        record["error_tokens"] = diagnostics.error_tokens
    if args.plot is not None:
        from serq_ao.plots import plot_diagnostics

        if diagnostics is None:
            raise UsageError(f"--plot: {args.model} has no diagnostics to plot; re-quantize it with --diagnostics")
        with status(err, f"plotting into {args.plot}", args.quiet):
            written = plot_diagnostics(diagnostics, args.plot, sweep=sweep,
                                       title=Path(source).name, overwrite=args.overwrite)
        record["plots"] = [str(p) for p in written]
        if not args.quiet:
            err.print("wrote " + ", ".join(str(p) for p in written))
    if args.json:
        print(strict_json(record))
    else:
        console = Console()
        for table in tables:
            console.print(table)
        if rows is not None:
            console.print(LEGEND, style="dim", highlight=False)
    return 0
