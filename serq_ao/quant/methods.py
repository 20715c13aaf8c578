"""What each method needs and does, in one table that the pipeline, the CLI and diagnostics ask.

| method      | statistics   | input transform                    | correction                  | packs |
|-------------|--------------|------------------------------------|-----------------------------|-------|
| rtn         | none         | none                               | none                        | yes   |
| smoothquant | max abs      | s = max|x|^a / max|w|^(1-a), folded | none                        | yes   |
| lqer        | none         | none                               | INT8 SVD factors of W - Q(W) | no    |
| l2qer       | mean abs     | none                               | same, error scaled by mean|x| | no    |
| serq        | max abs      | s = max|x| + saliency order, folded | R = Q(W^[:, :r])            | yes   |

LQER and L2QER have no packed format: their INT8 factors need a second, low-rank GEMM, so
they exist only in the evaluation mode. GPTQ (``SERQConfig.gptq``) is an option of every
method and needs calibration input ids (it runs the layers), not statistics.
"""

from __future__ import annotations

import dataclasses
import enum

# the option enums live with the other options (importable without torch); re-exported here
from serq_ao.options import METHODS, Method, RankAllocation, ResidualOrder, SaliencyUnit, enum_value  # noqa: F401


class TransformKind(enum.StrEnum):
    NONE = "none"
    FLATTEN = "flatten"  # s = max |x|, channels ordered by s (SERQ)
    SMOOTH = "smooth"  # SmoothQuant's scales, channel order kept


def saliency_block(unit: SaliencyUnit | str, rotation: int) -> int:
    """The block SERQ's saliency order moves under ``unit``: 0 for single channels, else the
    rotation's size (the block argument of :func:`~serq_ao.quant.reconstruct.salient_order`)."""
    return rotation if SaliencyUnit(unit) is SaliencyUnit.BLOCK else 0


class CorrectionKind(enum.StrEnum):
    NONE = "none"
    SALIENT = "salient"  # SERQ's R on the r most salient columns, rank SERQConfig.rank
    LOWRANK = "lowrank"  # LQER's A B factors, rank SERQConfig.lowrank_rank


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    method: Method
    needs_statistics: bool  # calibration statistics of the float model
    input_transform: TransformKind
    correction: CorrectionKind
    lowrank_input_scaled: bool  # L2QER: the error is scaled by mean |x| before the SVD
    packs: bool  # has a packed (deployable) format
    label: str  # for tables

    @property
    def transforms_input(self) -> bool:
        return self.input_transform is not TransformKind.NONE


METHOD_SPECS: dict[Method, MethodSpec] = {
    spec.method: spec
    for spec in (
        MethodSpec(Method.RTN, False, TransformKind.NONE, CorrectionKind.NONE, False, True, "RTN"),
        MethodSpec(Method.SMOOTHQUANT, True, TransformKind.SMOOTH, CorrectionKind.NONE, False, True, "SmoothQuant"),
        MethodSpec(Method.LQER, False, TransformKind.NONE, CorrectionKind.LOWRANK, False, False, "LQER"),
        MethodSpec(Method.L2QER, True, TransformKind.NONE, CorrectionKind.LOWRANK, True, False, "L2QER"),
        MethodSpec(Method.SERQ, True, TransformKind.FLATTEN, CorrectionKind.SALIENT, False, True, "SERQ"),
    )
}



def method_spec(method: str | Method) -> MethodSpec:
    """The spec of ``method``; a clear error naming the allowed methods otherwise."""
    return METHOD_SPECS[enum_value(Method, method, "method")]
