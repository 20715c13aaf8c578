"""The settings a cell of the accuracy benchmarks (``benchmarks/accuracy.py``,
``benchmarks/zero_shot.py``) records beyond its method, format and rank, and their defaults:
the one place the tables, the rank sweep and the cell keys read them from.

A cell recorded before a setting existed lacks it and is read with the default, which is
SERQConfig's (the setting's value before it could be chosen)."""

from __future__ import annotations

CELL_SETTINGS = {"folds": "all", "residual_order": "per_group", "weight_scales": "rule", "rotation": 0,
                 "gptq_order": "columns", "rank_allocation": "uniform", "flattening_strength": 1.0,
                 "saliency_unit": "channel"}


def cell_setting(cell: dict, name: str):
    """A cell's value of the setting ``name``, its default where the cell predates it."""
    return cell.get(name, CELL_SETTINGS[name])


def changed_settings(cell: dict) -> dict:
    """The settings a cell ran with that are not the defaults, by name."""
    return {name: cell_setting(cell, name) for name, default in CELL_SETTINGS.items()
            if cell_setting(cell, name) != default}


def is_default_cell(cell: dict) -> bool:
    """Whether a cell ran with the default of every setting."""
    return not changed_settings(cell)


def rank_sweep(cells: list[dict], fmt: str = "mxfp4") -> dict:
    """Perplexity against the SERQ rank, from accuracy cells of the default settings only (one
    cell per rank): {"serq": [[rank, ppl], ...], "rtn": ppl or None, "fp": ppl or None}, the
    shape ``serq inspect --sweep`` plots (benchmarks/accuracy.py writes it into its results)."""
    default = [c for c in cells if c.get("calib_corpus") == "wiki" and c.get("scale_mode") == "floor"
               and is_default_cell(c)]
    sweep = sorted([c["rank"], c["ppl"]] for c in default if c["method"] == "serq" and c["format"] == fmt)
    rtn = [c["ppl"] for c in default if c["method"] == "rtn" and c["format"] == fmt]
    fp = [c["ppl"] for c in default if c["method"] == "fp"]
    return {"serq": sweep, "rtn": rtn[0] if rtn else None, "fp": fp[0] if fp else None}
