"""The figures of serq inspect --plot: which data each one takes, and what gets written."""

import torch

from serq_ao.quant.config import SERQConfig
from serq_ao.quant.diagnostics import quantize_with_diagnostics
from serq_ao.plots import plot_diagnostics, rank_sweep
from tests.conftest import make_tiny_llama


def cell(method, fmt, rank, ppl, **extra):
    return {"method": method, "format": fmt, "rank": rank, "ppl": ppl, "calib_corpus": "wiki", "scale_mode": "floor",
            **extra}


def test_rank_sweep_takes_the_default_settings_only():
    cells = [
        cell("serq", "mxfp4", 64, 37.5), cell("serq", "mxfp4", 0, 74.0), cell("serq", "w4a8", 32, 23.0),
        cell("serq", "mxfp4", 64, 34.9, calib_corpus="bbc"), cell("serq", "mxfp4", 128, 36.5, folds="norms"),
        cell("rtn", "mxfp4", 0, 81.9), cell("rtn", "mxfp4", 0, 64.8, scale_mode="rceil"), cell("fp", "fp", 0, 18.56),
    ]
    assert rank_sweep(cells) == {"serq": [(0, 74.0), (64, 37.5)], "rtn": 81.9, "fp": 18.56}
    assert rank_sweep(cells, "w4a8") == {"serq": [(32, 23.0)], "rtn": None, "fp": 18.56}


def test_without_output_errors_or_sweep_only_the_saliency_figure(tmp_path):
    _, diagnostics = quantize_with_diagnostics(make_tiny_llama(), SERQConfig(method="serq", format="mxfp4", rank=32),
                                               torch.randint(0, 256, (2, 16)), error_windows=0)
    written = plot_diagnostics(diagnostics, tmp_path / "new" / "folder", sweep_cells=[cell("serq", "mxfp4", 64, 37.5)])
    assert [p.name for p in written] == ["saliency.png"]  # one rank is no sweep
    assert sorted(p.name for p in (tmp_path / "new" / "folder").iterdir()) == ["saliency.png"]


def test_allocated_ranks_get_their_figure(tmp_path):
    calibration = [torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    _, diagnostics = quantize_with_diagnostics(make_tiny_llama(), SERQConfig(rank=32, rank_allocation="error"),
                                               calibration, error_windows=1)
    assert len({d.rank for d in diagnostics.linears}) > 1
    written = plot_diagnostics(diagnostics, tmp_path)
    assert sorted(p.name for p in written) == ["layer_error.png", "rank_allocation.png", "saliency.png"]
    assert (tmp_path / "rank_allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sweep_leaves_out_cells_of_other_options():
    cells = [cell("serq", "mxfp4", 64, 37.5), cell("serq", "mxfp4", 64, 49.1, rotation=32),
             cell("serq", "mxfp4", 64, 36.7, weight_scales="search"), cell("serq", "mxfp4", 64, 35.0,
                                                                           rank_allocation="error")]
    assert rank_sweep(cells)["serq"] == [(64, 37.5)]
