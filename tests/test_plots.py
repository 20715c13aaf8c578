"""The figures of serq inspect --plot: which data each one takes, and what gets written."""

import torch

from serq_ao.quant.config import SERQConfig
from serq_ao.quant.diagnostics import quantize_with_diagnostics
import pytest

from serq_ao.plots import check_rank_sweep, plot_diagnostics
from tests.conftest import make_tiny_llama


def test_without_output_errors_or_sweep_only_the_saliency_figure(tmp_path):
    _, diagnostics = quantize_with_diagnostics(make_tiny_llama(), SERQConfig(method="serq", format="mxfp4", rank=32),
                                               torch.randint(0, 256, (2, 16)), error_windows=0)
    written = plot_diagnostics(diagnostics, tmp_path / "new" / "folder", sweep={"serq": [[64, 37.5]], "rtn": None, "fp": None})
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


def test_a_rank_sweep_is_checked_and_its_points_sorted():
    assert check_rank_sweep({"serq": [[64, 37.5], [0, 74]], "rtn": 81.9, "fp": None}) == \
        {"serq": [(0, 74.0), (64, 37.5)], "rtn": 81.9, "fp": None}
    for bad in ([[64, 37.5]], {"serq": [[64]]}, {"serq": [[64, "x"]]}, {"serq": [], "rtn": "81"}, {"rtn": 1.0}):
        with pytest.raises(ValueError, match="--sweep: f.json must be a rank sweep"):
            check_rank_sweep(bad, "--sweep: f.json")
