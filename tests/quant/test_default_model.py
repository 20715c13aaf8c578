"""SERQ on the real default model (slow)."""

import pytest

from serq_ao.config import SERQConfig
from serq_ao.data import calibration_batches, evaluation_windows
from serq_ao.eval import perplexity
from serq_ao.models import load_model
from serq_ao.pipeline import quantize_model

pytestmark = pytest.mark.slow


def test_serq_mxfp4_beats_rtn_mxfp4_on_the_default_model():
    results = {}
    for method in ("rtn", "serq"):
        model, tokenizer = load_model("smollm2-135m")
        calibration = calibration_batches(tokenizer, "wiki", n_windows=8) if method == "serq" else None
        quantize_model(model, SERQConfig(method=method, format="mxfp4", rank=64), calibration)
        results[method] = perplexity(model, evaluation_windows(tokenizer, n_windows=3)).ppl
    assert results["serq"] < 0.75 * results["rtn"], results
