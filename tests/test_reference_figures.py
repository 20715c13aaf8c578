"""docs/protocol.md's reference figures on the real default model (slow: about a minute)."""

import pytest

from serq_ao import data
from serq_ao.eval import perplexity
from serq_ao.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    return load_model("smollm2-135m")


def test_evaluation_text_length(default_model):
    _, tokenizer = default_model
    tokens = data.tokenize(tokenizer, data.corpus_text("wiki", "evaluation"))
    assert tokens.numel() == 304_347
    windows = data.evaluation_windows(tokenizer)
    assert windows.shape == (297, 1025) and (windows[:, 0] == tokenizer.bos_token_id).all()


def test_fp_perplexity_reproduces_18_56(default_model):
    model, tokenizer = default_model
    result = perplexity(model, data.evaluation_windows(tokenizer, n_windows=32))
    assert result.tokens == 32 * 1024
    assert round(result.ppl, 2) == 18.56
