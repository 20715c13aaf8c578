"""Perplexity exactly as docs/protocol.md defines it.

Each window is fed as it is (BOS + 1,024 text tokens when the tokenizer has a BOS) and every
token after the first input position is scored, so with a BOS all 1,024 text tokens count.
Log-softmax runs in float32 whatever the model's dtype; the total NLL is summed in float64.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # scored tokens
    windows: int
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` (n, L) of input ids (see the module doc).

    ``on_batch(k)`` is called after each batch with the number of windows it held, for
    progress bars.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must have shape (n, L) with L >= 2, got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    device = next(model.parameters()).device
    start = time.perf_counter()
    total_nll = 0.0
    scored = 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits  # (B, L, V)
        log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = batch[:, 1:]
        nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, L - 1)
        total_nll += nll.double().sum().item()
        scored += targets.numel()
        if on_batch is not None:
            on_batch(batch.shape[0])
    mean_nll = total_nll / scored
    return PerplexityResult(
        ppl=math.exp(mean_nll),
        nll=mean_nll,
        tokens=scored,
        windows=windows.shape[0],
        seconds=time.perf_counter() - start,
    )
