"""``serq``: the command line of serq-ao.

Results go to stdout (a rich table, or one JSON object with ``--json``); progress and
messages go to stderr, so ``serq ... --json | jq`` always works.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import re
import sys

# Only light modules here: building the parser (--help, --version, usage errors) must not import
# torch, transformers or torchao (seconds); each command imports what it needs when it runs.
from serq_ao import __version__
from serq_ao.cli.common import non_negative_float, non_negative_int, positive_int, unit_float
from serq_ao.messages import user_error_status
from serq_ao.options import (
    CONFIG_DEFAULTS,
    CORPORA,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CALIBRATION_WINDOWS,
    DEFAULT_MODEL,
    DEFAULT_RECIPE,
    DEFAULT_SEQLEN,
    DEVICE_HELP,
    DTYPE_NAMES,
    EMBEDDING_FORMATS,
    EmbeddingFormat,
    FORMATS,
    GPTQ_ORDERS,
    METHODS,
    RANK_ALLOCATIONS,
    RECIPES,
    RESIDUAL_ORDERS,
    ROTATION_SIZES,
    SALIENCY_UNITS,
    SCALE_MODES,
    SHIPPED_TASKS,
    WEIGHT_SCALES,
    recipe_options,
)

MODEL_HELP = (f"a model name ({DEFAULT_MODEL}), a Hugging Face folder, a Hub id (org/name: from the Hugging Face "
              "cache, or downloaded), a .gguf file or a serq output folder")


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each argument with its default, where it has one and does not say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default in (None, False, [], argparse.SUPPRESS) or "default" in text
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes on one line (argparse prints the whole usage first) and
    every default in the help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _check_value(self, action, value):
        # argparse's own check, plus the closest choice for a typo (Python 3.14 has suggest_on_error)
        if action.choices is None or value in action.choices:
            return
        choices = [str(c) for c in action.choices]
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {', '.join(choices)}){hint}")


DEBUG_HELP = "show tracebacks and debug logs"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    # after the command as well as before it; SUPPRESS: not given here leaves `serq --debug`'s value
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


# What --device may say; whether this machine has that device is checked after parsing
# (check_device), since asking torch costs seconds that --help and usage errors must not.
DEVICE_PATTERN = re.compile(r"(cpu|cuda)(:\d+)?|auto")  # the forms torch.device takes for these


def _device_argument(text: str) -> str:
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"device must be {DEVICE_HELP}, got {text!r}")
    return text


def check_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A --device this machine lacks: a usage error before the command runs (cpu needs no check)."""
    if getattr(args, "device", "cpu") == "cpu":
        return
    from serq_ao.models import resolve_device

    try:
        resolve_device(args.device)
    except ValueError as e:
        command_parser(parser, args).error(f"argument --device: {e}")


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command ``args`` were parsed for (its name prefixes errors)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return command_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def option_defaults(option: str) -> tuple[dict[str, object], object]:
    """What a quantization option left out is: ({format: value} under method serq's default
    recipe, the value otherwise: SERQConfig's default, which recipe paper and the other
    methods use)."""
    return ({f: recipe_options(DEFAULT_RECIPE, f).get(option, CONFIG_DEFAULTS[option]) for f in FORMATS},
            CONFIG_DEFAULTS[option])


def default_text(option: str) -> str:
    """The help's statement of ``option``'s default, built from the recipe and SERQConfig."""
    return render_default(*option_defaults(option))


def render_default(by_format: dict[str, object], otherwise) -> str:
    """"default X" or, where method serq's recipe differs, what it is per format and otherwise."""
    if all(v == otherwise for v in by_format.values()):
        return f"default {_shown(otherwise)}"
    groups: dict[str, list[str]] = {}
    for fmt, value in by_format.items():
        groups.setdefault(_shown(value), []).append(fmt)
    if len(groups) == 1:
        recipe = next(iter(groups))
    else:
        recipe = ", ".join(f"{value} at --format {' and '.join(fmts)}" for value, fmts in groups.items()) + ","
    return f"default {recipe} with method serq's --recipe {DEFAULT_RECIPE}, {_shown(otherwise)} otherwise"


def _loading_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=_device_argument, default="cpu", help=f"where the model runs: {DEVICE_HELP} "
                        "(default cpu)")
    parser.add_argument("--dtype", choices=("auto", *DTYPE_NAMES), default="auto",
                        help="the model's dtype: auto (the checkpoint's own, default), float32, bfloat16 or float16; "
                             "quantization math keeps its own precision whatever this is")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the modeling code a model folder ships (its config.json's auto_map), as "
                             "transformers' trust_remote_code=True does: only for folders you trust")


def _quantization_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="mxfp4", help="mxfp4 (W4A4 MXFP4), w4a8 or w4a4 (INT)")
    parser.add_argument("--recipe", choices=RECIPES, default=None,
                        help=f"method serq's options by name (default {DEFAULT_RECIPE}): rotated-gptq (no flattening, "
                             "block order, a Hadamard rotation of the format's weight group, GPTQ in SERQ's order: "
                             "the best measured) or paper (SERQ as published); options given below override it")
    # left out (None): the recipe's or SERQConfig's default; given to a method or format that does not use it: an error
    parser.add_argument("--rank", type=non_negative_int, default=None,
                        help=f"SERQ correction rank, a multiple of 32 ({default_text('rank')}; method serq only)")
    parser.add_argument("--rank-allocation", choices=RANK_ALLOCATIONS, default=None,
                        help="uniform (every linear gets --rank) or error (each linear 0 to 4x --rank, "
                             "by its measured output error, within the storage of --rank everywhere; loads the "
                             f"whole model); {default_text('rank_allocation')}; method serq only")
    parser.add_argument("--flattening-strength", type=unit_float, default=None, metavar="ALPHA",
                        help="SERQ's flattening scales s = max|x| ** ALPHA, in [0, 1]: 1 moves each input channel's "
                             "range into the weights (the paper), 0 leaves the weights as they are (the order and "
                             f"the correction still follow max|x|); {default_text('flattening_strength')}; "
                             "method serq only")
    parser.add_argument("--saliency-unit", choices=SALIENCY_UNITS, default=None,
                        help="what SERQ's saliency order moves: channel (each by its max|x|, the paper) or block "
                             "(whole blocks of --rotation channels, by their largest max|x|); "
                             f"{default_text('saliency_unit')}; method serq only")
    parser.add_argument("--scale-mode", choices=SCALE_MODES, default=None,
                        help=f"MXFP4 block scale rule ({default_text('scale_mode')}; format mxfp4 only)")
    parser.add_argument("--weight-scales", choices=WEIGHT_SCALES, default=None,
                        help="weight and R scales: rule (the format's: MXFP4 --scale-mode's, as for activations; "
                             "INT4 the group max / 7) or search, by each group's reconstruction error (MXFP4: FLOOR's "
                             "exponent or one above; INT4: the max clipped to 1 .. 0.5 of itself); "
                             f"{default_text('weight_scales')}")
    parser.add_argument("--rotation", type=int, choices=ROTATION_SIZES, default=None,
                        help="block size of a Hadamard rotation of every quantized linear's input: weights rotated "
                             f"offline, activations inside their quantization (0: none; {default_text('rotation')}; "
                             "not for lqer/l2qer)")
    parser.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                        help=f"GPTQ for the main weights, layer by layer ({default_text('gptq')})")
    parser.add_argument("--gptq-order", choices=GPTQ_ORDERS, default=None,
                        help="GPTQ's column order: columns (left to right; SERQ's salient columns first) or hessian "
                             "(MR-GPTQ's static activation order, scales fixed before the sweep); with GPTQ; "
                             f"{default_text('gptq_order')}")
    parser.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                        help="leave the linears this matches in floating point (repeatable): a module name, a glob "
                             "such as '*.down_proj', or 're:' and a regular expression of the whole name")
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="quantize the output head too (a head tied to the embeddings is untied; the "
                             "embeddings stay as --embeddings says)")
    parser.add_argument("--embeddings", choices=EMBEDDING_FORMATS, default=EmbeddingFormat.FLOAT.value,
                        help="how the input embedding table is stored: float (as the model has it) or int8 (int8 "
                             "per row with a float32 scale; a tied head computes its logits from it); default "
                             "%(default)s; methods with a packed format only")
    parser.add_argument("--residual-order", choices=RESIDUAL_ORDERS, default=None,
                        help="SERQ's channel order for norm-fed linears: per_group (a gather after each norm), "
                             "global (one order for the residual stream, no gathers) or auto (global where exact, "
                             f"else per_group); {default_text('residual_order')}; method serq only")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--calib-corpus", choices=CORPORA, default=None,
                        help="calibrate on a shipped corpus: the first --calib-samples windows of its calibration "
                             "split (default wiki)")
    source.add_argument("--calib-text", metavar="FILE", default=None,
                        help="calibrate on this UTF-8 text file: --calib-samples windows of --calib-seqlen tokens, "
                             "picked at random with --seed")
    source.add_argument("--calib-dataset", metavar="PATH", default=None,
                        help="calibrate on a local dataset (a save_to_disk folder, .arrow or .jsonl): --calib-samples "
                             "rows of --calib-column picked at random with --seed, each cut at --calib-seqlen tokens")
    parser.add_argument("--calib-column", default=None, help="with --calib-dataset: its text column (default text)")
    parser.add_argument("--calib-samples", "--calib-windows", dest="calib_windows", type=positive_int,
                        default=DEFAULT_CALIBRATION_WINDOWS, metavar="N", help="calibration windows")
    parser.add_argument("--seed", type=non_negative_int, default=None,
                        help="with --calib-text or --calib-dataset: the sampling seed (default 0)")
    parser.add_argument("--calib-seqlen", type=positive_int, default=DEFAULT_SEQLEN,
                        help="tokens per calibration window")


def _evaluation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", choices=CORPORA, default="wiki", help="the evaluation text")
    parser.add_argument("--windows", type=positive_int, default=None, help="number of evaluation windows (default: all)")
    parser.add_argument("--seqlen", type=positive_int, default=DEFAULT_SEQLEN, help="tokens per window")


def command(module: str, function: str):
    """The handler ``function`` of ``serq_ao.cli.<module>``, imported when the command runs (the
    command modules import torch and the rest)."""

    def handler(args: argparse.Namespace, err):
        return getattr(importlib.import_module(f"serq_ao.cli.{module}"), function)(args, err)

    handler.__qualname__ = f"serq_ao.cli.{module}.{function}"
    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="serq", description="SERQ 4-bit quantization toolkit")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--version", action="version", version=f"serq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    quantize = commands.add_parser("quantize", help="quantize a model and save it to a folder")
    quantize.add_argument("model", help=MODEL_HELP)
    quantize.add_argument("--method", choices=METHODS, default="serq", help="the quantization method")
    quantize.add_argument("-o", "--out", required=True,
                          help="output folder: new, empty, or an earlier serq output (with --overwrite); written atomically")
    quantize.add_argument("--overwrite", action="store_true",
                          help="replace --out if it holds an earlier serq output (and nothing else)")
    _quantization_options(quantize)
    quantize.add_argument("--diagnostics", action=argparse.BooleanOptionalAction, default=True,
                          help="record per-linear saliency and output error for serq inspect (default: on)")
    quantize.add_argument("--error-windows", type=non_negative_int, default=None,
                          help="calibration windows the output errors are measured on (0: none; default 2, or "
                               "--calib-windows if fewer)")
    _loading_options(quantize)
    quantize.add_argument("--in-memory", action="store_true",
                          help="load the whole model before quantizing (default: read each decoder layer from the "
                               "checkpoint's safetensors when its turn comes, where the method packs and the "
                               "residual order is per group)")
    quantize.add_argument("--resume", action="store_true",
                          help="continue an interrupted run of the same command from its last finished layer "
                               "(streamed runs keep their work beside --out after every layer)")
    quantize.add_argument("--activation-memory", type=non_negative_float, default=None, metavar="GIB",
                          help="CPU memory for the cached calibration activations; past it they go to disk "
                               "(default: a quarter of this machine's memory, at most 8)")
    quantize.add_argument("--offload-folder", default=None,
                          help="where activations past --activation-memory are written (default: beside --out)")
    _common(quantize)
    quantize.set_defaults(handler=command("quantize", "cmd_quantize"))

    compare = commands.add_parser("compare", help="perplexity of several methods side by side")
    compare.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    compare.add_argument("--methods", default="fp,rtn,serq", help="comma-separated, from: fp, " + ", ".join(METHODS))
    _quantization_options(compare)
    _evaluation_options(compare)
    _loading_options(compare)
    _common(compare)
    compare.set_defaults(handler=command("quantize", "cmd_compare"))

    inspect = commands.add_parser(
        "inspect", help="the dataflow plan, and per quantized linear: rank, bits, saliency, output error")
    inspect.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    inspect.add_argument("--layers", type=non_negative_int, default=1, help="decoder layers to list (0: all)")
    inspect.add_argument("--stats", action="store_true",
                         help="float model: quantize a copy in memory (options below) and show its per-linear statistics")
    inspect.add_argument("--plot", metavar="DIR", default=None,
                         help="write PNG figures into DIR: saliency curves, per-layer error, perplexity against rank, "
                              "and each linear's rank where --rank-allocation error chose them")
    inspect.add_argument("--overwrite", action="store_true", help="with --plot: replace figures that exist")
    inspect.add_argument("--sweep", metavar="FILE", default=None,
                         help="with --plot: a rank sweep to plot perplexity against the SERQ rank from (a JSON object "
                              "with \"rank_sweep\", as benchmarks/accuracy.py's results have)")
    inspect.add_argument("--method", choices=METHODS, default="serq", help="with --stats: the method")
    _quantization_options(inspect)
    inspect.add_argument("--error-windows", type=non_negative_int, default=None,
                         help="with --stats: calibration windows the output errors are measured on (default 2, or "
                              "--calib-windows if fewer)")
    _loading_options(inspect)
    _common(inspect)
    inspect.set_defaults(handler=command("inspect", "cmd_inspect"))

    export = commands.add_parser("export", help="torch.export program or AOTInductor package of a model")
    export.add_argument("model", help=MODEL_HELP)
    export.add_argument("-o", "--out", required=True, help="the .pt2 file to write (atomically)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument("--aoti", action="store_true", help="an AOTInductor package instead of an ExportedProgram")
    export.add_argument("--batch-size", type=positive_int, default=1, help="input batch size it is exported for")
    export.add_argument("--seqlen", type=positive_int, default=128, help="input length it is exported for")
    _loading_options(export)
    _common(export)
    export.set_defaults(handler=command("export", "cmd_export"))

    from serq_ao.cli.bench import dtype_list  # light: no torch

    bench = commands.add_parser("bench", help="prefill and decode tokens/s and peak RSS, each model in its own "
                                              "process, next to the FP model in float32 and/or bfloat16")
    bench.add_argument("model", help=MODEL_HELP)
    bench.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True)")
    bench.add_argument("--prefill", type=positive_int, default=1024, help="prompt tokens (and the decode KV cache length)")
    bench.add_argument("--decode", type=positive_int, default=20, help="decode calls to time")
    bench.add_argument("--batch-size", type=positive_int, default=1, help="sequences per call")
    bench.add_argument("--repeats", type=positive_int, default=3, help="prefill calls to time")
    bench.add_argument("--baseline", default="auto",
                       help="model to compare with: 'auto' (a serq folder's source model), 'none', or a model")
    bench.add_argument("--baseline-dtypes", type=dtype_list, default=None, metavar="DTYPES",
                       help="comma-separated dtypes to time the baseline in, each in its own process, e.g. "
                            "float32,bfloat16 (default: --dtype)")
    bench.add_argument("--threads", type=positive_int, default=None,
                       help="torch threads in each timed process (default: torch's own, one per core)")
    _loading_options(bench)
    _common(bench)
    bench.set_defaults(handler=command("bench", "cmd_bench"))

    evaluate = commands.add_parser("eval", help="evaluate a model")
    evaluations = evaluate.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    ppl = evaluations.add_parser(
        "ppl", help="perplexity: the corpus' test text tokenized once, without special tokens, cut into "
                    "non-overlapping windows of --seqlen tokens (docs/accuracy.md: Data and protocol)")
    ppl.add_argument("model", help=MODEL_HELP)
    _evaluation_options(ppl)
    ppl.add_argument("--text", metavar="FILE", default=None,
                     help="evaluate on this UTF-8 text file instead of a corpus (same windowing)")
    ppl.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward")
    _loading_options(ppl)
    _common(ppl)
    ppl.set_defaults(handler=command("evaluate", "cmd_eval_ppl"))
    tasks = evaluations.add_parser("tasks", help="zero-shot accuracy through lm-eval, offline")
    tasks.add_argument("model", help=MODEL_HELP)
    tasks.add_argument("--tasks", default=",".join(SHIPPED_TASKS),
                       help=f"comma-separated lm-eval task names (shipped: {', '.join(SHIPPED_TASKS)})")
    tasks.add_argument("--limit", type=positive_int, default=None, help="first N documents of each task (default: all)")
    tasks.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="requests per forward")
    tasks.add_argument("--include-path", action="append", default=[], metavar="DIR",
                       help="a folder of further lm-eval task YAMLs (repeatable)")
    _loading_options(tasks)
    _common(tasks)
    tasks.set_defaults(handler=command("evaluate", "cmd_eval_tasks"))
    return parser


def _quiet_libraries(debug: bool) -> None:
    """The CLI draws its own progress and messages; libraries' would interleave with them."""
    import functools

    import tqdm

    # lm-eval's and the GGUF converter's tqdm bars. TQDM_DISABLE cannot do this: tqdm reads it
    # once, when first imported, which may have happened already.
    if not getattr(tqdm.tqdm.__dict__["__init__"], "serq_disables_bars", False):  # once per process
        quiet_init = functools.partialmethod(tqdm.tqdm.__init__, disable=True)
        quiet_init.serq_disables_bars = True
        tqdm.tqdm.__init__ = quiet_init
    if not debug:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # lm-eval warns on every run about things that are intended here (a model object, zero-shot)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_device(parser, args)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _quiet_libraries(args.debug)
    from rich.console import Console
    from rich.markup import escape  # rich would take "[eval]" or "[1, 2]" in a message for markup

    err = Console(stderr=True)
    try:
        return args.handler(args, err)
    except KeyboardInterrupt as e:  # its text, where a command gives one, says what was kept
        err.print(f"serq: interrupted{f'; {e}' if str(e) else ''}", markup=False, highlight=False, soft_wrap=True)
        return 130
    except Exception as e:
        status = user_error_status(e)
        if status is None or args.debug:
            raise
        err.print(f"[red]serq: error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return status


if __name__ == "__main__":
    sys.exit(main())
