"""Peak memory and wall time of ``serq quantize`` as the model gets deeper.

    .venv/bin/python benchmarks/scale.py --work /tmp/serq-scale
    .venv/bin/python benchmarks/scale.py --depths 4,8 --methods serq --no-large --no-in-memory --repeats 1
    .venv/bin/python benchmarks/scale.py --no-large --repeats 1    # the depth sweep only

Synthetic Llama-shaped models with random weights (hidden 1024, intermediate 2816, 16 heads,
4 KV heads, vocabulary 32000, untied head, float32, seeded), one per depth (default 4, 8, 16,
32 decoder layers), saved by ``save_pretrained(max_shard_size="200MB")`` as sharded
safetensors beside a byte-level tokenizer, and cached under ``--work`` so that reruns reuse
them. Each is quantized by ``serq quantize`` (streamed, the default path) with RTN, SERQ and
SERQ + GPTQ (MXFP4, ``--no-diagnostics``, calibration 4 windows x 256 tokens of wiki), and with
SERQ ``--in-memory``, the path that loads the whole model first. Every run is a child process
of its own (``OMP_NUM_THREADS=--threads``, default 1); its peak resident memory is the
kernel's ``ru_maxrss`` for that pid (``os.wait4``), its time the wall time of the whole
command, start-up included. The streamed RTN and SERQ cells run ``--repeats`` times (default
3): their peak differs from run to run of the same command. ``serq quantize`` pins glibc's mmap
threshold at 1 MiB for its process (serq_ao/memory.py), so that freed tensors go back to the
system rather than stay in the heap. A control cell runs the same command with
``MALLOC_MMAP_THRESHOLD_=33554432``: the threshold at 32 MiB, where glibc's default (rising as
large blocks are freed) ends up; the difference is memory the allocator kept.

Then one "large" model (default 60 layers, a 3.0 GB fp32 checkpoint) is quantized under a
memory cap (default 1.4 GB, under half the checkpoint: 1.2 GB is below what SERQ streamed
itself needs, about 1.15-1.3 GB on this shape, most of it before the first layer). Where a
cgroup v2 with the memory controller can be delegated to (our own cgroup's subtree), the cap
is the kernel's ``memory.max`` of a child cgroup; otherwise a watchdog polls the child's
high-water mark (``VmHWM``) every 20 ms and kills it past the cap, and a run counts as
"within the cap" only if it finished and its ``ru_maxrss`` is at most the cap: measured, not
enforced by the kernel.
JSON in benchmarks/results/scale.json (every run, and per cell); tables last.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from child_memory import Cap, measure  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GB = 10**9
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
             vocab_size=32000)
METHOD_ARGS = {"rtn": ["--method", "rtn"], "serq": ["--method", "serq"], "serq+gptq": ["--method", "serq", "--gptq"]}
SEED = 0
LARGE_DEPTH = 60


# ---------------------------------------------------------------------------------------------
# synthetic checkpoints

def model_name(depth: int, shape: dict, seed: int) -> str:
    return (f"llama-h{shape['hidden_size']}-i{shape['intermediate_size']}-a{shape['num_attention_heads']}"
            f"-kv{shape['num_key_value_heads']}-v{shape['vocab_size']}-L{depth}-s{seed}")


def build_model(folder, depth: int, *, shape: dict | None = None, seed: int = SEED,
                max_shard_size: str = "200MB") -> Path:
    """A random float32 Llama of ``depth`` decoder layers saved in ``folder`` (sharded
    safetensors + byte tokenizer). Reuses ``folder`` if a complete build is there; a build is
    written beside it and renamed into place, so an interrupted one is never reused."""
    import torch  # here, not at the top: the launcher (python -S) imports this file too
    from transformers import LlamaConfig, LlamaForCausalLM

    from serq_ao.testing import make_byte_tokenizer

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    shape = dict(SHAPE if shape is None else shape)
    config = LlamaConfig(num_hidden_layers=depth, tie_word_embeddings=False, max_position_embeddings=2048,
                         torch_dtype="float32", **shape)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(partial, max_shard_size=max_shard_size, safe_serialization=True)
    del model
    make_byte_tokenizer(bos=True).save_pretrained(partial)
    partial.rename(folder)
    return folder


def _build_in_child(folder: Path, depth: int) -> None:
    """Build in a process of its own, so that its memory goes back at once."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import scale; "
            "scale.build_model(sys.argv[2], int(sys.argv[3]))")
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(folder), str(depth)],
                   check=True)


def checkpoint_facts(folder: Path) -> dict:
    """Parameter count and bytes of the safetensors shards (from their headers)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    params = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                params += math.prod(handle.get_slice(key).get_shape())
    return {"params": params, "bytes": sum(f.stat().st_size for f in files), "shards": len(files)}


# ---------------------------------------------------------------------------------------------
# the benchmark

def serq_command() -> list[str]:
    script = Path(sys.executable).with_name("serq")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "serq_ao.cli.main"]


# how each path runs `serq quantize`: extra flags and environment
CONTROL = "streamed, MALLOC_MMAP_THRESHOLD_=32MiB"
PATHS = {
    "streamed": ([], {}),
    "in-memory": (["--in-memory"], {}),
    # the control: the same streamed run with glibc's mmap threshold at 32 MiB, where its default
    # ends up once large blocks were freed (the environment's value overrides serq's own pin)
    CONTROL: ([], {"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}),
}


def quantize_run(folder: Path, method: str, path: str, args, scratch: Path, cap: Cap | None = None,
                 repeat: int = 0) -> dict:
    """One ``serq quantize`` into a fresh folder of its own (removed after: a run the watchdog
    killed leaves its resumable work beside its --out, which the next run must not see)."""
    flags, extra_env = PATHS[path]
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", f"{folder.name}-{method}-{path}-{repeat}")
    run_dir = scratch / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    out = run_dir / "out"
    command = [*serq_command(), "quantize", str(folder), "--out", str(out), *METHOD_ARGS[method],
               "--calib-windows", str(args.calib_windows), "--calib-seqlen", str(args.calib_seqlen),
               "--no-diagnostics", "--quiet", "--json", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), **extra_env}
    record = measure(command, scratch / f"{name}.log", cap, env)
    record["command"] = " ".join([*(f"{k}={v}" for k, v in extra_env.items()), "serq",
                                  *command[len(serq_command()):]]).replace(str(scratch.parent), "$WORK")
    shutil.rmtree(run_dir, ignore_errors=True)
    return record


def baseline_rss(scratch: Path) -> int:
    """Peak RSS of a child that only imports what ``serq quantize`` imports."""
    code = "import torch, transformers, serq_ao.cli.main, serq_ao.streaming"
    return measure([sys.executable, "-c", code], scratch / "baseline.log")["peak_rss_bytes"]


def source_state() -> dict:
    """The serq_ao sources measured: git HEAD, whether serq_ao/ differs from it, and a digest
    of every serq_ao/**/*.py as it is (others may be editing it)."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for file in sorted((root / "serq_ao").rglob("*.py")):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")

    def git(*argv):
        try:
            return subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--", "serq_ao")
    return {"git_head": (git("rev-parse", "HEAD") or "").strip() or None,
            "serq_ao_differs_from_head": None if status is None else bool(status.strip()),
            "sha256": digest.hexdigest()}


def linear_fit(xs: list[float], ys: list[float]) -> dict | None:
    """Least squares ys = intercept + slope * xs, with R^2."""
    if len(xs) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    return {"intercept_s": intercept, "seconds_per_layer": slope, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def cells_of(rows: list[dict]) -> list[dict]:
    """The runs of each (depth, method, path), aggregated: peak RSS min / median / max over
    every run (a run the watchdog killed counts with the peak it had reached), median seconds
    over the runs that finished."""
    cells = []
    keys = list(dict.fromkeys((r["large"], r["depth"], r["method"], r["path"]) for r in rows))
    for large, depth, method, path in keys:
        runs = [r for r in rows if (r["large"], r["depth"], r["method"], r["path"]) == (large, depth, method, path)]
        peaks = sorted(r["peak_rss_bytes"] for r in runs)
        finished = [r for r in runs if r["returncode"] == 0]
        keys = ("depth", "params", "checkpoint_bytes", "shards", "method", "path", "large")
        cell = {key: runs[0][key] for key in keys}
        cell.update(runs=len(runs), finished=len(finished), peak_rss_min_bytes=peaks[0], peak_rss_max_bytes=peaks[-1],
                    peak_rss_median_bytes=statistics.median(peaks),
                    seconds_median=statistics.median(r["seconds"] for r in finished) if finished else None)
        if large:
            cell["within_cap"] = sum(bool(r.get("within_cap")) for r in runs)
        cells.append(cell)
    return cells


def summarize(cells: list[dict]) -> list[dict]:
    """Per method and path, over the depth sweep (not the large model): growth of the peak
    from the shallowest to the deepest model, and time vs depth."""
    out = []
    for method, path in dict.fromkeys((c["method"], c["path"]) for c in cells if not c["large"]):
        sweep = sorted((c for c in cells if not c["large"] and (c["method"], c["path"]) == (method, path)
                        and c["finished"]), key=lambda c: c["depth"])
        if len(sweep) < 2:
            continue
        first, last = sweep[0], sweep[-1]
        growth = {kind: last[f"peak_rss_{kind}_bytes"] / first[f"peak_rss_{kind}_bytes"] - 1 for kind in ("min", "max")}
        fit = linear_fit([c["depth"] for c in sweep], [c["seconds_median"] for c in sweep])
        out.append({
            "method": method, "path": path, "depths": [c["depth"] for c in sweep],
            "peak_growth_of": [first["depth"], last["depth"]],
            "peak_growth_min": growth["min"], "peak_growth_max": growth["max"],
            "peak_within_15_percent": max(growth.values()) <= 0.15,
            "peak_range_over_depths_bytes": [min(c["peak_rss_min_bytes"] for c in sweep),
                                             max(c["peak_rss_max_bytes"] for c in sweep)],
            "time_fit": fit,
            "seconds_per_layer_at_depth": {str(c["depth"]): c["seconds_median"] / c["depth"] for c in sweep},
            "marginal_seconds_per_layer": {f"{a['depth']}->{b['depth']}": (b["seconds_median"] - a["seconds_median"]) /
                                           (b["depth"] - a["depth"]) for a, b in zip(sweep, sweep[1:])},
        })
    return out


def parse_depths(text: str) -> list[int]:
    try:
        depths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"depths must be comma-separated integers, got {text!r}") from None
    if not depths or any(d < 1 for d in depths) or len(set(depths)) != len(depths):
        raise argparse.ArgumentTypeError(f"depths must be distinct positive integers, got {text!r}")
    return sorted(depths)


def parse_methods(text: str) -> list[str]:
    methods = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [m for m in methods if m not in METHOD_ARGS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise argparse.ArgumentTypeError(f"methods must be distinct ones of {', '.join(METHOD_ARGS)}, got {text!r}")
    return methods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=parse_depths, default=parse_depths("4,8,16,32"),
                        help="decoder layer counts, comma-separated (default 4,8,16,32)")
    parser.add_argument("--methods", type=parse_methods, default=parse_methods("rtn,serq,serq+gptq"),
                        help="of rtn, serq, serq+gptq (default all)")
    parser.add_argument("--in-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="also SERQ --in-memory at each depth and on the large model (default on)")
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                        help="also --control-methods streamed with MALLOC_MMAP_THRESHOLD_=33554432 (glibc) at each "
                             "depth and on the large model (default on)")
    parser.add_argument("--control-methods", type=parse_methods, default=parse_methods("serq,serq+gptq"),
                        help="methods of the control cells (default serq,serq+gptq; on the large model, those of "
                             "--large-methods)")
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=True,
                        help=f"also the large model under --cap-gb (default on, {LARGE_DEPTH} layers)")
    parser.add_argument("--large-depth", type=int, default=LARGE_DEPTH)
    parser.add_argument("--large-methods", type=parse_methods, default=parse_methods("rtn,serq"),
                        help="methods for the large model (default rtn,serq: SERQ + GPTQ's peak is over half its "
                             "checkpoint)")
    parser.add_argument("--cap-gb", type=float, default=1.4,
                        help="memory cap of the large model's runs, GB (10^9 bytes; default 1.4)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each streamed RTN and SERQ cell (default 3: their peak varies from run to run)")
    parser.add_argument("--extra-repeats", type=int, default=1,
                        help="runs of each SERQ + GPTQ, --in-memory and control cell (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of each serq child (default 1: on a loaded machine GPTQ's "
                             "column loop is several times slower with 2)")
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None,
                        help="where the synthetic models are cached (default: a temporary folder, removed after)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    return parser


def plan_cells(args) -> list[tuple[int, bool, str, str, int]]:
    """(depth, large, method, path, runs) in the order they run."""
    def runs(method, path):
        return args.repeats if path == "streamed" and method != "serq+gptq" else args.extra_repeats

    plan = []
    for depth in args.depths:
        plan += [(depth, False, m, "streamed", runs(m, "streamed")) for m in args.methods]
        if args.control:
            plan += [(depth, False, m, CONTROL, runs(m, CONTROL)) for m in args.control_methods]
        if args.in_memory:
            plan.append((depth, False, "serq", "in-memory", runs("serq", "in-memory")))
    if args.large:
        depth = args.large_depth
        plan += [(depth, True, m, "streamed", runs(m, "streamed")) for m in args.large_methods]
        if args.control:
            plan += [(depth, True, m, CONTROL, runs(m, CONTROL)) for m in args.control_methods
                     if m in args.large_methods]
        if args.in_memory:
            plan.append((depth, True, "serq", "in-memory", runs("serq", "in-memory")))
    return plan


def main(argv: list[str] | None = None) -> None:
    from serq_ao.bench import machine_info, write_json

    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.calib_windows, args.calib_seqlen, args.large_depth, args.threads, args.repeats,
           args.extra_repeats) < 1 or args.cap_gb <= 0:
        parser.error("--calib-windows, --calib-seqlen, --large-depth, --threads, --repeats, --extra-repeats and "
                     "--cap-gb must be positive")

    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="serq-scale-")) if temporary else args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    scratch = work / "runs"
    scratch.mkdir(exist_ok=True)
    started = time.perf_counter()
    load_before = os.getloadavg()
    sources_before = source_state()
    rows, facts = [], {}
    cap = Cap(int(args.cap_gb * GB)) if args.large else None
    try:
        baseline = baseline_rss(scratch)
        print(f"baseline (imports only): peak RSS {baseline / GB:.2f} GB", flush=True)
        for depth, large, method, path, runs in plan_cells(args):
            folder = work / model_name(depth, SHAPE, SEED)
            if depth not in facts:
                if not (folder / "config.json").is_file():
                    print(f"building {folder.name}", flush=True)
                    _build_in_child(folder, depth)
                facts[depth] = checkpoint_facts(folder)
            for repeat in range(runs):
                record = quantize_run(folder, method, path, args, scratch, cap if large else None, repeat)
                rows.append({"depth": depth, "params": facts[depth]["params"],
                             "checkpoint_bytes": facts[depth]["bytes"], "shards": facts[depth]["shards"],
                             "method": method, "path": path, "large": large, "repeat": repeat, **record})
                note = "" if record["returncode"] == 0 else f"  FAILED rc={record['returncode']}"
                if large:
                    note += "  within cap" if record["within_cap"] else "  NOT within cap"
                print(f"L={depth:3d} {method:9s} {path:37s} peak {record['peak_rss_bytes'] / GB:5.2f} GB "
                      f"{record['seconds']:7.1f} s{note}", flush=True)
    finally:
        if cap is not None:
            cap.close()
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started

    cells = cells_of(rows)
    large_cells = [c for c in cells if c["large"]]
    record = {
        "shape": {**SHAPE, "tie_word_embeddings": False, "dtype": "float32", "seed": SEED, "max_shard_size": "200MB"},
        "calibration": {"corpus": "wiki", "windows": args.calib_windows, "seqlen": args.calib_seqlen},
        "flags": "--no-diagnostics --quiet --json, format mxfp4 (default), device cpu",
        "child_threads": args.threads,
        "repeats": {"streamed rtn, serq": args.repeats, "serq+gptq, in-memory, control": args.extra_repeats},
        "peak_rss": "ru_maxrss of each child pid (os.wait4): the whole `serq quantize` process, start-up included",
        "seconds": "wall time of the whole command, start-up (imports, tokenizing the calibration text) included",
        "baseline_import_rss_bytes": baseline,
        "cells": cells,
        "summary": summarize(cells),
        "large": None if not large_cells else {
            "depth": args.large_depth, "checkpoint_bytes": large_cells[0]["checkpoint_bytes"],
            "cap_bytes": cap.limit, "cap_over_checkpoint": cap.limit / large_cells[0]["checkpoint_bytes"],
            "cap_mode": cap.mode,
            "cap_enforcement": cap.enforcement,
        },
        "serq_ao_sources": {**sources_before, "sha256_after": source_state()["sha256"],
                            "changed_during_run": source_state()["sha256"] != sources_before["sha256"]},
        "runs": rows,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "total_seconds": total,
        "machine": machine_info(),
        "command": " ".join(["benchmarks/scale.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    write_json(args.out, record)
    print_tables(record)
    print(f"wrote {args.out} ({total / 60:.1f} min)")


def print_tables(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    cal = record["calibration"]
    table = Table(title=f"serq quantize by depth (calibration {cal['windows']} x {cal['seqlen']} tokens; "
                        f"imports alone {record['baseline_import_rss_bytes'] / GB:.2f} GB)")
    for column in ("depth", "params", "checkpoint GB", "method", "path", "runs", "peak RSS GB min", "max",
                   "median s", "s / layer", "cap"):
        table.add_column(column, justify="right")
    large = record["large"]
    for c in record["cells"]:
        seconds = c["seconds_median"]
        cap = ""
        if c["large"]:
            cap = (f"{c['within_cap']}/{c['runs']} <= {large['cap_bytes'] / 1e9:.2f} GB "
                   f"({'enforced' if large['cap_mode'] == 'cgroup-v2' else 'measured'})")
        runs = f"{c['runs']}" if c["finished"] == c["runs"] else f"{c['runs']} ({c['runs'] - c['finished']} failed)"
        table.add_row(str(c["depth"]), f"{c['params'] / 1e6:.0f}M", f"{c['checkpoint_bytes'] / 1e9:.2f}", c["method"],
                      c["path"], runs, f"{c['peak_rss_min_bytes'] / 1e9:.2f}", f"{c['peak_rss_max_bytes'] / 1e9:.2f}",
                      "" if seconds is None else f"{seconds:.1f}",
                      "" if seconds is None else f"{seconds / c['depth']:.2f}", cap)
    console.print(table)
    fits = Table(title="over the depth sweep: peak growth, shallowest -> deepest (goal <= 15%), and time vs depth "
                       "(least squares on the median seconds)")
    for column in ("method", "path", "peak growth (min runs)", "(max runs)", "peak range GB", "s / layer (fit)",
                   "fixed s (fit)", "R^2", "s / layer at each depth"):
        fits.add_column(column, justify="right")
    for s in record["summary"]:
        fit = s["time_fit"]
        depths = f" ({s['peak_growth_of'][0]}->{s['peak_growth_of'][1]})"
        low, high = s["peak_range_over_depths_bytes"]
        fits.add_row(s["method"], s["path"], f"{s['peak_growth_min'] * 100:+.1f}%{depths}",
                     f"{s['peak_growth_max'] * 100:+.1f}%", f"{low / 1e9:.2f}-{high / 1e9:.2f}",
                     f"{fit['seconds_per_layer']:.2f}", f"{fit['intercept_s']:.1f}", f"{fit['r2']:.3f}",
                     ", ".join(f"{k}: {v:.2f}" for k, v in s["seconds_per_layer_at_depth"].items()))
    console.print(fits)
    if large:
        console.print(f"large model ({large['depth']} layers, {large['checkpoint_bytes'] / 1e9:.2f} GB): cap "
                      f"{large['cap_bytes'] / 1e9:.2f} GB = {large['cap_over_checkpoint']:.2f} of the checkpoint; "
                      f"{large['cap_enforcement']}")


if __name__ == "__main__":
    main()
