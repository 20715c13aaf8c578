"""Bad inputs to the library are errors raised where the mistake is made, naming it."""

import pytest
import torch

from serq_ao.quant.calibration import calibrate
from serq_ao.quant.config import SERQConfig
from serq_ao.quant.pipeline import quantize_, quantize_model
from serq_ao.passes import analyze
from tests.conftest import make_tiny_llama

GOOD = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ids, message", [
    (GOOD[None], r"shape \(n, L\) .* got shape \(1, 2, 9\)"),
    (GOOD[:0], r"n, L >= 1, got shape \(0, 9\)"),
    (GOOD[:, :0], r"n, L >= 1, got shape \(2, 0\)"),
    (GOOD.float(), "integer token ids, got dtype torch.float32"),
    (GOOD > 3, "integer token ids, got dtype torch.bool"),
    (GOOD + 1000, r"token ids in \[\d+, \d+\], outside the model's vocabulary \[0, 257\)"),
    (GOOD - 300, "outside the model's vocabulary"),
    ([GOOD.float()], "calibration window 0 must hold integer token ids"),
    ("text", "must be input ids: a tensor"),
])
@pytest.mark.parametrize("gptq", [False, True])
def test_bad_calibration_ids(ids, message, gptq):
    model = make_tiny_llama()
    with pytest.raises(ValueError, match=message):
        quantize_model(model, SERQConfig(rank=32, gptq=gptq), ids)
    with pytest.raises(ValueError, match=message):
        calibrate(model, analyze(model), ids)


def test_meta_device_model_is_refused():
    with torch.device("meta"):
        model = make_tiny_llama()
    with pytest.raises(ValueError, match="is on the meta device"):
        quantize_model(model, SERQConfig(method="rtn"), None)


def test_quantizing_twice_is_refused():
    model = make_tiny_llama()
    quantize_(model, SERQConfig(rank=32), GOOD)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, SERQConfig(rank=32), GOOD)
