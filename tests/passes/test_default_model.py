"""The passes on the real default model (slow: loads smollm2-135m)."""

import pytest
import torch

from serq_ao.models import load_model
from serq_ao.passes import (
    AttentionProducer,
    InputTransform,
    NormProducer,
    analyze,
    analyze_residual,
    apply_input_transforms,
    apply_residual_order,
)

pytestmark = pytest.mark.slow


def test_default_model_plan_and_exact_transforms():
    model, _ = load_model("smollm2-135m")
    plan = analyze(model)
    assert len(plan.groups) == 30 * 4
    kinds = [g.producer.kind for g in plan.groups[:4]]
    assert kinds == ["norm", "attention", "norm", "gated"]
    attention = plan.groups[1].producer
    assert isinstance(attention, AttentionProducer) and not attention.one_to_one  # GQA 9/3
    assert (attention.num_heads, attention.num_kv_heads, attention.head_dim) == (9, 3, 64)

    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    residual = analyze_residual(model)
    assert residual.embeddings == ("model.embed_tokens",) and "lm_head" not in residual.readers  # tied
    apply_residual_order(model, residual, torch.randperm(576, generator=torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(2)
    transforms = {}
    for group in plan.groups:
        scale = torch.rand(group.in_features, generator=g) * 10 + 0.1
        perm = torch.arange(group.in_features) if isinstance(group.producer, NormProducer) else torch.randperm(group.in_features, generator=g)
        transforms[group.name] = InputTransform(scale, perm)
    apply_input_transforms(model, plan, transforms)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert ((got - reference).abs().max() / reference.abs().max()).item() < 1e-5
