"""Render the performance tables of the docs (docs/*.md, README.md) from the benchmark JSON files.

    .venv/bin/python benchmarks/performance_tables.py          # rewrites the pages in place

Each table sits between ``<!-- perf:NAME -->`` and ``<!-- /perf:NAME -->`` in a page and
is rebuilt from benchmarks/results/NAME.json, so the docs never disagree with the results.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cells import cell_setting, changed_settings  # benchmarks/cells.py (this script's folder)
from serq_ao.bench import write_text
from serq_ao.quant.recipes import Recipe, recipe_options

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# the docs show the square shape of each model family (the JSON has every shape)
LINEAR_LATENCY_SHAPES = {"llama2-7b": (4096, 4096), "llama3-8b": (4096, 14336), "smollm2": (576, 576)}


def milliseconds(seconds: float) -> str:
    """Three significant digits down to microseconds (decode-sized linears take tens of them)."""
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def linear_latency(record: dict) -> str:
    lines = ["| model | K x N | r | M | threads | fp32 ms | bf16 ms | MXFP4 r=0 ms | SERQ ms | INT W4A8 ms | "
             "SERQ / faster float | INT / faster float | SERQ / MXFP4 (budget) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["rows"]:
        if (r["K"], r["N"]) != LINEAR_LATENCY_SHAPES.get(r["model"]):
            continue
        s = r["seconds"]
        verdict = "" if r["within_budget"] else " **over**"
        lines.append(f"| {r['model']} | {r['K']} x {r['N']} | {r['rank']} | {r['M']} | {r['threads']} | "
                     + " | ".join(milliseconds(s[c]) for c in ("fp32", "bf16", "mxfp4", "serq", "int_w4a8"))
                     + f" | {r['serq_over_fp']:.2f} | {r['int_over_fp']:.2f} | "
                     f"{r['serq_over_mxfp4']:.3f}{verdict} ({1 + r['correction_budget']:.3f}) |")
    return "\n".join(lines)


def model_speed(record: dict) -> str:
    lines = ["| model | dtype | mode | prefill tok/s | decode tok/s | prefill x bf16 | decode x bf16 | "
             "prefill x fp32 | decode x fp32 | peak RSS MiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["rows"]:
        ratios = " | ".join(f"{r[k]:.2f}" for k in ("prefill_x_bfloat16", "decode_x_bfloat16", "prefill_x_float32",
                                                    "decode_x_float32"))
        lines.append(f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['prefill_tokens_per_second']:.0f} | "
                     f"{r['decode_tokens_per_second']:.1f} | {ratios} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def quantize_time(record: dict) -> str:
    lines = ["| method | transform s | reconstruct + quantize s | total s | reconstruct + quantize / SERQ |",
             "|---|---:|---:|---:|---:|"]
    for r in record["results"]:
        s = r["seconds"]
        lines.append(f"| {r['method']} | {s['transform']:.2f} | {s['quantize']:.2f} | {s['total']:.2f} | {r['over_serq']['quantize']:.1f} |")
    return "\n".join(lines)


def kernel_resources(record: dict) -> str:
    lines = ["| kernel | configuration | warps | registers | spills (bytes) | shared KiB | wgmma |", "|---|---|---:|---:|---:|---:|---|"]
    for k in record["kernels"]:
        lines.append(f"| {k['kernel']} | {k['variant']} | {k['num_warps']} | {k['registers']} | "
                     f"{k['spill_stores'] + k['spill_loads']} | {k['shared_bytes'] / 1024:.1f} | {'yes' if k['uses_wgmma'] else 'no'} |")
    return "\n".join(lines)


ZERO_SHOT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
ZERO_SHOT_ROWS = (("rtn", "RTN"), ("smoothquant", "SmoothQuant"), ("l2qer", "L2QER"), ("serq", "SERQ (r = 64)"),
                  ("serq+gptq", "SERQ + GPTQ (r = 64)"))


def _settings_label(cell: dict) -> str:
    """What a cell changed from the defaults, in words (empty for a default cell)."""
    changed = changed_settings(cell)
    words = []
    if "flattening_strength" in changed:
        strength = changed.pop("flattening_strength")
        words.append("no flattening" if strength == 0 else f"flattening {strength:g}")
    if "rotation" in changed:
        words.append(f"Hadamard-{changed.pop('rotation')}")
    if changed.pop("gptq_order", None) == "hessian":
        words.append("static order")
    if changed.pop("saliency_unit", None) == "block":
        words.append("block saliency order")
    words += [f"{k.replace('_', ' ')} {v}" for k, v in changed.items()]
    return ", ".join(words)


def _recipe_label(cell: dict) -> str | None:
    """A serq+gptq cell built on the rotated-gptq recipe, named by what it changes from the
    recipe (None: not built on it)."""
    recipe = recipe_options(Recipe.ROTATED_GPTQ, cell["format"])
    if cell["method"] != "serq+gptq" or any(cell_setting(cell, k) != recipe[k]
                                            for k in ("flattening_strength", "rotation", "saliency_unit")):
        return None
    words = []
    if cell_setting(cell, "gptq_order") != recipe["gptq_order"]:
        words.append("in the static order" if cell_setting(cell, "gptq_order") == "hessian" else "in SERQ's order")
    if cell_setting(cell, "weight_scales") != recipe.get("weight_scales", "rule"):
        words.append(f"scales by {cell_setting(cell, 'weight_scales')}")
    if cell_setting(cell, "rank_allocation") == "error":
        words.append("+ rank allocation")
    return " ".join(["SERQ, recipe rotated-gptq", *words]) + f" (r = {cell['rank']})"


def _zero_shot_name(cell: dict) -> str:
    names = dict(ZERO_SHOT_ROWS) | {"fp": "FP32", "rtn+gptq": "GPTQ"}
    label = _settings_label(cell)
    if cell["method"] == "rtn+gptq" and label == "Hadamard-32, static order":
        return "MR-GPTQ (GPTQ, Hadamard-32, static order)"
    recipe = _recipe_label(cell)
    if recipe is not None:
        return recipe
    name = names[cell["method"]]
    return f"{name}, {label}" if label else name


def zero_shot_smollm2(record: dict) -> str:
    default = {(c["method"], c["format"]): c for c in record["cells"] if not _settings_label(c)}
    extra = [c for c in record["cells"] if _settings_label(c)]
    limits = sorted({c["limit"] for c in record["cells"]})
    samples = {t: max(c["tasks"][t]["samples"] for c in record["cells"] if t in c["tasks"]) for t in ZERO_SHOT_TASKS}
    lines = [f"Accuracy (lm-eval `acc`, %), zero-shot; first {', '.join(map(str, limits))} documents per task "
             "(" + ", ".join(f"{t} {n}" for t, n in samples.items()) + ")"
             + ("; — : not run yet." if len(default) < 1 + 2 * len(ZERO_SHOT_ROWS) else "."), "",
             "| method | format | bits | " + " | ".join(ZERO_SHOT_TASKS) + " | mean |",
             "|---|---|---:|" + "---:|" * (len(ZERO_SHOT_TASKS) + 1)]
    rows = [("fp", "fp", "FP32")] + [(m, f, name) for f in ("mxfp4", "w4a8") for m, name in ZERO_SHOT_ROWS]
    rows = [(default.get((m, f)), f, name) for m, f, name in rows]
    for fmt in ("mxfp4", "w4a8"):  # cells with other settings after the format's default rows
        at = max(i for i, (_, f, _) in enumerate(rows) if f == fmt) + 1
        rows[at:at] = [(c, fmt, _zero_shot_name(c)) for c in extra if c["format"] == fmt]
    for cell, fmt, name in rows:
        label = {"fp": "—", "mxfp4": "MXFP4 W4A4", "w4a8": "W4A8"}[fmt]
        if cell is None:
            lines.append(f"| {name} | {label} | — | " + " | ".join("—" for _ in ZERO_SHOT_TASKS) + " | — |")
            continue
        accs = [cell["tasks"][t]["acc"] * 100 for t in ZERO_SHOT_TASKS]
        bits = "32" if fmt == "fp" else f"{cell['bits']:.2f}"
        lines.append(f"| {name} | {label} | {bits} | " + " | ".join(f"{a:.1f}" for a in accs)
                     + f" | {sum(accs) / len(accs):.1f} |")
    return "\n".join(lines)


def decode_profile(record: dict) -> str:
    lines = ["| model | decode step ms | without the linears ms | the linears, through their modules ms | "
             "the linears' kernels alone ms |", "|---|---:|---:|---:|---:|"]
    for r in record["rows"]:
        ops = "" if r["linears_ops_ms"] is None else f"{r['linears_ops_ms']:.1f}"
        lines.append(f"| {r['model']} | {r['step_ms']:.1f} | {r['without_linears_ms']:.1f} | "
                     f"{r['linears_modules_ms']:.1f} | {ops} |")
    return "\n".join(lines)


RENDERERS = {
    "zero_shot_smollm2": zero_shot_smollm2,
    "linear_latency_cpu": linear_latency,
    "model_speed": model_speed,
    "decode_profile": decode_profile,
    "quantize_time": quantize_time,
    "kernel_resources": kernel_resources,
}


def main() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts = {page: page.read_text() for page in pages}
    for name, render in RENDERERS.items():
        pattern = re.compile(rf"(<!-- perf:{name} -->\n)(?:.*?\n)?(<!-- /perf:{name} -->)", re.S)
        holders = [page for page, text in texts.items() if pattern.search(text)]
        if not holders:
            raise SystemExit(f"no page (README.md, docs/*.md) has a <!-- perf:{name} --> block")
        table = render(json.loads((RESULTS / f"{name}.json").read_text()))
        for page in holders:
            texts[page] = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), texts[page])
    for page in pages:
        if texts[page] != page.read_text():
            write_text(page, texts[page])
    print(f"rewrote {len(RENDERERS)} tables in {', '.join(str(p.relative_to(ROOT)) for p in pages)}")


if __name__ == "__main__":
    main()
