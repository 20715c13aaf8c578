"""Helpers shared by the serq commands."""

from __future__ import annotations

import argparse
import contextlib
import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


DEFAULT_ERROR_WINDOWS = 2


class UsageError(Exception):
    """A mistake in the command line: one line on stderr, exit status 2."""


def _int_at_least(minimum: int, description: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {description}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


# where stderr is no terminal, at most one progress line per task this often (and one as each starts and ends)
PLAIN_PROGRESS_INTERVAL_S = 20.0


def _elapsed(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class PlainProgress(Progress):
    """rich's Progress where stderr is no terminal (CI logs, nohup, a pipe), where its live bar
    draws nothing at all: plain lines instead, one as each task starts, one as it finishes
    (or is removed unfinished), and in between at most one every ``interval`` seconds, each
    with done/total and the time elapsed."""

    def __init__(self, console: Console, interval: float = PLAIN_PROGRESS_INTERVAL_S):
        super().__init__(console=console, disable=True)  # the live display off; the tasks are kept as ever
        self.plain_console, self.interval = console, interval
        self._printed: dict = {}  # task id -> (when its last line was printed, its description then)
        self._ended: set = set()

    def _print(self, text: str) -> None:
        self.plain_console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _count(self, task) -> str:
        done = f"{task.completed:.0f}"
        return f"{done}/{task.total:.0f}" if task.total is not None else done

    def _report(self, task_id, *, ending: bool = False) -> None:
        task = self._tasks.get(task_id)
        if task is None or task_id in self._ended:
            return
        now = time.monotonic()
        last, description = self._printed.get(task_id, (None, None))
        elapsed = _elapsed(task.elapsed or 0.0)
        if task.finished:
            self._ended.add(task_id)
            self._print(f"{task.description}: done, {self._count(task)} in {elapsed}")
        elif ending:
            self._ended.add(task_id)
            self._print(f"{task.description}: stopped at {self._count(task)} after {elapsed}")
        elif last is None or description != task.description:
            self._print(f"{task.description}: started" if last is None else f"{task.description} ({elapsed})")
        elif now - last >= self.interval:
            self._print(f"{task.description}: {self._count(task)} ({elapsed})")
        else:
            return
        self._printed[task_id] = (now, task.description)

    def add_task(self, *args, **kwargs):
        task_id = super().add_task(*args, **kwargs)
        self._report(task_id)
        return task_id

    def update(self, task_id, *args, **kwargs) -> None:
        super().update(task_id, *args, **kwargs)
        self._report(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def remove_task(self, task_id) -> None:
        task = self._tasks.get(task_id)
        if task is not None and task.total is not None:  # a task without a total (loading) ends silently
            self._report(task_id, ending=True)
        super().remove_task(task_id)


def progress_bar(console: Console, quiet: bool) -> Progress:
    """A live bar on a terminal, plain lines elsewhere (:class:`PlainProgress`), nothing if quiet."""
    if not quiet and not console.is_terminal:
        return PlainProgress(console)
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=True,
    )


@contextlib.contextmanager
def _plain_status(console: Console, message: str):
    started = time.monotonic()
    console.print(f"{message} ...", markup=False, highlight=False, soft_wrap=True)
    yield
    console.print(f"{message}: done in {_elapsed(time.monotonic() - started)}", markup=False, highlight=False,
                  soft_wrap=True)


def status(console: Console, message: str, quiet: bool):
    """A spinner while something without progress runs; where stderr is no terminal (where a
    spinner draws nothing), a line as it starts and one as it ends; nothing if quiet."""
    if quiet:
        return contextlib.nullcontext()
    return console.status(message, spinner="dots") if console.is_terminal else _plain_status(console, message)


class StageProgress:
    """Adapts the library's ``progress(stage, done, total)`` callbacks to rich tasks."""

    def __init__(self, progress: Progress, prefix: str = ""):
        self.progress, self.prefix, self.tasks = progress, prefix, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(f"{self.prefix}{stage}", total=total)
        self.progress.update(self.tasks[stage], completed=done)


# The quantization options that quantize, compare and inspect --stats share.


def options_used(format_name: str, specs, gptq: bool) -> dict[str, bool]:
    """Which options (SERQConfig's fields, and ``recipe``) any of the methods ``specs``
    (:class:`~serq_ao.quant.methods.MethodSpec`) use in the format ``format_name``, with GPTQ
    on or off: the one rule by which the command line refuses an option a method does not use
    and leaves out of its records the fields that do not apply."""
    from serq_ao.formats import FormatName
    from serq_ao.quant.methods import CorrectionKind, TransformKind

    serq = any(s.correction is CorrectionKind.SALIENT for s in specs)
    flattens = any(s.input_transform is TransformKind.FLATTEN for s in specs)
    return {
        "recipe": serq,
        "rank": serq,
        "rank_allocation": serq,
        "flattening_strength": flattens,
        "saliency_unit": flattens,
        "residual_order": flattens,
        "scale_mode": format_name == FormatName.MXFP4,
        "weight_scales": True,  # every method quantizes weights, in every format
        "rotation": any(s.correction is not CorrectionKind.LOWRANK for s in specs),
        "gptq_order": gptq,
        # fields without an option of their own
        "smoothquant_alpha": any(s.input_transform is TransformKind.SMOOTH for s in specs),
        "lowrank_rank": any(s.correction is CorrectionKind.LOWRANK for s in specs),
        "fold_into_linears": any(s.transforms_input for s in specs),
    }


def applied_fields(config) -> dict:
    """``config.to_dict()`` without the fields its method and format do not use (:func:`options_used`)."""
    used = options_used(config.format, [config.spec], bool(config.gptq))
    return {name: value for name, value in config.to_dict().items() if used.get(name, True)}


def config_from_args(args: argparse.Namespace, method: str | None = None, methods: list[str] | None = None):
    """The SERQConfig of the quantization options (``method`` overrides ``--method``).

    Method serq starts from ``--recipe`` (default :data:`~serq_ao.quant.recipes.DEFAULT_RECIPE`),
    the other methods from SERQConfig's defaults; the options given on the command line
    override either. An option given that none of ``methods`` (default: the one method) with
    this format uses is a usage error, not something silently ignored: ``--recipe``,
    ``--rank``, ``--rank-allocation``, ``--flattening-strength``, ``--saliency-unit`` and
    ``--residual-order`` are SERQ's, ``--scale-mode`` is MXFP4's."""
    from serq_ao.quant.config import SERQConfig
    from serq_ao.quant.methods import CorrectionKind, TransformKind, method_spec
    from serq_ao.quant.recipes import DEFAULT_RECIPE, recipe_options, with_recipe

    check_calibration_args(args)  # the calibration options too: before any work
    method = method or args.method
    chosen = methods or [method]
    try:
        specs = [method_spec(m) for m in chosen]
    except ValueError as e:
        raise UsageError(str(e)) from e
    serq = [s.correction is CorrectionKind.SALIENT for s in specs]
    recipe = recipe_options(args.recipe or DEFAULT_RECIPE, args.format) if any(serq) else {}
    # with GPTQ given, or by serq's recipe
    uses = options_used(args.format, specs, bool(args.gptq) or (args.gptq is None and recipe.get("gptq", False)))
    for option, used in uses.items():
        if getattr(args, option, None) is not None and not used:  # (SERQConfig fields without an option: never)
            mxfp4 = option == "scale_mode"
            if option == "gptq_order":
                raise UsageError("--gptq-order applies with GPTQ only (--gptq, or serq's --recipe rotated-gptq)")
            whose = ("the MXFP4 format" if mxfp4 else "methods rtn, smoothquant and serq" if option == "rotation"
                     else "method serq")
            raise UsageError(f"--{option.replace('_', '-')} applies to {whose} only; "
                             f"{'--format ' + args.format if mxfp4 else '--method ' + ','.join(chosen)} "
                             "does not use it")
    given = {option: getattr(args, option) for option in (*uses, "gptq") if getattr(args, option, None) is not None}
    given.pop("recipe", None)
    salient = method_spec(method).correction is CorrectionKind.SALIENT
    fields = with_recipe(args.recipe or DEFAULT_RECIPE, {"format": args.format, **given}) if salient else given
    fields.pop("format", None)
    if method_spec(method).input_transform is not TransformKind.FLATTEN:
        # serq compare: the order and the flattening are SERQ's, the other methods have neither
        fields.pop("residual_order", None)
        fields.pop("flattening_strength", None)
        fields.pop("saliency_unit", None)
    if method_spec(method).correction is not CorrectionKind.SALIENT:
        fields.pop("rank_allocation", None)  # likewise the rank it shares out
        if not fields.get("gptq"):
            fields.pop("gptq_order", None)  # serq's GPTQ order, where serq's recipe gave the GPTQ
    try:
        return SERQConfig(method=method, format=args.format, ignore=tuple(args.ignore),
                          quantize_lm_head=args.quantize_lm_head,
                          embeddings=getattr(args, "embeddings", "float"), **fields)
    except ValueError as e:
        raise UsageError(str(e)) from e


def recipe_name(args: argparse.Namespace, config) -> str | None:
    """The recipe a config of method serq started from (None for the other methods)."""
    from serq_ao.quant.methods import CorrectionKind
    from serq_ao.quant.recipes import DEFAULT_RECIPE

    return str(args.recipe or DEFAULT_RECIPE) if config.spec.correction is CorrectionKind.SALIENT else None


def check_positions(model, option: str, positions: int) -> None:
    """``positions`` tokens in one sequence must fit the ``max_position_embeddings`` of
    ``model`` (or of a model config): the library's rule, as a usage error naming ``option``."""
    from serq_ao.quant.input_checks import positions_error

    message = positions_error(model, option, positions)
    if message:
        raise UsageError(message)


def check_not_quantized(model, name) -> None:
    """Quantizing (or measuring as if quantizing) needs the float model."""
    from serq_ao.quant.pipeline import is_quantized

    if is_quantized(model):
        raise UsageError(f"{name} is already quantized (a serq output): quantize the float model it came from")


def checked_plan(model, config):
    """The model's dataflow plan, after checking that ``config`` fits it."""
    from serq_ao.passes import analyze
    from serq_ao.quant.pipeline import check_config_for_plan

    plan = analyze(model)
    try:
        check_config_for_plan(config, plan)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return plan


def check_calibration_args(args) -> None:
    """The calibration options that only go with another one, refused before any work."""
    if args.calib_column is not None and args.calib_dataset is None:
        raise UsageError("--calib-column names a column of --calib-dataset; there is none")
    if args.seed is not None and args.calib_text is None and args.calib_dataset is None:
        raise UsageError("--seed picks the windows of --calib-text or --calib-dataset; a corpus's calibration "
                         "windows are fixed by the protocol")


def calibration_record(args) -> dict:
    """What the calibration was, for the results and serq_report.json."""
    from serq_ao.calibration_data import DEFAULT_COLUMN

    record = {"windows": args.calib_windows, "seqlen": args.calib_seqlen}
    if args.calib_text is not None:
        return {"text": str(args.calib_text), "seed": args.seed or 0, **record}
    if args.calib_dataset is not None:
        return {"dataset": str(args.calib_dataset), "column": args.calib_column or DEFAULT_COLUMN,
                "seed": args.seed or 0, **record}
    return {"corpus": args.calib_corpus or "wiki", **record}


def calibration_from_args(tokenizer, args, model):
    """Calibration input ids per the --calib-* options and --seed: a tensor (n, L), or windows
    of their own lengths from a dataset; checked against ``model``'s positions."""
    from serq_ao.calibration_data import DEFAULT_COLUMN, document_calibration, load_documents, text_file_calibration
    from serq_ao.data import calibration_batches

    check_calibration_args(args)
    seed = args.seed or 0
    names = {"samples_option": "--calib-samples", "seqlen_option": "--calib-seqlen"}
    try:
        if args.calib_text is not None:
            batches = text_file_calibration(tokenizer, args.calib_text, args.calib_windows, args.calib_seqlen, seed,
                                            **names)
        elif args.calib_dataset is not None:
            documents = load_documents(args.calib_dataset, args.calib_column or DEFAULT_COLUMN)
            batches = document_calibration(tokenizer, documents, args.calib_windows, args.calib_seqlen, seed,
                                           **names)
        else:
            batches = calibration_batches(tokenizer, args.calib_corpus or "wiki", args.calib_windows,
                                          args.calib_seqlen)
    except ValueError as e:
        option = "--calib-text" if args.calib_text else "--calib-dataset" if args.calib_dataset else "--calib-corpus"
        raise UsageError(f"{option}: {e}".replace("n_windows must", "--calib-samples must")) from e
    longest = batches.shape[1] if hasattr(batches, "shape") else max(w.shape[1] for w in batches)
    check_positions(model, "--calib-seqlen", longest)
    check_token_ids(batches, model)
    return batches


def check_token_ids(batches, model) -> None:
    """The tokenizer's ids (calibration or evaluation windows) must fit the model's vocabulary:
    a folder whose tokenizer is not its model's is the user's mistake, told here rather than as
    an IndexError deep inside the model."""
    from serq_ao.quant.input_checks import check_input_ids

    for window in [batches] if hasattr(batches, "shape") else batches:
        try:
            check_input_ids(window, model, option="the tokenizer's output")
        except ValueError as e:
            raise UsageError(f"{e}: the model folder's tokenizer does not belong to its model") from e


def check_error_windows(args) -> None:
    """--error-windows must fit in the calibration windows it is taken from; left out, it is
    2 or --calib-windows, whichever is smaller."""
    if args.error_windows is None:
        args.error_windows = min(DEFAULT_ERROR_WINDOWS, args.calib_windows)
    elif args.error_windows > args.calib_windows:
        raise UsageError(f"--error-windows ({args.error_windows}) must be at most --calib-samples ({args.calib_windows})")
