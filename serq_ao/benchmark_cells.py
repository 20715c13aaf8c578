"""The settings a cell of the accuracy benchmarks (``benchmarks/accuracy.py``,
``benchmarks/zero_shot.py``) records beyond its method, format and rank, and their defaults:
the one place the tables, the plots and the cell keys read them from.

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
