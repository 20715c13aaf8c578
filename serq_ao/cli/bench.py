"""serq bench: each model timed in a child process of its own (so its peak RSS is its own)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from serq_ao.cli.common import UsageError, progress_bar, status
from serq_ao.files import strict_json
from serq_ao.options import DTYPE_NAMES

BASELINE_DTYPES = ("auto", *DTYPE_NAMES)
MIB = 2**20


def dtype_list(text: str) -> list[str]:
    """``--baseline-dtypes``: comma-separated dtype names, each once."""
    names = [part.strip() for part in text.split(",")]
    wrong = [name for name in names if name not in BASELINE_DTYPES]
    if wrong or not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated dtypes of {', '.join(BASELINE_DTYPES)}, got "
                                         f"{text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a dtype given twice in {text!r}")
    return names


def _source_of(path: str) -> str | None:
    """The model a serq output folder was quantized from, if it says."""
    from serq_ao.integrations.serialization import QUANTIZATION_FILE, REPORT_FILE

    from serq_ao.models import ModelLoadError

    for name in (REPORT_FILE, QUANTIZATION_FILE):
        file = Path(path) / name
        if file.is_file():
            try:
                record = json.loads(file.read_text())
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"{file}: cannot read the source model it records ({e}); pass --baseline "
                                     "none or name the baseline model") from None
            return record.get("source") if isinstance(record, dict) else None
    return None


def _check_before_timing(name: str, args: argparse.Namespace) -> None:
    """What would stop a child, found before any model is timed: the model is there, a serq
    folder's files are whole (its weights are hashed when the child loads it), the positions
    fit."""
    from serq_ao.cli.common import check_positions
    from serq_ao.integrations.serialization import is_quantized_folder
    from serq_ao.integrations.verify import verify_files
    from serq_ao.models import load_model_config, resolve_model_folder

    folder = resolve_model_folder(name)
    if is_quantized_folder(folder):
        verify_files(folder, hash_weights=False)
    config = load_model_config(folder, trust_remote_code=args.trust_remote_code)
    check_positions(config, "--prefill + --decode", args.prefill + args.decode)


def _child_error(message: dict) -> Exception:
    """The error a child met, as the same class with the same text, so that the CLI shows it
    (one line, its exit status) as if met here."""
    module, name = message["class"].split(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return UsageError(message["error"])
    error = cls.__new__(cls, message["error"])  # not __init__: some take other arguments
    error.args = (message["error"],)
    return error


def _run_child(spec: dict, on_step) -> dict:
    """Run one model's timing in a child process (``python -m serq_ao.bench --child``) and
    return its result; its user errors are raised here as they were raised there."""
    import serq_ao

    env = dict(os.environ)
    # the child imports serq_ao from where this process did, installed or not
    package_root = str(Path(serq_ao.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "serq_ao.bench", "--child", json.dumps(spec)]
    result = error = None
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
        try:
            from serq_ao.bench import CHILD_MARK

            for line in child.stdout:
                if not line.startswith(CHILD_MARK):
                    continue
                message = json.loads(line[len(CHILD_MARK):])
                if "step" in message:
                    on_step(message["step"])
                elif "result" in message:
                    result = message["result"]
                elif "error" in message:
                    error = message
            child.wait()
        finally:
            if child.poll() is None:  # interrupted here: the child must not outlive us
                child.kill()
                child.wait()
            child.stdout.close()
        if error is not None:
            raise _child_error(error)
        if child.returncode == 130:
            raise KeyboardInterrupt
        if child.returncode != 0 or result is None:
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace").strip().splitlines()[-30:]
            raise RuntimeError(f"timing {spec['model']} ({spec['dtype']}) failed in its child process (exit status "
                               f"{child.returncode}); its stderr ends:\n" + "\n".join(tail))
    return result


def _runs(args: argparse.Namespace, baseline: str | None) -> list[dict]:
    """The processes to run, in table order: the model, then its baseline in each dtype."""
    runs = [{"label": str(args.model), "name": str(args.model), "role": "model", "dtype": args.dtype}]
    if baseline is not None:
        dtypes = args.baseline_dtypes or [args.dtype]
        for dtype in dtypes:
            label = f"{baseline} (baseline)" if len(dtypes) == 1 else f"{baseline} (baseline, {dtype})"
            runs.append({"label": label, "name": baseline, "role": "baseline", "dtype": dtype})
    return runs


def _speedups(processes: dict, results: dict, label: str, timing: dict) -> dict[str, float | None]:
    """Seconds of each float baseline (float32, bfloat16) over this timing's, same phase and mode."""
    speedups = {}
    for dtype in ("float32", "bfloat16"):
        base = next((name for name, p in processes.items() if p["role"] == "baseline" and p["dtype"] == dtype), None)
        theirs = None if base is None else next(
            (t for t in results[base] if (t["phase"], t["mode"]) == (timing["phase"], timing["mode"])), None)
        speedups[dtype] = None if theirs is None else theirs["seconds"] / timing["seconds"]
    return speedups


def cmd_bench(args: argparse.Namespace, err: Console) -> int:
    from serq_ao.bench import child_spec, machine_info

    baseline = args.baseline
    if baseline == "none" and args.baseline_dtypes:
        raise UsageError("--baseline-dtypes applies to a baseline, and --baseline is none")
    with status(err, f"checking {args.model}", args.quiet):
        _check_before_timing(args.model, args)
        if baseline == "auto":  # read once the model's files are verified
            baseline = _source_of(args.model) if Path(args.model).is_dir() else None
            if baseline is None and args.baseline_dtypes:
                raise UsageError(f"--baseline-dtypes: {args.model} records no source model to time; name one with "
                                 "--baseline")
        elif baseline == "none":
            baseline = None
        if baseline is not None:
            _check_before_timing(baseline, args)
    runs = _runs(args, baseline)
    modes = ("eager", "compiled") if args.compile else ("eager",)
    results, processes = {}, {}
    with progress_bar(err, args.quiet) as progress:
        task = progress.add_task("timing", total=len(runs) * len(modes) * 2)
        started = 0
        for run in runs:
            label = run["label"] if run["role"] == "baseline" else f"{run['label']} ({run['dtype']})"
            progress.update(task, description=f"{label}: loading", completed=started)

            def on_step(description: str, label=label) -> None:  # called as each step starts
                nonlocal started
                progress.update(task, description=f"{label}: {description}", completed=started)
                started += 1

            spec = child_spec(run["name"], dtype=run["dtype"], device=args.device,
                              trust_remote_code=args.trust_remote_code, threads=args.threads, batch=args.batch_size,
                              prefill=args.prefill, prefill_calls=args.repeats, decode_calls=args.decode,
                              modes=modes, check_positions=("--prefill + --decode", args.prefill + args.decode))
            outcome = _run_child(spec, on_step)
            results[run["label"]] = outcome.pop("timings")
            processes[run["label"]] = {"name": run["name"], "role": run["role"], "dtype_option": run["dtype"],
                                       **outcome}
    model_label = runs[0]["label"]
    ratios = []
    for label, process in processes.items():
        if process["role"] != "baseline":
            continue
        for ours, theirs in zip(results[model_label], results[label]):
            ratios.append({"phase": ours["phase"], "mode": ours["mode"], "baseline": label,
                           "baseline_dtype": process["dtype"], "seconds_over_baseline": ours["seconds"] / theirs["seconds"]})
    rows = []
    for label, timings in results.items():
        process = processes[label]
        for t in timings:
            speedups = _speedups(processes, results, label, t)
            rows.append({"model": label, "role": process["role"], "dtype": process["dtype"], "phase": t["phase"],
                         "mode": t["mode"], "seconds": t["seconds"], "tokens_per_second": t["tokens_per_second"],
                         "first_call_seconds": t["first_call_seconds"], "peak_rss_bytes": process["peak_rss_bytes"],
                         "x_faster_than_float32": speedups["float32"], "x_faster_than_bfloat16": speedups["bfloat16"]})
    record = {
        "model": str(args.model), "baseline": baseline, "batch": args.batch_size, "prefill": args.prefill,
        "decode_calls": args.decode,
        "timings": results, "processes": processes, "ratios": ratios, "rows": rows,
        "peak_rss": "VmHWM of each model's own child process, read after its timing (load and compile included)",
        "machine": machine_info(),
    }
    if args.json:
        print(strict_json(record))
        return 0
    out = Console()
    if not out.is_terminal:  # a file or pipe: rich's 80 columns would wrap every row
        out = Console(width=200)
    out.print(bench_table(record))
    machine = record["machine"]
    threads = "/".join(map(str, sorted({p["threads"] for p in processes.values()})))
    err.print(f"{machine['processor']}, torch threads {threads}, torch {machine['torch']}, serq-ao {machine['serq_ao']}; "
              f"native kernel of the model: {json.dumps(processes[model_label]['native_kernel'])}",
              highlight=False, markup=False, soft_wrap=True)
    return 0


def bench_table(record: dict, title: str | None = None) -> Table:
    """The rich table of a ``serq bench`` record (``rows``)."""
    table = Table(title=title or f"Latency, batch {record['batch']}, prefill {record['prefill']} tokens, decode at "
                                 f"{record['prefill']}; each model in its own process")
    for column in ("model", "dtype", "phase", "mode", "ms/call", "tokens/s", "first call s", "peak RSS MiB",
                   "x faster than fp32", "x faster than bf16"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in record["rows"]:
        process = record["processes"][r["model"]]
        name = process["name"] if process["role"] == "model" else f"{process['name']} (baseline)"  # dtype: its column
        table.add_row(name, r["dtype"], r["phase"], r["mode"], f"{r['seconds'] * 1e3:.1f}",
                      f"{r['tokens_per_second']:.1f}", f"{r['first_call_seconds']:.1f}",
                      f"{r['peak_rss_bytes'] / MIB:.0f}",
                      *("" if r[key] is None else f"{r[key]:.2f}" for key in ("x_faster_than_float32",
                                                                              "x_faster_than_bfloat16")))
    return table
