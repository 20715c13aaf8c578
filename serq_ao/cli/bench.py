"""serq bench."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from serq_ao.cli.common import UsageError, check_positions, progress_bar, status
from serq_ao.files import strict_json


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


def cmd_bench(args: argparse.Namespace, err: Console) -> int:
    from serq_ao.bench import machine_info, time_model
    from serq_ao.models import load_model

    baseline = args.baseline
    models = {}
    with status(err, f"loading {args.model}", args.quiet):
        models[str(args.model)] = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)[0]
        if baseline == "auto":  # read once the model has loaded: its files are verified by then
            baseline = _source_of(args.model) if Path(args.model).is_dir() else None
        elif baseline == "none":
            baseline = None
        if baseline is not None:
            models[f"{baseline} (baseline)"] = load_model(baseline, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)[0]
    for model in models.values():  # the decode steps run past the prefill
        check_positions(model, "--prefill + --decode", args.prefill + args.decode)
    modes = ("eager", "compiled") if args.compile else ("eager",)
    results = {}
    with progress_bar(err, args.quiet) as progress:
        task = progress.add_task("timing", total=len(models) * len(modes) * 2)
        started = 0

        def on_step(description: str) -> None:  # called as each step starts
            nonlocal started
            progress.update(task, description=f"{current}: {description}", completed=started)
            started += 1

        for current, model in models.items():
            try:
                results[current] = time_model(model, batch=args.batch_size, prefill=args.prefill, prefill_calls=args.repeats,
                                              decode_calls=args.decode, modes=modes, on_step=on_step)
            except ValueError as e:
                raise UsageError(str(e)) from e
    names = list(results)
    ratios = []
    if len(names) == 2:
        for ours, theirs in zip(*(results[n] for n in names)):
            ratios.append({"phase": ours.phase, "mode": ours.mode, "seconds_over_baseline": ours.seconds / theirs.seconds})
    record = {
        "model": str(args.model), "baseline": baseline, "batch": args.batch_size, "prefill": args.prefill,
        "timings": {name: [t.to_dict() for t in timings] for name, timings in results.items()},
        "ratios": ratios, "machine": machine_info(),
    }
    if args.json:
        print(strict_json(record))
        return 0
    table = Table(title=f"Latency, batch {args.batch_size}, prefill {args.prefill} tokens, decode at {args.prefill}")
    for column in ("model", "phase", "mode", "ms per call", "tokens/s", "first call s", "x baseline"):
        table.add_column(column, justify="left" if column == "model" else "right")
    ratio_of = {(r["phase"], r["mode"]): r["seconds_over_baseline"] for r in ratios}
    for name, timings in results.items():
        for t in timings:
            ratio = ratio_of.get((t.phase, t.mode)) if name == names[0] and ratios else None
            table.add_row(name, t.phase, t.mode, f"{t.seconds * 1e3:.1f}", f"{t.tokens_per_second:.1f}",
                          f"{t.first_call_seconds:.1f}", "" if ratio is None else f"{ratio:.2f}")
    Console().print(table)
    machine = record["machine"]
    err.print(f"{machine['processor']}, {machine['torch_threads']} threads, torch {machine['torch']}, "
              f"serq-ao {machine['serq_ao']}", highlight=False)
    return 0
