"""serq eval ppl."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from serq_ao.cli.common import UsageError, progress_bar, status


def cmd_eval_ppl(args: argparse.Namespace, err: Console) -> int:
    from serq_ao.data import evaluation_windows
    from serq_ao.eval import perplexity
    from serq_ao.models import load_model

    with status(err, f"loading {args.model}", args.quiet):
        model, tokenizer = load_model(args.model)
        try:
            windows = evaluation_windows(tokenizer, args.corpus, args.windows, args.seqlen)
        except ValueError as e:  # too many windows for the corpus
            raise UsageError(str(e)) from e
    with progress_bar(err, args.quiet) as progress:
        task = progress.add_task(f"perplexity on {args.corpus}", total=windows.shape[0])
        result = perplexity(model, windows, batch_size=args.batch_size, on_batch=lambda k: progress.advance(task, k))
    record = {"model": str(args.model), "corpus": args.corpus, "seqlen": args.seqlen, **result.to_dict()}
    if args.json:
        print(json.dumps(record))
        return 0
    table = Table(title=f"Perplexity, {args.corpus} evaluation split")
    for column in ("model", "ppl", "windows", "tokens", "seconds"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row(record["model"], f"{result.ppl:.2f}", str(result.windows), str(result.tokens), f"{result.seconds:.1f}")
    Console().print(table)
    return 0
