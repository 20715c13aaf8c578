"""Evaluation: perplexity per ../shared/protocol.md (lm-eval tasks come later)."""

from serq_ao.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
