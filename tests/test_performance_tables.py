"""benchmarks/performance_tables.py names zero-shot rows by what they change: a cell built on
the rotated-gptq recipe says what it changes from the recipe, at the recipe of its format."""

import pytest

from serq_ao.quant.recipes import recipe_options
from tests.conftest import benchmark_script

with benchmark_script("cells") as cells:  # benchmarks/cells.py
    CELL_SETTINGS = dict(cells.CELL_SETTINGS)


@pytest.fixture(scope="module")
def tables():
    with benchmark_script("performance_tables") as module:
        yield module


def zero_shot_cell(method, fmt, **settings):
    return {"method": method, "format": fmt, "rank": 64, **CELL_SETTINGS, **settings}


@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8"])
def test_cells_on_the_rotated_gptq_recipe_are_named_by_their_changes(tables, fmt):
    recipe = {k: v for k, v in recipe_options("rotated-gptq", fmt).items() if k in CELL_SETTINGS}
    name = tables._zero_shot_name
    assert name(zero_shot_cell("serq+gptq", fmt, **recipe)) == "SERQ, recipe rotated-gptq (r = 64)"
    assert (name(zero_shot_cell("serq+gptq", fmt, **{**recipe, "gptq_order": "hessian", "rank_allocation": "error"}))
            == "SERQ, recipe rotated-gptq in the static order + rank allocation (r = 64)")
    other_scales = "rule" if recipe.get("weight_scales", "rule") == "search" else "search"
    assert (name(zero_shot_cell("serq+gptq", fmt, **{**recipe, "weight_scales": other_scales}))
            == f"SERQ, recipe rotated-gptq scales by {other_scales} (r = 64)")
    # not on the recipe: named by what it changes from the defaults
    assert name(zero_shot_cell("serq+gptq", fmt, rotation=32)) == "SERQ + GPTQ (r = 64), Hadamard-32"
    assert (name(zero_shot_cell("rtn+gptq", fmt, rotation=32, gptq_order="hessian"))
            == "MR-GPTQ (GPTQ, Hadamard-32, static order)")
    assert name(zero_shot_cell("serq", fmt, **recipe)) != "SERQ, recipe rotated-gptq (r = 64)"
