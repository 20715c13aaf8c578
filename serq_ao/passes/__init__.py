"""Graph passes: find each decoder layer's dataflow, fold scales and channel orders exactly."""

from serq_ao.passes.plan import (
    ActivationProducer,
    AttentionProducer,
    GatedProducer,
    LinearGroup,
    ModelPlan,
    NormProducer,
    RowRange,
    UnknownProducer,
    describe,
    plan_table,
)
from serq_ao.passes.planner import analyze
from serq_ao.passes.residual import ResidualOrderError, ResidualPlan, analyze_residual, apply_residual_order
from serq_ao.passes.transforms import (
    FoldRecord,
    InputTransform,
    OutputGather,
    PreOpLinear,
    apply_input_transforms,
    transform_consumer,
)

__all__ = [
    "ActivationProducer",
    "AttentionProducer",
    "FoldRecord",
    "GatedProducer",
    "InputTransform",
    "LinearGroup",
    "ModelPlan",
    "NormProducer",
    "OutputGather",
    "PreOpLinear",
    "ResidualOrderError",
    "ResidualPlan",
    "RowRange",
    "UnknownProducer",
    "analyze",
    "analyze_residual",
    "apply_residual_order",
    "apply_input_transforms",
    "describe",
    "plan_table",
    "transform_consumer",
]
