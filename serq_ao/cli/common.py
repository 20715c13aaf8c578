"""Helpers shared by the serq commands."""

from __future__ import annotations

import argparse
import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


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


def progress_bar(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=True,
    )


def status(console: Console, message: str, quiet: bool):
    """A spinner while something without progress runs (nothing if quiet)."""
    return contextlib.nullcontext() if quiet else console.status(message, spinner="dots")


class StageProgress:
    """Adapts the library's ``progress(stage, done, total)`` callbacks to rich tasks."""

    def __init__(self, progress: Progress, prefix: str = ""):
        self.progress, self.prefix, self.tasks = progress, prefix, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(f"{self.prefix}{stage}", total=total)
        self.progress.update(self.tasks[stage], completed=done)


# The quantization options that quantize, compare and inspect --stats share.


def config_from_args(args: argparse.Namespace, method: str | None = None):
    """The SERQConfig of the quantization options (``method`` overrides ``--method``)."""
    from serq_ao.quant.config import SERQConfig
    from serq_ao.quant.methods import TransformKind, method_spec

    residual_order = args.residual_order
    if method is not None and method_spec(method).input_transform is not TransformKind.FLATTEN:
        residual_order = "per_group"  # serq compare: the order is SERQ's, the other methods have none
    try:
        return SERQConfig(
            method=method or args.method, format=args.format, rank=args.rank, scale_mode=args.scale_mode, gptq=args.gptq,
            residual_order=residual_order,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e


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


def calibration_from_args(tokenizer, args):
    """Calibration input ids per --calib-corpus / --calib-windows / --calib-seqlen."""
    from serq_ao.data import calibration_batches

    try:
        return calibration_batches(tokenizer, args.calib_corpus, args.calib_windows, args.calib_seqlen)
    except ValueError as e:
        raise UsageError(str(e)) from e


def check_error_windows(args) -> None:
    """--error-windows must fit in the calibration windows it is taken from."""
    if args.error_windows > args.calib_windows:
        raise UsageError(f"--error-windows ({args.error_windows}) must be at most --calib-windows ({args.calib_windows})")
