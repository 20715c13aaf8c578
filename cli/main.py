"""``serq``: the command line of serq-ao.

Results go to stdout (a rich table, or one JSON object with ``--json``); progress and
messages go to stderr, so ``serq ... --json | jq`` always works.
"""

from __future__ import annotations

import os

# The CLI draws its own progress with rich; libraries' tqdm bars (the GGUF converter's among
# them) would interleave with it. tqdm reads this switch when it is imported, hence so early.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import serq_ao  # noqa: F401  (silences torchao's CPU-only load messages before anything imports it)
from serq_ao.data import CORPORA, DEFAULT_SEQLEN, CorpusMissingError
from serq_ao.models import DEFAULT_MODEL, ModelAssetMissingError, ModelNotFoundError


class UsageError(Exception):
    """A mistake in the command line: one line on stderr, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=True,
    )


def cmd_eval_ppl(args: argparse.Namespace, err: Console) -> int:
    from serq_ao.data import evaluation_windows
    from serq_ao.eval import perplexity
    from serq_ao.models import load_model

    with err.status(f"loading {args.model}", spinner="dots") if not args.quiet else _null():
        model, tokenizer = load_model(args.model)
        try:
            windows = evaluation_windows(tokenizer, args.corpus, args.windows, args.seqlen)
        except ValueError as e:  # too many windows for the corpus
            raise UsageError(str(e)) from e
    with _progress(err, args.quiet) as progress:
        task = progress.add_task(f"perplexity on {args.corpus}", total=windows.shape[0])
        result = perplexity(
            model,
            windows,
            batch_size=args.batch_size,
            on_batch=lambda k: progress.advance(task, k),
        )
    record = {"model": str(args.model), "corpus": args.corpus, "seqlen": args.seqlen, **result.to_dict()}
    if args.json:
        print(json.dumps(record))
    else:
        table = Table(title=f"Perplexity, {args.corpus} evaluation split")
        for column in ("model", "ppl", "windows", "tokens", "seconds"):
            table.add_column(column, justify="left" if column == "model" else "right")
        table.add_row(
            record["model"], f"{result.ppl:.2f}", str(result.windows), str(result.tokens), f"{result.seconds:.1f}"
        )
        Console().print(table)
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serq", description="SERQ 4-bit quantization toolkit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    eval_parser = commands.add_parser("eval", help="evaluate a model")
    evals = eval_parser.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    ppl = evals.add_parser("ppl", help="perplexity per ../shared/protocol.md")
    ppl.add_argument("model", help=f"a model name ({DEFAULT_MODEL}), a Hugging Face folder or a .gguf file")
    ppl.add_argument("--corpus", choices=CORPORA, default="wiki")
    ppl.add_argument("--windows", type=_positive_int, default=None, help="number of windows (default: all)")
    ppl.add_argument("--seqlen", type=_positive_int, default=DEFAULT_SEQLEN, help="tokens per window")
    ppl.add_argument("--batch-size", type=_positive_int, default=1)
    ppl.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    ppl.add_argument("--quiet", action="store_true", help="no progress output")
    ppl.set_defaults(handler=cmd_eval_ppl)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    err = Console(stderr=True)
    try:
        return args.handler(args, err)
    except (UsageError, ModelNotFoundError) as e:
        if args.debug:
            raise
        err.print(f"[red]serq: error:[/red] {e}", highlight=False)
        return 2
    except (ModelAssetMissingError, CorpusMissingError) as e:
        if args.debug:
            raise
        err.print(f"[red]serq: error:[/red] {e}", highlight=False)
        return 1
    except KeyboardInterrupt:
        err.print("serq: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
