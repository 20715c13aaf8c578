"""SERQConfig: what to quantize and how. A validated, JSON-serializable dataclass."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re

from serq_ao.formats import FORMATS, FormatName, QuantFormat, ScaleMode, WeightScales, enum_value, get_format
from serq_ao.formats.hadamard import check_rotation
from serq_ao.quant.gptq import GPTQOrder
from serq_ao.quant.methods import (
    METHODS,
    CorrectionKind,
    Method,
    MethodSpec,
    RankAllocation,
    ResidualOrder,
    SaliencyUnit,
    saliency_block,
    TransformKind,
    method_spec,
)

# the choices and defaults live where the command line reads them without importing torch
from serq_ao.options import (  # noqa: E402
    CONFIG_DEFAULTS,
    DEFAULT_RANK,
    DEFAULT_RESIDUAL_ORDER,
    EmbeddingFormat,
    RANK_ALLOCATIONS,
    RANK_MULTIPLE,
    RESIDUAL_ORDERS,
    SALIENCY_UNITS,
)

__all__ = ["DEFAULT_RANK", "DEFAULT_RESIDUAL_ORDER", "FORMATS", "METHODS", "RANK_ALLOCATIONS", "RANK_MULTIPLE",
           "SERQConfig", "check_format_rank_scale_mode"]


def check_format_rank_scale_mode(fmt, rank: int, scale_mode) -> tuple[FormatName, ScaleMode]:
    """The checks every config that names a format, a rank and a scale rule shares; returns
    the format and scale mode as enum members."""
    fmt = enum_value(FormatName, fmt, "format")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0 or rank % RANK_MULTIPLE:
        raise ValueError(f"rank must be a non-negative multiple of {RANK_MULTIPLE} (0, 32, 64, ...), got {rank!r}")
    return fmt, enum_value(ScaleMode, scale_mode, "scale_mode")


@dataclasses.dataclass(frozen=True)
class SERQConfig:
    """How to quantize every linear inside the decoder layers (and lm_head and the embedding
    table if asked).

    The defaults are SERQ as published (recipe ``"paper"``); :func:`serq_ao.recipe_config`
    builds the named recipes, among them the command line's default ``"rotated-gptq"``
    (:mod:`serq_ao.quant.recipes`).

    - ``method``: ``"serq"`` (flattening + saliency order + one correction matrix of rank
      ``rank``), ``"rtn"`` (round to nearest, no transform), ``"smoothquant"`` (scales
      ``max|x|**alpha / max|w|**(1 - alpha)``, folded the same way, then RTN), ``"lqer"``
      and ``"l2qer"`` (RTN plus INT8 SVD factors of rank ``lowrank_rank`` of the weight error,
      plain or scaled by mean |x|; their intermediate product is quantized to INT8). What each
      needs and does: :mod:`serq_ao.quant.methods`.
    - ``format``: ``"mxfp4"`` (MXFP4 weights and activations), ``"w4a8"`` / ``"w4a4"`` (INT4
      weights in groups of 128, INT8 / INT4 asymmetric per-token activations in groups of 128).
    - ``rank``: multiple of 32, 0 allowed (plain flattening); used by ``serq`` only.
    - ``rank_allocation``: ``"uniform"`` (every linear gets ``rank``, the paper) or
      ``"error"`` (each linear its own rank, a multiple of 32 from 0 to 4 x ``rank``, chosen
      by its measured output error on the calibration data within the storage that ``rank``
      everywhere would take; :mod:`serq_ao.quant.rank_allocation`). ``"error"`` needs method
      ``serq``, ``rank`` > 0, calibration input ids and the whole model in memory (every
      linear's curve is measured before any is quantized), and does not share out to a
      quantized output head (``quantize_lm_head``).
    - ``flattening_strength``: SERQ's flattening scales are ``s = max|x| ** strength``: 1 (the
      paper) moves each input channel's whole range into the weights, 0 keeps the weights as
      they are (s = 1: the input stays unflattened, and a ``rotation`` or GPTQ is left to deal
      with its outliers), values in between move part of it, as SmoothQuant's alpha. The
      saliency order, and so which columns the correction matrix covers, is by max |x| at any
      strength. ``serq`` only.
    - ``saliency_unit``: what the saliency order moves: ``"channel"`` (each channel by its
      max|x|, the paper) or ``"block"`` (whole blocks of ``rotation`` consecutive channels, by
      their largest max|x|, each block's channels in their own order: the rotation then mixes
      the model's own blocks, and R covers the most salient blocks;
      :func:`~serq_ao.quant.reconstruct.salient_order`). ``"block"`` needs method
      ``serq``, a ``rotation`` and ``residual_order="per_group"``.
    - ``scale_mode``: MXFP4 block scale rule, ``"floor"`` (OCP spec, SERQ reference) or
      ``"rceil"`` (torchao's default).
    - ``weight_scales``: how weight and R scales are chosen: ``"rule"`` (the format's rule:
      MXFP4's ``scale_mode``, as for activations, INT4's group maximum / 7; the SERQ
      reference) or ``"search"``, by each group's reconstruction error: MXFP4, FLOOR's
      exponent or one above (still OCP MXFP4); INT4, the maximum clipped to the fraction
      from 1 down to 0.5 with the least error (still symmetric INT4). Activations always
      use their rule.
    - ``rotation``: block size of a Hadamard rotation of every quantized linear's input, 32,
      64 or 128 (0: none, the default): the weights are rotated offline, after the method's
      transform and order and before quantization (GPTQ's Hessians with them), and the
      activations online inside their quantization (:mod:`serq_ao.formats.hadamard`).
    - ``gptq``: quantize main weights with GPTQ, layer by layer, each layer calibrated on the
      outputs of the already quantized layers before it (any method).
    - ``gptq_order``: GPTQ's column order, ``"columns"`` (left to right; for SERQ the salient
      columns first) or ``"hessian"`` (MR-GPTQ's static activation order: decreasing Hessian
      diagonal, scales fixed before the sweep); see :mod:`serq_ao.quant.gptq`. GPTQ only.
    - ``fold_into_linears``: fold 1/s into producing linears (up rows, ReLU inputs, MHA value
      rows), whose quantized weights then include it; False keeps those scales as run-time
      pre-ops, so that no quantized weight absorbs them. Norms are folded either way.
    - ``residual_order``: ``"per_group"`` (each group its own saliency order; norm-fed groups
      get a gather after their norm), ``"global"`` (one order for the whole residual
      stream, :func:`~serq_ao.quant.reconstruct.residual_stream_order`, folded into the
      embeddings, norms and the linears that write and read the stream: norm-fed groups need
      no gather, but share one set of salient channels; an error on a model whose stream the
      passes cannot permute exactly; ``serq`` only) or ``"auto"`` (global where the passes
      prove it exact, per group elsewhere, with a warning). Methods without a saliency order
      ignore ``"auto"`` and ``"per_group"``.
    - ``ignore``: linears left in floating point, by module name: an exact name, a glob
      (``"*.mlp.down_proj"``, ``"model.layers.0.*"``) or ``"re:"`` and a regular expression
      that must match the whole name (as LLM Compressor spells it). Their group's exact
      transforms still apply (the model's output does not change); they are not quantized.
      A pattern that matches no linear is reported with a warning.
    - ``quantize_lm_head``: quantize the output head too, as the last stage after the
      decoder layers (:mod:`serq_ao.quant.lm_head`); a head tied to the embeddings is untied
      first (the embeddings stay as ``embeddings`` says). Off by default, as in the paper.
    - ``embeddings``: how the input embedding table is stored: ``"float"`` (as the model has
      it, the paper) or ``"int8"`` (int8 codes with one float32 scale per row,
      :mod:`serq_ao.formats.int8_rows`; a head tied to the table, not quantized with
      ``quantize_lm_head``, then computes its logits from the same int8 table). The table is
      quantized last, after every transform that folds into it. Methods with a packed format
      only (the table is stored packed).

    ``method``, ``format``, ``scale_mode``, ``weight_scales``, ``rank_allocation`` and ``saliency_unit`` accept strings or the enums
    (:class:`~serq_ao.quant.methods.Method`, :class:`~serq_ao.formats.FormatName`,
    :class:`~serq_ao.formats.ScaleMode`, :class:`~serq_ao.formats.WeightScales`) and are
    stored as the enums (which are ``str``).
    """

    method: Method = Method.SERQ
    format: FormatName = FormatName.MXFP4
    rank: int = CONFIG_DEFAULTS["rank"]
    rank_allocation: RankAllocation = CONFIG_DEFAULTS["rank_allocation"]
    flattening_strength: float = CONFIG_DEFAULTS["flattening_strength"]
    saliency_unit: SaliencyUnit = CONFIG_DEFAULTS["saliency_unit"]
    scale_mode: ScaleMode = CONFIG_DEFAULTS["scale_mode"]
    weight_scales: WeightScales = CONFIG_DEFAULTS["weight_scales"]
    rotation: int = CONFIG_DEFAULTS["rotation"]
    smoothquant_alpha: float = 0.5
    lowrank_rank: int = 32
    gptq: bool = CONFIG_DEFAULTS["gptq"]
    gptq_order: GPTQOrder = CONFIG_DEFAULTS["gptq_order"]
    fold_into_linears: bool = True
    residual_order: ResidualOrder = CONFIG_DEFAULTS["residual_order"]
    ignore: tuple[str, ...] = ()
    quantize_lm_head: bool = False
    embeddings: EmbeddingFormat = EmbeddingFormat.FLOAT

    def __post_init__(self):
        object.__setattr__(self, "method", enum_value(Method, self.method, "method"))
        fmt, scale_mode = check_format_rank_scale_mode(self.format, self.rank, self.scale_mode)
        object.__setattr__(self, "format", fmt)
        object.__setattr__(self, "scale_mode", scale_mode)
        object.__setattr__(self, "weight_scales", enum_value(WeightScales, self.weight_scales, "weight_scales"))
        object.__setattr__(self, "rank_allocation", enum_value(RankAllocation, self.rank_allocation, "rank_allocation"))
        if self.rank_allocation is not RankAllocation.UNIFORM and (
                self.spec.correction is not CorrectionKind.SALIENT or not self.rank):
            raise ValueError(f"rank_allocation={self.rank_allocation.value!r} applies to method 'serq' with rank > 0 "
                             f"(the rank it shares out), got method {self.method.value!r} with rank {self.rank}")
        object.__setattr__(self, "flattening_strength", check_flattening_strength(self.flattening_strength))
        if self.flattening_strength != 1.0 and self.spec.input_transform is not TransformKind.FLATTEN:
            raise ValueError(f"flattening_strength={self.flattening_strength!r} applies to method 'serq' only "
                             f"(its flattening), got method {self.method.value!r}")
        check_rotation(self.rotation)
        if self.rotation and self.spec.correction is CorrectionKind.LOWRANK:
            # their error factors would be fitted, and L2QER's scaled, in the rotated basis
            allowed = tuple(m.value for m in Method if method_spec(m).correction is not CorrectionKind.LOWRANK)
            raise ValueError(f"rotation applies to methods {allowed}, got method {self.method.value!r} "
                             f"with rotation={self.rotation}")
        if not isinstance(self.lowrank_rank, int) or isinstance(self.lowrank_rank, bool) or self.lowrank_rank < 1:
            raise ValueError(f"lowrank_rank must be a positive integer, got {self.lowrank_rank!r}")
        if not isinstance(self.fold_into_linears, bool):
            raise ValueError(f"fold_into_linears must be True or False, got {self.fold_into_linears!r}")
        if not isinstance(self.gptq, bool):
            raise ValueError(f"gptq must be True or False, got {self.gptq!r}")
        object.__setattr__(self, "gptq_order", enum_value(GPTQOrder, self.gptq_order, "gptq_order"))
        if self.gptq_order is not GPTQOrder.COLUMNS and not self.gptq:
            raise ValueError(f"gptq_order={self.gptq_order.value!r} applies with gptq=True only")
        if not isinstance(self.quantize_lm_head, bool):
            raise ValueError(f"quantize_lm_head must be True or False, got {self.quantize_lm_head!r}")
        if self.quantize_lm_head and self.rank_allocation is not RankAllocation.UNIFORM:
            raise ValueError(f"rank_allocation={self.rank_allocation.value!r} shares ranks among the decoder layers' "
                             "linears only: use it with quantize_lm_head=False, or rank_allocation='uniform'")
        object.__setattr__(self, "embeddings", enum_value(EmbeddingFormat, self.embeddings, "embeddings"))
        if self.embeddings is not EmbeddingFormat.FLOAT and not self.spec.packs:
            raise ValueError(f"embeddings={self.embeddings.value!r} stores the table packed, and method "
                             f"{self.method.value!r} has no packed format: use embeddings='float'")
        object.__setattr__(self, "residual_order", enum_value(ResidualOrder, self.residual_order, "residual_order"))
        object.__setattr__(self, "saliency_unit", enum_value(SaliencyUnit, self.saliency_unit, "saliency_unit"))
        if self.saliency_unit is SaliencyUnit.BLOCK and (
                self.spec.input_transform is not TransformKind.FLATTEN or not self.rotation
                or self.residual_order is not ResidualOrder.PER_GROUP):
            raise ValueError("saliency_unit='block' moves the blocks of a rotation: it needs method 'serq', a rotation "
                             "and residual_order='per_group', got "
                             f"method {self.method.value!r}, rotation={self.rotation}, "
                             f"residual_order={self.residual_order.value!r}")
        if self.residual_order is ResidualOrder.GLOBAL and self.spec.input_transform is not TransformKind.FLATTEN:
            raise ValueError(f"residual_order='global' applies to method 'serq' only (its saliency order), "
                             f"got method {self.method.value!r}")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(f"smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha!r}")
        object.__setattr__(self, "ignore", _checked_patterns(self.ignore))

    def ignores(self, name: str) -> bool:
        """Whether the linear ``name`` stays in floating point (``ignore``)."""
        return any(matches_pattern(pattern, name) for pattern in self.ignore)

    @property
    def spec(self) -> MethodSpec:
        return method_spec(self.method)

    @property
    def quant_format(self) -> QuantFormat:
        return get_format(self.format, self.scale_mode, self.weight_scales)

    @property
    def correction_rank(self) -> int:
        """The rank actually used: only SERQ has a correction matrix."""
        return self.rank if self.spec.correction is CorrectionKind.SALIENT else 0

    @property
    def saliency_block(self) -> int:
        """The block the saliency order moves: 0 for single channels, else the rotation's size."""
        return saliency_block(self.saliency_unit, self.rotation)

    @property
    def needs_statistics(self) -> bool:
        return self.spec.needs_statistics

    @property
    def needs_input_ids(self) -> bool:
        """GPTQ and the rank allocation run the layers on calibration input ids; statistics
        are not enough."""
        return self.gptq or self.rank_allocation is not RankAllocation.UNIFORM

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, str) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "SERQConfig":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown SERQConfig fields: {sorted(unknown)}")
        return cls(**data)


def check_flattening_strength(strength) -> float:
    """A flattening strength: a number in [0, 1], returned as a float."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"flattening_strength must be a number in [0, 1] (1: the paper's flattening, 0: none), "
                         f"got {strength!r}")
    return float(strength)


def _checked_patterns(patterns) -> tuple[str, ...]:
    if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"ignore must be a list of module-name patterns (names, globs or 're:' regular "
                         f"expressions), got {patterns!r}")
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise ValueError(f"ignore pattern {pattern!r} is not a regular expression: {e}") from None
    return tuple(patterns)


def matches_pattern(pattern: str, name: str) -> bool:
    """Whether module ``name`` matches one ``ignore`` pattern (name, glob or "re:" regex)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)
