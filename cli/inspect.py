"""serq inspect: the dataflow plan of a float model, or the linears of a quantized one."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from serq_ao.cli.common import status


def _quantized_table(storage, config) -> Table:
    title = "Quantized linears" + (f": {config.method}, {config.format}" if config is not None else "")
    table = Table(title=f"{title}, {storage.model_bytes / 2**20:.1f} MiB in all")
    for column in ("linear", "d_in", "d_out", "rank", "bits/weight", "of which pre-op"):
        table.add_column(column, justify="left" if column == "linear" else "right")
    for linear in storage.linears:
        table.add_row(linear.name, str(linear.in_features), str(linear.out_features), str(linear.rank),
                      f"{linear.bits_per_weight:.3f}", f"{linear.pre_op_bits_per_weight:.3f}")
    return table


def cmd_inspect(args: argparse.Namespace, err: Console) -> int:
    from serq_ao.models import load_model
    from serq_ao.packing import storage_report
    from serq_ao.passes import analyze, plan_table

    with status(err, f"loading {args.model}", args.quiet):
        model, _ = load_model(args.model)
    storage = storage_report(model)
    if storage.linears:  # a packed model: its linears are serq ops, not a plan to make
        config = getattr(model, "serq_config", None)
        if args.json:
            print(json.dumps({"model": str(args.model), "config": None if config is None else config.to_dict(),
                              **storage.to_dict()}))
        else:
            Console().print(_quantized_table(storage, config))
        return 0
    with status(err, f"tracing {args.model}", args.quiet):
        plan = analyze(model)
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        Console().print(plan_table(plan, layer_limit=args.layers or None))
    return 0
