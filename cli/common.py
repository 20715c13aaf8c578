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
