"""serq export."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from serq_ao.cli.common import UsageError, check_positions, status
from serq_ao.files import strict_json


def cmd_export(args: argparse.Namespace, err: Console) -> int:
    from pathlib import Path

    from serq_ao.files import claim_output
    from serq_ao.integrations.export import export_model
    from serq_ao.models import load_model

    out = Path(args.out)
    if out.suffix != ".pt2":
        raise UsageError(f"--out must name a .pt2 file, got {out}")
    with claim_output(out, option="--out", folder=False, overwrite=args.overwrite) as output:
        with status(err, f"loading {args.model}", args.quiet):
            model, _ = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
        check_positions(model, "--seqlen", args.seqlen)
        what = "AOTInductor package" if args.aoti else "torch.export program"
        with status(err, f"exporting a {what} for inputs ({args.batch_size}, {args.seqlen}) and running it", args.quiet):
            result = export_model(model, output, batch=args.batch_size, seqlen=args.seqlen, aoti=args.aoti)
    if args.json:
        print(strict_json({"model": str(args.model), **result.to_dict()}))
    else:
        table = Table(title=f"Exported {args.model}")
        for column in ("file", "kind", "input", "serq ops", "smoke test", "seconds"):
            table.add_column(column)
        smoke = f"{'ok' if result.smoke_ok else 'MISMATCH'} (max |diff| {result.smoke_max_abs_diff:.2e})"
        table.add_row(result.out, result.kind, f"{result.batch} x {result.seqlen}", str(result.serq_nodes), smoke,
                      f"{result.seconds:.1f}")
        Console().print(table)
    return 0 if result.smoke_ok else 1
