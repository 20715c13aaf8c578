"""benchmarks/accuracy.py's tables: the main table shows the cells of default settings, old
cells (recorded before a setting existed) and new ones alike, and every cell appears once."""

import pytest

from tests.conftest import benchmark_script


@pytest.fixture(scope="module")
def accuracy():
    with benchmark_script("accuracy") as module:
        yield module


def cell(method, fmt, rank, ppl, **settings):
    return {"method": method, "format": fmt, "rank": rank, "calib_corpus": "wiki", "scale_mode": "floor",
            "ppl": ppl, "bits": 4.25, "quantize_seconds": 3.0, **settings}


def test_default_cells_fill_the_main_table_and_the_rest_is_listed_once(accuracy):
    every_setting = dict(accuracy.SETTINGS)
    cells = [
        cell("fp", "fp", 0, 18.56),  # an old cell: no settings recorded
        cell("rtn", "mxfp4", 0, 81.86, folds="all", residual_order="per_group"),  # some recorded
        cell("serq", "mxfp4", 64, 37.53, **every_setting),  # a new cell: all recorded, all default
        cell("serq+gptq", "w4a8", 64, 21.49, **{**every_setting, "rotation": 128, "saliency_unit": "block",
                                                "flattening_strength": 0.0, "gptq_order": "hessian"}),
        cell("rtn", "w4a4", 0, 41.29, rotation=128),
    ]
    text = accuracy.tables(cells)
    main, _, rest = text.partition("## SERQ-MXFP4 rank sweep")
    assert "| FP32 | 18.56 | 18.56 | 18.56 |" in main
    assert "| RTN | 81.86 (4.25 b, 3 s) | — | — |" in main
    assert "| SERQ (r = 64) | 37.53 (4.25 b, 3 s) | — | — |" in main
    assert "21.49" not in main and "41.29" not in main
    other = rest.partition("## Other settings")[2]
    assert other.count("21.49") == 1 and other.count("41.29") == 1
    assert "37.53" not in other and "81.86" not in other


def test_rank_sweep_takes_the_default_settings_only():
    with benchmark_script("cells") as cells_module:
        cells = [
            cell("serq", "mxfp4", 64, 37.5), cell("serq", "mxfp4", 0, 74.0), cell("serq", "w4a8", 32, 23.0),
            cell("serq", "mxfp4", 64, 34.9, calib_corpus="bbc"), cell("serq", "mxfp4", 128, 36.5, folds="norms"),
            cell("serq", "mxfp4", 64, 49.1, rotation=32), cell("serq", "mxfp4", 64, 35.0, rank_allocation="error"),
            cell("rtn", "mxfp4", 0, 81.9), cell("rtn", "mxfp4", 0, 64.8, scale_mode="rceil"), cell("fp", "fp", 0, 18.56),
        ]
        assert cells_module.rank_sweep(cells) == {"serq": [[0, 74.0], [64, 37.5]], "rtn": 81.9, "fp": 18.56}
        assert cells_module.rank_sweep(cells, "w4a8") == {"serq": [[32, 23.0]], "rtn": None, "fp": 18.56}
