import math

import pytest
import torch

from serq_ao.eval import perplexity
from tests.conftest import make_tiny_llama


def reference_perplexity(model, windows):
    """Float64, one position at a time: exp(mean over positions t >= 1 of -log p(x_t | x_<t))."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0].double()
            for t in range(1, window.numel()):
                total -= torch.log_softmax(logits[t - 1], -1)[window[t]].item()
                count += 1
    return math.exp(total / count), count


@pytest.fixture(scope="module")
def model_and_windows():
    model = make_tiny_llama(vocab_size=300, seed=3)
    windows = torch.randint(0, 300, (5, 33), generator=torch.Generator().manual_seed(5))
    return model, windows


def test_matches_float64_reference(model_and_windows):
    model, windows = model_and_windows
    result = perplexity(model, windows)
    expected, count = reference_perplexity(model, windows)
    assert result.tokens == count == 5 * 32 and result.windows == 5
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.nll == pytest.approx(math.log(expected), rel=1e-5)


def test_batch_size_does_not_change_the_result(model_and_windows):
    model, windows = model_and_windows
    seen = []
    one = perplexity(model, windows, batch_size=1)
    three = perplexity(model, windows, batch_size=3, on_batch=seen.append)
    assert seen == [3, 2]
    assert three.ppl == pytest.approx(one.ppl, rel=1e-6)


def test_bad_windows_are_rejected(model_and_windows):
    model, _ = model_and_windows
    with pytest.raises(ValueError, match="windows must have shape"):
        perplexity(model, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, torch.zeros(2, 8, dtype=torch.long), batch_size=0)
