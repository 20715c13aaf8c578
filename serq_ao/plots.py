"""PNG figures of a quantization's diagnostics (``serq inspect --plot``), with matplotlib.

- ``saliency.png``: cumulative share of the channel maxima held by the top-k channels, per
  linear group kind (mean over layers, min-max band), against the uniform share k / d_in.
- ``layer_error.png``: each linear's relative output error, by layer, one line per kind.
- ``rank_sweep.png``: perplexity against the SERQ rank, from a rank sweep (:func:`check_rank_sweep`).
- ``rank_allocation.png``: each linear's correction rank by layer, one line per kind, where
  the ranks differ (``rank_allocation="error"``).

Every file is written under the rules of :mod:`serq_ao.files`: to a temporary name, renamed
into place, an existing figure replaced only with ``overwrite``, so an interrupted run leaves
none half written and nothing else in the folder is touched.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from pathlib import Path

from serq_ao.quant.diagnostics import Diagnostics
from serq_ao.extras import require
from serq_ao.files import Output, atomic_path, claim_output

FIGURES = ("saliency.png", "layer_error.png", "rank_sweep.png", "rank_allocation.png")


def require_matplotlib():
    """matplotlib, or an error naming the ``plot`` extra (callers check before any work)."""
    return require("matplotlib", "plot", "serq inspect --plot")


def _pyplot():
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path | Output) -> Path:
    """Write ``figure`` to ``path`` (replacing a file there) or to an Output claimed by the caller."""
    with (path.write() if isinstance(path, Output) else atomic_path(path)) as tmp:
        figure.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    return path.path if isinstance(path, Output) else path


def plot_saliency(diagnostics: Diagnostics, path: Path | Output, title: str = "") -> Path:
    plt = _pyplot()
    by_kind = defaultdict(list)
    for curve in diagnostics.curves:
        by_kind[curve.kind].append(curve)
    rank = max((d.rank for d in diagnostics.linears), default=0)
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for index, (kind, curves) in enumerate(sorted(by_kind.items())):
        color = f"C{index}"
        ks = [k for k, _ in curves[0].points]
        shares = [[dict(c.points)[k] for c in curves] for k in ks]
        axes.plot(ks, [sum(s) / len(s) for s in shares], color=color, marker=".", label=f"{kind} (d={curves[0].in_features})")
        axes.fill_between(ks, [min(s) for s in shares], [max(s) for s in shares], color=color, alpha=0.15, linewidth=0)
        axes.plot(ks, [k / curves[0].in_features for k in ks], color=color, linestyle=":", linewidth=1)
    if rank:
        axes.axvline(rank, color="gray", linestyle="--", linewidth=1, label=f"r = {rank}")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("top-k input channels (by max |x|)")
    axes.set_ylabel("share of sum of max |x|")
    axes.set_ylim(0, 1.02)
    axes.set_title(title or "Saliency concentration (dotted: uniform)")
    axes.legend(fontsize=7, loc="upper left")
    axes.grid(alpha=0.3)
    try:
        return _save(figure, path)
    finally:
        plt.close(figure)


def _plot_by_layer(points: list[tuple[str, int, float]], path: Path | Output, ylabel: str, title: str) -> Path:
    """One line per linear kind of (kind, layer, value) points against the decoder layer."""
    plt = _pyplot()
    by_kind = defaultdict(list)
    for kind, layer, value in points:
        by_kind[kind].append((layer, value))
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for kind, line in sorted(by_kind.items()):
        line.sort()
        axes.plot([p[0] for p in line], [p[1] for p in line], marker=".", label=kind)
    axes.set_xlabel("decoder layer")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=7, ncol=2)
    axes.grid(alpha=0.3)
    try:
        return _save(figure, path)
    finally:
        plt.close(figure)


def plot_layer_error(diagnostics: Diagnostics, path: Path | Output, title: str = "") -> Path | None:
    """None when no output error was measured."""
    rows = [d for d in diagnostics.linears if d.output_error is not None and d.layer is not None]
    if not rows:
        return None
    return _plot_by_layer([(d.kind, d.layer, d.output_error) for d in rows], path,
                          "relative output error ||Y_q - Y|| / ||Y||",
                          title or f"Per-layer error on {diagnostics.error_tokens} calibration tokens")


def plot_rank_allocation(diagnostics: Diagnostics, path: Path | Output, title: str = "") -> Path | None:
    """None when every linear has the same rank."""
    rows = [d for d in diagnostics.linears if d.layer is not None]
    if len({d.rank for d in rows}) < 2:
        return None
    return _plot_by_layer([(d.kind, d.layer, d.rank) for d in rows], path, "correction rank r",
                          title or "Correction rank per linear")


def check_rank_sweep(sweep, source: str = "sweep") -> dict:
    """A rank sweep, checked: {"serq": [[rank, perplexity], ...], "rtn": perplexity or None,
    "fp": perplexity or None} (what benchmarks/accuracy.py writes under "rank_sweep"); a
    ValueError naming ``source`` otherwise."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    points = sweep.get("serq") if isinstance(sweep, dict) else None
    if (not isinstance(points, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(map(number, p))
                                                for p in points)
            or not all(sweep.get(k) is None or number(sweep.get(k)) for k in ("rtn", "fp"))):
        raise ValueError(f"{source} must be a rank sweep: {{\"serq\": [[rank, perplexity], ...], "
                         f"\"rtn\": perplexity or null, \"fp\": perplexity or null}}")
    return {"serq": sorted((int(r), float(p)) for r, p in points), "rtn": sweep.get("rtn"), "fp": sweep.get("fp")}


def plot_rank_sweep(sweep: dict, path: Path | Output, title: str = "") -> Path | None:
    """None when the sweep holds fewer than two SERQ ranks."""
    sweep = check_rank_sweep(sweep)
    if len(sweep["serq"]) < 2:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    axes.plot([r for r, _ in sweep["serq"]], [p for _, p in sweep["serq"]], marker="o", label="SERQ")
    if sweep["rtn"] is not None:
        axes.axhline(sweep["rtn"], color="C3", linestyle="--", label=f"RTN ({sweep['rtn']:.1f})")
    if sweep["fp"] is not None:
        axes.axhline(sweep["fp"], color="C2", linestyle=":", label=f"FP ({sweep['fp']:.2f})")
    axes.set_xlabel("correction rank r")
    axes.set_ylabel("perplexity")
    axes.set_title(title or "Perplexity against rank")
    axes.legend()
    axes.grid(alpha=0.3)
    try:
        return _save(figure, path)
    finally:
        plt.close(figure)


def plot_diagnostics(diagnostics: Diagnostics, folder: str | os.PathLike, *, sweep: dict | None = None,
                     title: str = "", overwrite: bool = False) -> list[Path]:
    """Write the figures into ``folder`` (made if needed); returns the files written. A figure
    that exists is replaced only with ``overwrite``; other files in ``folder`` are never touched."""
    folder = Path(folder)
    names = [name for name in FIGURES if sweep or name != "rank_sweep.png"]
    with contextlib.ExitStack() as claims:
        outputs = {name: claims.enter_context(claim_output(folder / name, option="--plot", folder=False,
                                                           overwrite=overwrite))
                   for name in names}
        prefix = f"{title}: " if title else ""
        figures = [
            plot_saliency(diagnostics, outputs["saliency.png"], prefix + "saliency concentration (dotted: uniform)"),
            plot_layer_error(diagnostics, outputs["layer_error.png"],
                             prefix + f"per-layer output error, {diagnostics.error_tokens} calibration tokens"),
            plot_rank_allocation(diagnostics, outputs["rank_allocation.png"],
                                 prefix + "correction rank per linear (rank allocation)"),
        ]
        if sweep:
            figures.append(plot_rank_sweep(sweep, outputs["rank_sweep.png"], title=prefix + "perplexity against the SERQ rank"))
    return [figure for figure in figures if figure is not None]
