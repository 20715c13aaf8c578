"""Named recipes: the options of method ``serq`` that were measured together, by name.

| recipe           | flattening | saliency order moves | rotation                       | main weights       |
|------------------|------------|----------------------|--------------------------------|--------------------|
| ``paper``        | s = max|x| | channels             | none                           | round to nearest   |
| ``rotated-gptq`` | none (s=1) | rotation blocks      | Hadamard of the format's weight group (MXFP4 32, INT 128) | GPTQ in SERQ's order; INT4 scales by error |

Both keep SERQ's order by max|x| and its correction matrix R of rank ``rank`` on the first
(most salient) columns, so both cost the same bits. ``paper`` is SERQ as published, and
``SERQConfig()``'s own defaults; the command line's default is ``rotated-gptq``, the best
configuration measured (docs/accuracy.md).

Why ``rotated-gptq`` is built so, each part by a mechanism rather than by one model's score:
- A block Hadamard of the size of the weight's scale group spreads an input outlier over
  exactly the elements that share its block scale, on the activation side and on the
  weight side alike (the FP4 papers' finding, MR-GPTQ's first ingredient).
- The rotation mixes the channels of a block, so it needs ordinary channels around an
  outlier to spread it over. Sorting single channels by max|x| puts the outliers together
  in the first blocks, where the rotation has nothing to spread them over (measured: the
  channel order with a rotation of 32 is worse than no rotation, docs/accuracy.md). So the order moves
  whole blocks of the model's own channels, most salient block first, and R covers the most
  salient blocks.
- With the rotation taking care of activation outliers, flattening would only move each
  channel's range into the weight columns, where it makes a scale group's columns unequal
  again; so s = 1.
- GPTQ then compensates the weight error against the rotated input's Hessian, sweeping the
  columns in SERQ's order (``gptq_order="columns"``). That order is an activation order
  already (the most salient blocks first), and it rounds R's columns first, before any other
  column's error is pushed onto them: they keep the small residual their scales were fitted
  to. MR-GPTQ's static order (largest Hessian diagonal first) interleaves the blocks and
  rounds R's columns after others have updated them (their weight error twice that in SERQ's
  order, measured). Yet per linear the static order's output error is 1.5% lower, on the
  calibration tokens and on held-out ones alike (benchmarks/gptq_order_error.py), so this
  is a candidate mechanism, not a proof; on the model, SERQ's order measured better in every
  setting tried (MXFP4 with either of docs/protocol.md's calibration sets, INT W4A8 and W4A4;
  docs/accuracy.md), so the recipe takes it.
- At the INT formats, each INT4 group's scale is chosen by its error (``weight_scales=
  "search"``): the rotation makes a group of 128 weights bell-shaped, so its largest value
  sits far out in the tail and the max-based scale leaves most of the 16 levels unused;
  clipping the maximum (to about 0.8 of it, typically) rounds the other 127 on a finer grid.

Not in it: ``rank_allocation="error"``. On top of the recipe it did not help at MXFP4
(docs/accuracy.md), and it measures every layer before it quantizes any, so a run with it loads the
whole model, where the recipe alone streams the checkpoint layer by layer; a default must
work on hosts with less memory than the model.
"""

from __future__ import annotations

from serq_ao.quant.config import SERQConfig
# the recipes' names and options are defined where the command line reads them (its --help
# states each option's default) without importing torch
from serq_ao.options import DEFAULT_RECIPE, RECIPES, Recipe, recipe_options  # noqa: F401


# A recipe's option that means something only with another (GPTQ's order without GPTQ, the
# block order without a rotation) is dropped when the caller turns that other one off.
_NEEDS = {"gptq_order": "gptq", "saliency_unit": "rotation"}


def with_recipe(recipe: Recipe | str, options: dict) -> dict:
    """``options`` (SERQConfig fields of method serq) on top of ``recipe``'s."""
    merged = {**recipe_options(recipe, options.get("format", "mxfp4")), **options}
    for option, needed in _NEEDS.items():
        if option not in options and needed in options and not options[needed]:
            merged.pop(option, None)
    return merged


def recipe_config(recipe: Recipe | str = DEFAULT_RECIPE, **options) -> SERQConfig:
    """``SERQConfig(method="serq")`` with ``recipe``'s options; ``options`` (any SERQConfig
    field but ``method``) override the recipe's, e.g. ``recipe_config("rotated-gptq",
    format="w4a8", rank=32)``; turning off GPTQ or the rotation drops the recipe's GPTQ order
    or block order with it."""
    if "method" in options:
        raise ValueError(f"a recipe is one of method 'serq', got method={options['method']!r}; "
                         "build SERQConfig(method=...) for other methods")
    return SERQConfig(method="serq", **with_recipe(recipe, options))
