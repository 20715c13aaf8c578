"""The names, choices and defaults of serq-ao's options, importable without torch.

The command line builds its parser (choices, defaults, ``--help``) from this module alone, so
that ``serq --help`` and usage errors answer at once instead of after seconds of importing
torch, transformers and torchao. The modules that use these values import them from here (and
re-export them under their old names), so each decision is made in one place.

Nothing here may import torch or anything that does.
"""

from __future__ import annotations

import enum


def enum_value(enum_cls: type[enum.Enum], value, option: str) -> enum.Enum:
    """``value`` (a member or its string) as a member of ``enum_cls``; a clear error naming
    ``option`` and the allowed values otherwise."""
    try:
        return enum_cls(value)
    except ValueError:
        allowed = tuple(member.value for member in enum_cls)
        raise ValueError(f"{option} must be one of {allowed}, got {value!r}") from None


# --- methods and SERQ's choices (serq_ao.quant.methods has what each method does)


class Method(enum.StrEnum):
    RTN = "rtn"
    SMOOTHQUANT = "smoothquant"
    LQER = "lqer"
    L2QER = "l2qer"
    SERQ = "serq"


METHODS = tuple(m.value for m in Method)


class ResidualOrder(enum.StrEnum):
    """How SERQ orders the channels of linears fed by a norm on the residual stream."""

    PER_GROUP = "per_group"  # each group its own saliency order: a gather after each norm
    GLOBAL = "global"  # one order for the whole stream, folded into embeddings and norms; an
    # error where the passes cannot prove the permutation exact
    AUTO = "auto"  # GLOBAL where the passes prove it exact, PER_GROUP elsewhere (logged)


class RankAllocation(enum.StrEnum):
    """How SERQ's correction rank is set per linear (:mod:`serq_ao.quant.rank_allocation`)."""

    UNIFORM = "uniform"  # every linear gets SERQConfig.rank
    ERROR = "error"  # per linear, by measured output error, within the storage of the uniform rank


class SaliencyUnit(enum.StrEnum):
    """What SERQ's saliency order moves (:func:`~serq_ao.quant.reconstruct.salient_order`)."""

    CHANNEL = "channel"  # each channel by its max |x| (the paper)
    BLOCK = "block"  # whole blocks of SERQConfig.rotation channels, by their largest max |x|


# --- formats (serq_ao.formats)


class FormatName(enum.StrEnum):
    """The formats ``SERQConfig.format`` accepts."""

    MXFP4 = "mxfp4"  # MXFP4 weights and activations (W4A4)
    W4A8 = "w4a8"  # INT4 weights in groups of 128, INT8 activations per token and group
    W4A4 = "w4a4"  # INT4 weights in groups of 128, INT4 activations per token and group


class ScaleMode(enum.StrEnum):
    """MXFP4 block-scale rule (see :mod:`serq_ao.formats.mxfp4`)."""

    FLOOR = "floor"  # OCP spec and the SERQ reference code
    RCEIL = "rceil"  # torchao's and cuBLAS's, never clips


class WeightScales(enum.StrEnum):
    """How MXFP4 weight (and R) block scales are chosen (activations always use the rule)."""

    RULE = "rule"  # the scale_mode rule, as for activations (the SERQ reference)
    SEARCH = "search"  # per block, FLOOR's exponent or one above, by reconstruction error


class EmbeddingFormat(enum.StrEnum):
    """How the input embedding table is stored (``SERQConfig.embeddings``)."""

    FLOAT = "float"  # as the model has it
    INT8 = "int8"  # int8 per row, one float32 scale per row (serq_ao.formats.int8_rows)


FORMATS = tuple(f.value for f in FormatName)
EMBEDDING_FORMATS = tuple(e.value for e in EmbeddingFormat)
SCALE_MODES = tuple(m.value for m in ScaleMode)
WEIGHT_SCALES = tuple(w.value for w in WeightScales)
MXFP4_BLOCK_SIZE = 32  # OCP MX: one shared E8M0 exponent per 32 elements
INT_GROUP_SIZE = 128  # INT4 weights and activations: one scale per 128 elements along K
# the columns that share one weight scale, per format (QuantFormat.weight_group_size)
WEIGHT_GROUP_SIZES = {FormatName.MXFP4: MXFP4_BLOCK_SIZE, FormatName.W4A8: INT_GROUP_SIZE,
                      FormatName.W4A4: INT_GROUP_SIZE}

# 0: no rotation. Larger blocks spread an outlier over more MX blocks; the kernel's K tile
# (128 columns) bounds the size.
ROTATION_SIZES = (0, 32, 64, 128)


class GPTQOrder(enum.StrEnum):
    """The order GPTQ sweeps a weight's columns in (see :mod:`serq_ao.quant.gptq`)."""

    COLUMNS = "columns"  # left to right: the stored (for SERQ, saliency) order
    HESSIAN = "hessian"  # decreasing Hessian diagonal, scales fixed before the sweep


GPTQ_ORDERS = tuple(o.value for o in GPTQOrder)

# --- SERQConfig (serq_ao.quant.config)

RANK_MULTIPLE = 32  # R is quantized in blocks (MXFP4) of 32 columns
# The paper uses r = 128 for 4k-wide models (3% of d_in). For small models a smaller rank
# buys most of the gain: on smollm2-135m (d_in 576) the SERQ authors' code gives MXFP4
# perplexity 38.94 / 37.97 / 36.66 at r = 32 / 64 / 128 (docs/protocol.md), so 64 (11% of 576)
# is the knee, at 4.72 effective bits.
DEFAULT_RANK = 64
RESIDUAL_ORDERS = tuple(o.value for o in ResidualOrder)
RANK_ALLOCATIONS = tuple(a.value for a in RankAllocation)
SALIENCY_UNITS = tuple(u.value for u in SaliencyUnit)
DEFAULT_RESIDUAL_ORDER = ResidualOrder.PER_GROUP

# SERQConfig's defaults of the options a recipe may set: SERQ as published (recipe "paper").
# SERQConfig's fields take their defaults from here.
CONFIG_DEFAULTS = {
    "rank": DEFAULT_RANK,
    "rank_allocation": RankAllocation.UNIFORM,
    "flattening_strength": 1.0,
    "saliency_unit": SaliencyUnit.CHANNEL,
    "scale_mode": ScaleMode.FLOOR,
    "weight_scales": WeightScales.RULE,
    "rotation": 0,
    "gptq": False,
    "gptq_order": GPTQOrder.COLUMNS,
    "residual_order": DEFAULT_RESIDUAL_ORDER,
}

# --- recipes (serq_ao.quant.recipes; its module doc says what each is and why)


class Recipe(enum.StrEnum):
    PAPER = "paper"
    ROTATED_GPTQ = "rotated-gptq"


RECIPES = tuple(r.value for r in Recipe)
# the command line's default recipe (serq quantize, compare and inspect --stats)
DEFAULT_RECIPE = Recipe.ROTATED_GPTQ


def recipe_options(recipe: Recipe | str, format: str = "mxfp4") -> dict:
    """The SERQConfig options (besides ``method="serq"``) that ``recipe`` sets at ``format``."""
    recipe = enum_value(Recipe, recipe, "recipe")
    if recipe is Recipe.PAPER:
        return {}  # SERQConfig's defaults are the paper's
    fmt = enum_value(FormatName, format, "format")
    options = {"flattening_strength": 0.0, "rotation": WEIGHT_GROUP_SIZES[fmt],  # the block that shares one scale
               "saliency_unit": "block", "gptq": True, "gptq_order": "columns"}  # SERQ's order (recipes.py)
    if fmt is not FormatName.MXFP4:
        options["weight_scales"] = "search"  # INT4's group scale by error (recipes.py)
    return options


# --- data, models, evaluation (serq_ao.data, serq_ao.models, serq_ao.eval.tasks)

CORPORA = ("wiki", "bbc")
DEFAULT_SEQLEN = 1024
DEFAULT_CALIBRATION_WINDOWS = 32
DEFAULT_MODEL = "smollm2-135m"
DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda when available, else cpu)"
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # torch dtypes by name (serq_ao.models.DTYPES)
SHIPPED_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
DEFAULT_BATCH_SIZE = 16  # serq eval tasks: lm-eval requests per forward
