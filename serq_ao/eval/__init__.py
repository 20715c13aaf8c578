"""Evaluation: perplexity per docs/protocol.md, zero-shot tasks through lm-eval."""

from serq_ao.eval.perplexity import PerplexityResult, perplexity
from serq_ao.eval.tasks import SHIPPED_TASKS, TaskResult, TaskResults, evaluate_tasks

__all__ = ["PerplexityResult", "perplexity", "SHIPPED_TASKS", "TaskResult", "TaskResults", "evaluate_tasks"]
