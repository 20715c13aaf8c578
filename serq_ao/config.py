"""SERQConfig: what to quantize and how. A validated, JSON-serializable dataclass."""

from __future__ import annotations

import dataclasses
import json

from serq_ao.formats.mxfp4 import SCALE_MODES

METHODS = ("rtn", "smoothquant", "lqer", "l2qer", "serq")
LOWRANK_METHODS = ("lqer", "l2qer")
FORMATS = ("mxfp4", "w4a8", "w4a4")
RANK_MULTIPLE = 32  # R is quantized in blocks (MXFP4) of 32 columns
# The paper uses r = 128 for 4k-wide models (3% of d_in). For small models a smaller rank
# buys most of the gain: on smollm2-135m (d_in 576) the SERQ authors' code gives MXFP4
# perplexity 38.94 / 37.97 / 36.66 at r = 32 / 64 / 128 (protocol.md), so 64 (11% of 576)
# is the knee, at 4.72 effective bits.
DEFAULT_RANK = 64


def check_format_rank_scale_mode(fmt: str, rank: int, scale_mode: str) -> None:
    """The checks every config that names a format, a rank and a scale rule shares."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0 or rank % RANK_MULTIPLE:
        raise ValueError(f"rank must be a non-negative multiple of {RANK_MULTIPLE} (0, 32, 64, ...), got {rank!r}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")


@dataclasses.dataclass(frozen=True)
class SERQConfig:
    """How to quantize every linear inside the decoder layers (lm_head and embeddings stay fp).

    - ``method``: ``"serq"`` (flattening + saliency order + one correction matrix of rank
      ``rank``), ``"rtn"`` (round to nearest, no transform), ``"smoothquant"`` (scales
      ``max|x|**alpha / max|w|**(1 - alpha)``, folded the same way, then RTN), ``"lqer"``
      and ``"l2qer"`` (RTN plus INT8 SVD factors of rank ``lowrank_rank`` of the weight error,
      plain or scaled by mean |x|; their intermediate product is quantized to INT8).
    - ``format``: ``"mxfp4"`` (MXFP4 weights and activations), ``"w4a8"`` / ``"w4a4"`` (INT4
      weights in groups of 128, INT8 / INT4 asymmetric per-token activations in groups of 128).
    - ``rank``: multiple of 32, 0 allowed (plain flattening); used by ``serq`` only.
    - ``scale_mode``: MXFP4 block scale rule, ``"floor"`` (OCP spec, SERQ reference) or
      ``"rceil"`` (torchao's default).
    - ``gptq``: quantize main weights with GPTQ, layer by layer, each layer calibrated on the
      outputs of the already quantized layers before it (any method).
    - ``fold_into_linears``: fold 1/s into producing linears (up rows, ReLU inputs, MHA value
      rows), whose quantized weights then include it; False keeps those scales as run-time
      pre-ops, so that no quantized weight absorbs them. Norms are folded either way.
    """

    method: str = "serq"
    format: str = "mxfp4"
    rank: int = DEFAULT_RANK
    scale_mode: str = "floor"
    smoothquant_alpha: float = 0.5
    lowrank_rank: int = 32
    gptq: bool = False
    fold_into_linears: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        check_format_rank_scale_mode(self.format, self.rank, self.scale_mode)
        if not isinstance(self.lowrank_rank, int) or isinstance(self.lowrank_rank, bool) or self.lowrank_rank < 1:
            raise ValueError(f"lowrank_rank must be a positive integer, got {self.lowrank_rank!r}")
        if not isinstance(self.fold_into_linears, bool):
            raise ValueError(f"fold_into_linears must be True or False, got {self.fold_into_linears!r}")
        if not isinstance(self.gptq, bool):
            raise ValueError(f"gptq must be True or False, got {self.gptq!r}")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(f"smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha!r}")

    @property
    def correction_rank(self) -> int:
        """The rank actually used: only SERQ has a correction matrix."""
        return self.rank if self.method == "serq" else 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "SERQConfig":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown SERQConfig fields: {sorted(unknown)}")
        return cls(**data)
