"""The whole pipeline on tiny random models, against a naive implementation."""

import pytest
import torch
from torch import nn

from serq_ao.quant.calibration import calibrate
from serq_ao.quant.statistics import CalibrationStats
from serq_ao.quant.config import SERQConfig
from serq_ao.passes import ActivationProducer, AttentionProducer, GatedProducer, analyze
from serq_ao.quant.pipeline import quantize_model, transform_model
from serq_ao.quant.reconstruct import flattening_scales, saliency_order, serq_reconstruct
from serq_ao.formats import get_format
from serq_ao.quant.fake_quant import FakeQuantLinear
from tests.conftest import make_tiny_llama
from tests.passes.architectures import build


def ids(seed, n=4, length=33, vocab=256):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


class NaiveSERQLinear(nn.Module):
    """Divide (unless the producer already did), gather and quantize at run time."""

    def __init__(self, linear, scales, perm, divide, config):
        super().__init__()
        self.scales, self.perm, self.divide, self.config = scales, perm, divide, config
        w_hat = (linear.weight.data * scales)[:, perm]
        self.fmt = get_format(config.format, config.scale_mode)
        main, correction = serq_reconstruct(w_hat, config.rank, self.fmt)
        self.main = main.dequantize()
        self.correction = None if correction is None else correction.dequantize()
        self.bias = linear.bias

    def forward(self, x):
        if self.divide:
            x = x / self.scales
        x_q = self.fmt.fake_quantize_activation(x[..., self.perm])
        y = x_q @ self.main.T
        if self.correction is not None:
            y = y + x_q[..., : self.correction.shape[1]] @ self.correction.T
        return y if self.bias is None else y + self.bias


def divide_rows(model, rows, divisor):
    linear = model.get_submodule(rows.linear)
    linear.weight.data[rows.start : rows.stop] /= divisor[:, None]
    if linear.bias is not None:
        linear.bias.data[rows.start : rows.stop] /= divisor


@torch.no_grad()
def naive_serq(model, config, calibration):
    """SERQ written out per linear. Where a producer is itself a quantized linear (up rows,
    ReLU input rows, MHA value rows), 1/s is part of the weight that gets quantized, so the
    reference divides those rows too; everything else (norms, orders) happens at run time."""
    plan = analyze(model)
    stats = calibrate(model, plan, calibration)
    chosen = {}
    for group in plan.groups:
        scales = flattening_scales(stats.amax[group.name], config.flattening_strength)
        producer, divide = group.producer, False
        if isinstance(producer, GatedProducer):
            divide_rows(model, producer.up, scales)
        elif isinstance(producer, ActivationProducer):
            divide_rows(model, producer.source, scales)
        elif isinstance(producer, AttentionProducer) and producer.one_to_one:
            divisor = torch.empty_like(scales)
            divisor[torch.tensor(producer.value_row_of_channel) - producer.value.start] = scales
            divide_rows(model, producer.value, divisor)
        else:
            divide = True
        chosen[group.name] = (scales, saliency_order(flattening_scales(stats.amax[group.name])), divide)
    for group in plan.groups:
        for name in group.linears:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NaiveSERQLinear(model.get_submodule(name), *chosen[group.name], config))
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma3", "opt"])
@pytest.mark.parametrize("fmt, scale_mode", [("mxfp4", "floor"), ("mxfp4", "rceil"), ("w4a8", "floor")])
def test_pipeline_equals_naive_runtime_implementation(arch, fmt, scale_mode):
    assert_pipeline_equals_naive(arch, SERQConfig(method="serq", format=fmt, rank=32, scale_mode=scale_mode))


def assert_pipeline_equals_naive(arch: str, config: SERQConfig) -> None:
    # disjoint token ranges: a token at position 0 produces the same activations wherever it
    # occurs, so a calibration maximum would recur exactly and sit on a rounding tie (e.g. an
    # asymmetric zero point of exactly 7.5), where 1-ulp folding noise picks either side
    calibration, evaluation = ids(0, vocab=64), ids(1, vocab=64) + 64
    reference = naive_serq(build(arch), config, calibration)
    model = build(arch)
    quantize_model(model, config, calibration)
    with torch.no_grad():
        got = model(input_ids=evaluation).logits
        expected = reference(input_ids=evaluation).logits
    # folding changes fp32 rounding of X / s, which moves an element across a rounding
    # boundary now and then: small, not zero. (Structural mistakes, e.g. quantizing a
    # producer's rows before dividing them by s, show up as 5-10%.)
    assert ((got - expected).norm() / expected.norm()).item() < 5e-3


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "lqer", "l2qer", "serq"])
@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8", "w4a4"])
def test_every_linear_is_quantized_and_output_stays_close(method, fmt):
    model = make_tiny_llama()
    with torch.no_grad():
        reference = model(ids(3)).logits
    config = SERQConfig(method=method, format=fmt, rank=32)
    report = quantize_model(model, config, ids(2) if config.needs_statistics else None)
    quantized = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    assert len(quantized) == len(report.linears) == 14  # 7 per layer, lm_head stays fp
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, FakeQuantLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        got = model(ids(3)).logits
    assert 0 < ((got - reference).norm() / reference.norm()).item() < 0.3
    assert report.effective_bits > 4


def test_calibration_statistics():
    model = make_tiny_llama()
    plan = analyze(model)
    batches = ids(4)
    one = calibrate(model, plan, batches, batch_size=1)
    two = calibrate(model, plan, batches, batch_size=3)
    assert one.tokens == two.tokens == batches.numel()
    for name in one.amax:
        assert torch.equal(one.amax[name], two.amax[name])
    # a dead channel gets scale 1, not 0
    stats = CalibrationStats({"g": torch.tensor([0.0, 2.0])}, tokens=1)
    assert stats.scales("g").tolist() == [1.0, 2.0]


def test_calibration_statistics_save_and_load(tmp_path):
    model = make_tiny_llama()
    stats = calibrate(model, analyze(model), ids(5))
    stats.save(tmp_path / "stats.pt")
    loaded = CalibrationStats.load(tmp_path / "stats.pt")
    assert loaded.tokens == stats.tokens and all(torch.equal(loaded.amax[k], v) for k, v in stats.amax.items())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 48}, "rank must be a non-negative multiple of 32"),
        ({"rank": -32}, "rank must be"),
        ({"method": "gptq"}, "method must be one of"),
        ({"format": "nf4"}, "format must be one of"),
        ({"scale_mode": "even"}, "scale_mode must be one of"),
    ],
)
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SERQConfig(**kwargs)


def test_rank_above_d_in_is_rejected_before_any_work():
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"rank \(96\) must be at most the smallest d_in"):
        quantize_model(model, SERQConfig(rank=96), ids(6))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_round_trips_through_json():
    config = SERQConfig(method="smoothquant", format="w4a4", rank=0, scale_mode="rceil")
    assert SERQConfig.from_dict(__import__("json").loads(config.to_json())) == config
    with pytest.raises(ValueError, match="unknown SERQConfig fields"):
        SERQConfig.from_dict({"ranks": 3})


@pytest.mark.parametrize("method", ["lqer", "l2qer"])
def test_lowrank_methods_reload_and_cost_their_bits(method, tmp_path):
    from serq_ao.models import load_model
    from serq_ao.integrations.serialization import save_quantized
    from tests.conftest import make_byte_tokenizer

    model = make_tiny_llama()
    report = quantize_model(model, SERQConfig(method=method, format="mxfp4", lowrank_rank=8), ids(7))
    assert report.effective_bits > 4.25 + 1  # tiny linears make INT8 factors expensive
    save_quantized(model, make_byte_tokenizer(), tmp_path / "q", report.config)
    reloaded, _ = load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(model(ids(8)).logits, reloaded(ids(8)).logits)


@pytest.mark.parametrize("method, fmt", [("serq", "mxfp4"), ("rtn", "w4a8"), ("l2qer", "w4a4")])
def test_gptq_pipeline_quantizes_every_linear_and_lowers_the_error(method, fmt):
    calibration = ids(9, n=8)
    errors = {}
    for gptq in (False, True):
        model = make_tiny_llama()
        with torch.no_grad():
            reference = model(calibration).logits
        report = quantize_model(model, SERQConfig(method=method, format=fmt, rank=32, gptq=gptq), calibration)
        assert len(report.linears) == 14
        assert sum(isinstance(m, FakeQuantLinear) for m in model.modules()) == 14
        with torch.no_grad():
            errors[gptq] = ((model(calibration).logits - reference).norm() / reference.norm()).item()
    assert errors[True] < errors[False], errors


def test_gptq_needs_input_ids():
    model = make_tiny_llama()
    stats = calibrate(model, analyze(model), ids(10))
    with pytest.raises(ValueError, match="GPTQ needs calibration input ids"):
        quantize_model(model, SERQConfig(gptq=True, rank=32), stats)
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_model(model, SERQConfig(method="rtn", gptq=True), None)


def test_without_folding_into_linears_the_pipeline_is_the_runtime_reference():
    """fold_into_linears=False divides at run time wherever a linear produces the input: then
    the naive implementation (told not to pre-divide rows) must agree as closely."""
    config = SERQConfig(method="serq", format="mxfp4", rank=32, fold_into_linears=False, scale_mode="rceil")
    calibration, evaluation = ids(0, vocab=64), ids(1, vocab=64) + 64
    model = make_tiny_llama()
    quantize_model(model, config, calibration)
    reference = make_tiny_llama()
    plan = analyze(reference)
    stats = calibrate(reference, plan, calibration)
    for group in plan.groups:
        scales = flattening_scales(stats.amax[group.name])
        for name in group.linears:
            parent, _, child = name.rpartition(".")
            module = NaiveSERQLinear(reference.get_submodule(name), scales, saliency_order(scales), True, config)
            setattr(reference.get_submodule(parent), child, module)
    down = model.model.layers[0].mlp.down_proj
    assert down.input_scale_inv is not None and down.input_perm is not None  # run-time pre-op
    with torch.no_grad():
        got, expected = model(evaluation).logits, reference(evaluation).logits
    assert ((got - expected).norm() / expected.norm()).item() < 5e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma3", "opt"])
def test_global_residual_order_is_exact_before_quantization_and_removes_norm_gathers(arch):
    from serq_ao.passes import OutputGather

    calibration, evaluation = ids(0, vocab=64), ids(1, vocab=64) + 64
    model = build(arch)
    with torch.no_grad():
        reference = model(input_ids=evaluation).logits
    transform_model(model, SERQConfig(rank=32, residual_order="global"), calibration)
    with torch.no_grad():
        transformed = model(input_ids=evaluation).logits
    error = ((transformed - reference).norm() / reference.norm()).item()
    assert error < 1e-5, error
    # norm-fed groups read the stream in its order
    assert [n for n, x in model.named_modules() if isinstance(x, OutputGather) and x.perm is not None] == []
    per_group = build(arch)
    quantize_model(per_group, SERQConfig(rank=32), calibration)
    assert any(isinstance(x, OutputGather) and x.perm is not None for x in per_group.modules())


def test_global_residual_order_with_gptq_and_its_option_errors():
    model = make_tiny_llama()
    report = quantize_model(model, SERQConfig(rank=32, gptq=True, residual_order="global"), ids(9, n=8))
    assert len(report.linears) == 14
    with torch.no_grad():
        assert torch.isfinite(model(ids(3)).logits).all()
    with pytest.raises(ValueError, match="residual_order must be one of"):
        SERQConfig(residual_order="stream")
    with pytest.raises(ValueError, match="applies to method 'serq' only"):
        SERQConfig(method="rtn", residual_order="global")
    assert SERQConfig(method="rtn", residual_order="auto").residual_order == "auto"  # nothing to order: ignored


@pytest.mark.parametrize("order", ["auto", "global", "per_group"])
def test_residual_order_auto_falls_back_where_the_stream_cannot_be_permuted(order, caplog):
    from tests.passes.test_passes import OddModel

    torch.manual_seed(0)
    model = OddModel().eval()
    calibration = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    config = SERQConfig(rank=0, residual_order=order)
    if order == "global":
        with pytest.raises(ValueError, match="residual_order='global' is not possible for this model.*'auto' or 'per_group'"):
            quantize_model(model, config, calibration)
        return
    with caplog.at_level("WARNING", logger="serq_ao.quant.pipeline"):
        report = quantize_model(model, config, calibration)
    assert report.residual_order == "per_group" and report.to_dict()["residual_order"] == "per_group"
    assert ("cannot be permuted exactly" in caplog.text) == (order == "auto")


@pytest.mark.parametrize("method, expected", [("serq", "global"), ("rtn", None), ("smoothquant", None)])
def test_residual_order_auto_takes_the_global_order_where_exact(method, expected):
    from serq_ao.passes import OutputGather

    model = build("llama")
    report = quantize_model(model, SERQConfig(method=method, rank=0, residual_order="auto"), ids(0, vocab=64))
    assert report.residual_order == expected
    if method == "serq":
        assert not any(isinstance(x, OutputGather) and x.perm is not None for x in model.modules())
