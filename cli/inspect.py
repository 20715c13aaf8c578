"""serq inspect: the dataflow plan of a model (more per-linear detail to come)."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from serq_ao.cli.common import status


def cmd_inspect(args: argparse.Namespace, err: Console) -> int:
    from serq_ao.models import load_model
    from serq_ao.passes import analyze, plan_table

    with status(err, f"loading and tracing {args.model}", args.quiet):
        model, _ = load_model(args.model)
        plan = analyze(model)
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        Console().print(plan_table(plan, layer_limit=args.layers or None))
    return 0
