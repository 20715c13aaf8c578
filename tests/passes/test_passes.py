"""Exactness of the folds: the transformed full-precision model equals the original."""

import math

import pytest
import torch
from torch import nn

from serq_ao.passes import (
    AttentionProducer,
    GatedProducer,
    InputTransform,
    NormProducer,
    OutputGather,
    PreOpLinear,
    analyze,
    apply_input_transforms,
)
from tests.passes.architectures import BUILDERS, EXPECTED, build

ARCHS = sorted(BUILDERS)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def random_ids(seed=1):
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def random_transforms(plan, seed=2, within_heads=False):
    g = torch.Generator().manual_seed(seed)
    transforms = {}
    for group in plan.groups:
        width = group.in_features
        # log-uniform in [1e-3, 1e3]
        scale = torch.exp((torch.rand(width, generator=g) * 2 - 1) * math.log(1e3))
        perm = torch.randperm(width, generator=g)
        producer = group.producer
        if within_heads and isinstance(producer, AttentionProducer):
            d = producer.head_dim
            perm = torch.cat([h * d + torch.randperm(d, generator=g) for h in range(width // d)])
        transforms[group.name] = InputTransform(scale, perm)
    return transforms


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    model = build(request.param)
    return request.param, model, analyze(model)


def test_plan_of_each_architecture(arch):
    name, model, plan = arch
    prefix = plan.layers + ".0."
    layer0 = [g for g in plan.groups if g.linears[0].startswith(prefix)]
    got = [(tuple(n[len(prefix):] for n in g.linears), g.producer.kind) for g in layer0]
    assert got == [(linears, kind) for linears, kind, _ in EXPECTED[name]]
    for group, (_, kind, detail) in zip(layer0, EXPECTED[name]):
        producer = group.producer
        if isinstance(producer, NormProducer):
            assert producer.module == prefix + detail  # the gather can wrap the norm
            assert producer.weight_offset == (1.0 if name == "gemma3" else 0.0)
            assert (producer.bias is not None) == (name == "opt")
        elif isinstance(producer, AttentionProducer):
            assert producer.one_to_one == (detail == "MHA")
            assert len(producer.value_row_of_channel) == group.in_features
        elif isinstance(producer, GatedProducer):
            assert producer.activation == detail
        else:
            assert producer.activation == detail
    # every layer has the same structure under its own name
    assert len(plan.groups) == 2 * len(layer0)


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "pre-op"])
def test_transformed_model_equals_original(arch, fold):
    name, _, _ = arch
    model = build(name)
    plan = analyze(model)
    ids = random_ids()
    reference = logits(model, ids)
    records = apply_input_transforms(model, plan, random_transforms(plan), fold=fold)
    assert relative_error(logits(model, ids), reference) < 1e-5
    if fold:
        kinds = {g.name: g.producer for g in plan.groups}
        for group_name, record in records.items():
            producer = kinds[group_name]
            if isinstance(producer, (NormProducer, GatedProducer)) or producer.kind == "activation":
                assert record.scale != "pre-op" and record.order != "pre-op", group_name
    else:
        assert all(isinstance(model.get_submodule(n), PreOpLinear) for g in plan.groups for n in g.linears)


def test_within_head_order_folds_into_value_rows(arch):
    name, _, plan = arch
    model = build(name)
    ids = random_ids(3)
    reference = logits(model, ids)
    records = apply_input_transforms(model, plan, random_transforms(plan, seed=4, within_heads=True))
    assert relative_error(logits(model, ids), reference) < 1e-5
    for group in plan.groups:
        if isinstance(group.producer, AttentionProducer):
            folded = records[group.name].order != "pre-op"
            assert folded == group.producer.one_to_one
            assert isinstance(model.get_submodule(group.linears[0]), PreOpLinear) != group.producer.one_to_one


def test_tied_embeddings_stay_tied_and_correct():
    model = build("gemma3")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    plan = analyze(model)
    ids = random_ids(5)
    reference = logits(model, ids)
    apply_input_transforms(model, plan, random_transforms(plan, seed=6))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert relative_error(logits(model, ids), reference) < 1e-5
    assert isinstance(model.model.layers[0].input_layernorm, OutputGather)


class OddBlock(nn.Module):
    """A block whose linears read the residual stream directly and a scaled tanh."""

    def __init__(self, width):
        super().__init__()
        self.fc_in = nn.Linear(width, 2 * width)
        self.fc_out = nn.Linear(2 * width, width)

    def forward(self, x, **kwargs):
        return x + self.fc_out(torch.tanh(self.fc_in(x)) * 0.5)


class OddModel(nn.Module):
    def __init__(self, vocab=50, width=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(OddBlock(width) for _ in range(2))
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, use_cache=False):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_unrecognised_architecture_falls_back_to_pre_ops():
    torch.manual_seed(0)
    model = OddModel().eval()
    plan = analyze(model)
    assert [g.producer.kind for g in plan.groups] == ["unknown"] * 4
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        reference = model(ids)
        apply_input_transforms(model, plan, random_transforms(plan))
        assert relative_error(model(ids), reference) < 1e-5


def test_bad_transforms_are_rejected():
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        InputTransform(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="perm must be a permutation"):
        InputTransform(torch.ones(2), torch.tensor([0, 0]))
    model = build("llama")
    plan = analyze(model)
    with pytest.raises(KeyError, match="not in the plan"):
        apply_input_transforms(model, plan, {"nope": InputTransform.identity(4)})


def test_offset_norm_folds_moderate_scales_into_its_weight():
    model = build("gemma3")
    plan = analyze(model)
    g = torch.Generator().manual_seed(8)
    transforms = {
        group.name: InputTransform(torch.rand(group.in_features, generator=g) + 0.5, torch.randperm(group.in_features, generator=g))
        for group in plan.groups
    }
    ids = random_ids(9)
    reference = logits(model, ids)
    records = apply_input_transforms(model, plan, transforms)
    assert relative_error(logits(model, ids), reference) < 1e-5
    first = plan.groups[0]
    assert records[first.name].scale == first.producer.weight  # (1 + w) / s - 1, in the weight
    assert model.model.layers[0].input_layernorm.scale_inv is None


def test_plan_prints_from_the_command_line(tiny_model_dir, capsys):
    from serq_ao.passes.__main__ import main

    assert main([str(tiny_model_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "input_layernorm" in out and "silu" in out
    assert main([str(tiny_model_dir), "--json", "--quiet"]) == 0
    import json

    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["layers"] == "model.layers" and len(plan["groups"]) == 8


@pytest.mark.parametrize("name", ARCHS)
def test_global_residual_order_is_exact_and_removes_norm_gathers(name):
    from serq_ao.passes import analyze_residual, apply_residual_order

    model = build(name)
    ids = random_ids(10)
    reference = logits(model, ids)
    residual = analyze_residual(model)
    order = torch.randperm(residual.width, generator=torch.Generator().manual_seed(11))
    apply_residual_order(model, residual, order)
    assert relative_error(logits(model, ids), reference) < 1e-5
    # the residual stream now carries order P: norm-fed groups take it as it is
    plan = analyze(model)
    transforms = random_transforms(plan, seed=12)
    for group in plan.groups:
        if isinstance(group.producer, NormProducer):
            transforms[group.name] = InputTransform(transforms[group.name].scale, torch.arange(group.in_features))
    records = apply_input_transforms(model, plan, transforms)
    assert relative_error(logits(model, ids), reference) < 1e-5
    # no gathers (a Gemma norm may still scale its output, see OFFSET_FOLD_MIN_MAGNITUDE)
    assert not any(isinstance(m, OutputGather) and m.perm is not None for m in model.modules())
    for group in plan.groups:
        if isinstance(group.producer, NormProducer) and records[group.name].scale != "pre-op":
            assert records[group.name].order == "none needed"
            assert not any(isinstance(model.get_submodule(n), PreOpLinear) for n in group.linears)


def test_residual_order_is_refused_before_any_change():
    from serq_ao.passes import ResidualOrderError, analyze_residual

    torch.manual_seed(0)
    model = OddModel().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ResidualOrderError):
        analyze_residual(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_serq_inspect_usage_error(capsys):
    from serq_ao.cli.main import main

    assert main(["inspect", "no-such-model", "--quiet"]) == 2
    assert "model must be one of" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_output_gather_of_an_order_alone_is_the_pre_op_bit_for_bit(dtype):
    """A gather without a scale takes one op for the dtypes whose float32 round trip is exact
    (NaNs stay NaN, signed zeros keep their sign)."""
    from serq_ao.kernels.reference import apply_pre_op

    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(40, generator=g)
    wrapper = OutputGather(nn.Identity(), perm)
    x = (torch.randn(2, 5, 40, generator=g, dtype=torch.float64) * 1e3).to(dtype)
    x[0, 0, :3] = torch.tensor([float("nan"), -0.0, float("inf")], dtype=dtype)
    expected = apply_pre_op(x, None, perm).to(dtype)
    got = wrapper(x)
    assert got.dtype == dtype and torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    numbers = ~expected.isnan()  # a NaN's sign is whatever a conversion makes it
    assert torch.equal(got.signbit()[numbers], expected.signbit()[numbers])
