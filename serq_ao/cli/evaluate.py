"""serq eval ppl."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from serq_ao.cli.common import UsageError, check_positions, check_token_ids, progress_bar, status
from serq_ao.files import strict_json


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise UsageError(f"--text: no such file: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"--text: {path} is a folder, expected a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--text: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def cmd_eval_ppl(args: argparse.Namespace, err: Console) -> int:
    from serq_ao.data import evaluation_windows, text_windows
    from serq_ao.eval import perplexity
    from serq_ao.models import load_model

    text = _read_text(args.text) if args.text is not None else None
    source = args.text if text is not None else args.corpus
    with status(err, f"loading {args.model}", args.quiet):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
        try:
            if text is not None:
                windows = text_windows(tokenizer, text, args.windows, args.seqlen)
            else:
                windows = evaluation_windows(tokenizer, args.corpus, args.windows, args.seqlen)
        except ValueError as e:  # too many windows for the text
            raise UsageError(f"--windows / --seqlen: {e}") from e
        check_positions(model, "--seqlen", windows.shape[1])
        check_token_ids(windows, model)
    with progress_bar(err, args.quiet) as progress:
        task = progress.add_task(f"perplexity on {source}", total=windows.shape[0])
        result = perplexity(model, windows, batch_size=args.batch_size, on_batch=lambda k: progress.advance(task, k))
    record = {"model": str(args.model), "corpus": None if text is not None else args.corpus,
              "text": args.text, "seqlen": args.seqlen, **result.to_dict()}
    if args.json:
        print(strict_json(record))
        return 0
    table = Table(title=f"Perplexity, {args.text}" if text is not None else f"Perplexity, {args.corpus} evaluation split")
    for column in ("model", "ppl", "windows", "tokens", "seconds"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row(record["model"], f"{result.ppl:.2f}", str(result.windows), str(result.tokens), f"{result.seconds:.1f}")
    Console().print(table)
    return 0


def cmd_eval_tasks(args: argparse.Namespace, err: Console) -> int:
    from serq_ao.eval.tasks import check_tasks, evaluate_tasks, task_manager
    from serq_ao.models import load_model

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for path in args.include_path:
        if not Path(path).is_dir():
            raise UsageError(f"--include-path: {path!r} is not a folder of lm-eval task YAMLs")
    try:  # before loading anything: a wrong task name should cost nothing
        check_tasks(tasks, task_manager(args.include_path))
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    with status(err, f"loading {args.model}", args.quiet):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    with progress_bar(err, args.quiet) as progress:
        bar = progress.add_task(f"zero-shot {', '.join(tasks)}", total=None)
        result = evaluate_tasks(
            model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size, include_paths=args.include_path,
            on_progress=lambda done, total: progress.update(bar, completed=done, total=total),
        )
    record = {"model": str(args.model), **result.to_dict()}
    if args.json:
        print(strict_json(record))
        return 0
    limit = f"first {args.limit} documents per task" if args.limit else "all documents"
    table = Table(title=f"Zero-shot accuracy (lm-eval {result.lm_eval_version}), {args.model}, {limit}")
    for column in ("task", "samples", "acc", "acc_norm"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task in result.tasks:
        cells = [f"{task.metrics[m]:.4f} ± {task.stderr.get(m, float('nan')):.4f}" if m in task.metrics else "—"
                 for m in ("acc", "acc_norm")]
        table.add_row(task.task, str(task.samples), *cells)
    Console().print(table)
    return 0
