"""Prefill and decode tokens/s and peak RSS of the default model: fp32, bf16, packed, packed + head, llama.cpp.

    .venv/bin/python benchmarks/model_speed.py                                  # docs/packed-model.md's numbers
    .venv/bin/python benchmarks/model_speed.py --llama-python /tmp/venv-llama/bin/python   # + llama.cpp
    .venv/bin/python benchmarks/model_speed.py --prefill 16 --decode 2 --calib-windows 2   # a quick look

The default model (smollm2-135m) is quantized with ``serq quantize`` (MXFP4, the default SERQ
recipe) once as it comes and once with ``--quantize-lm-head``, into ``--work`` (default
benchmarks/results/.cache, not committed); a folder already there is reused. Then
``serq bench`` times, each model in a child process of its own: the source model in float32
and in bfloat16 and the packed model (float32, what the packed ops compute in), then the packed
model with its head. With ``--llama-python`` (the python of a virtual environment where
``llama-cpp-python`` is installed), llama.cpp times the GGUF the default model ships (Q4_1),
prefill of the same number of tokens and decode, with the same number of threads.

Prefill: ``--prefill`` random tokens, no cache, median of ``--repeats`` calls; decode: one token
against a KV cache of ``--prefill`` tokens, median of ``--decode`` calls (llama.cpp: the
cache grows from ``--prefill`` by one token per call). Ours compute the logits of every prompt
position in prefill, as ``serq bench`` does; llama.cpp only the last one's.
Writes benchmarks/results/model_speed.json (or ``--out``); a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m"
MIB = 2**20

# Runs in --llama-python's interpreter (llama_cpp, standard library): times prefill and decode
# of the GGUF; prints one JSON line.
LLAMA_SCRIPT = r"""
import json, random, statistics, sys, time
from pathlib import Path

import llama_cpp

spec = json.loads(sys.argv[1])
prefill, decode, threads = spec["prefill"], spec["decode"], spec["threads"]
llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=prefill + decode + 8, n_batch=prefill, n_ubatch=prefill,
                      n_threads=threads, n_threads_batch=threads, verbose=False)
rng = random.Random(0)
tokens = [rng.randrange(llm.n_vocab()) for _ in range(prefill)]

def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

def run_prefill():
    llm.reset()  # eval drops the cache from position n_tokens (0) on
    llm.eval(tokens)

timed(run_prefill)  # warm-up
prefill_seconds = statistics.median(timed(run_prefill) for _ in range(spec["repeats"]))
token = tokens[-1]
timed(lambda: llm.eval([token]))  # warm-up, at position prefill
decode_seconds = statistics.median(timed(lambda: llm.eval([token])) for _ in range(decode))
peak = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("VmHWM:"))
print(json.dumps({"version": llama_cpp.__version__, "prefill_seconds": prefill_seconds, "decode_seconds": decode_seconds,
                  "peak_rss_bytes": peak, "threads": threads}))
"""


def build_parser() -> argparse.ArgumentParser:
    from serq_ao.cli.common import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefill", type=positive_int, default=128, help="prompt tokens (and the decode KV cache length)")
    parser.add_argument("--decode", type=positive_int, default=32, help="decode calls to time")
    parser.add_argument("--repeats", type=positive_int, default=3, help="prefill calls to time")
    parser.add_argument("--threads", type=positive_int, default=len(os.sched_getaffinity(0)),
                        help="threads for every model, ours and llama.cpp's (default: this process's CPUs)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True)")
    parser.add_argument("--calib-windows", type=positive_int, default=32,
                        help="calibration windows of the two quantizations (speed does not depend on them)")
    parser.add_argument("--llama-python", type=Path, default=None,
                        help="python of an environment with llama-cpp-python: adds llama.cpp on the shipped GGUF")
    parser.add_argument("--work", type=Path, default=RESULTS / ".cache", help="where the quantized folders are kept")
    parser.add_argument("--out", type=Path, default=RESULTS / "model_speed.json")
    return parser


def serq_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "serq_ao.cli.main", *argv]


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a serq command; its failure ends this script with one line (serq's own is above it)."""
    print("running serq", " ".join(command[3:]), flush=True)
    ran = subprocess.run(command, cwd=ROOT, env=child_env(), **kwargs)
    if ran.returncode != 0:
        sys.exit(f"model_speed.py: serq {' '.join(command[3:])} failed (exit status {ran.returncode})")
    return ran


def quantized(work: Path, head: bool, windows: int) -> Path:
    """The default model quantized by ``serq quantize`` (default recipe), made once per setting."""
    from serq_ao.integrations.serialization import is_quantized_folder

    out = work / f"{MODEL}-serq-mxfp4-{windows}w{'-head' if head else ''}"
    if is_quantized_folder(out):  # serq bench verifies it before timing
        print(f"reusing {out}", flush=True)
        return out
    command = serq_command("quantize", MODEL, "--out", str(out), "--calib-windows", str(windows),
                           *(["--quantize-lm-head"] if head else []))
    run(command)
    return out


def bench(folder: Path, args, baseline_dtypes: str | None, dtype: str = "float32") -> dict:
    """``serq bench --json`` of ``folder`` with activations in ``dtype`` (its progress on our stderr)."""
    command = serq_command("bench", str(folder), "--dtype", dtype, "--prefill", str(args.prefill),
                           "--decode", str(args.decode), "--repeats", str(args.repeats), "--threads", str(args.threads),
                           "--json", *(["--compile"] if args.compile else []),
                           *(["--baseline-dtypes", baseline_dtypes] if baseline_dtypes else ["--baseline", "none"]))
    return json.loads(run(command, stdout=subprocess.PIPE, text=True).stdout)


def llama_cpp(args) -> dict:
    """llama.cpp's timings on the shipped GGUF, or why there are none."""
    from serq_ao.models import known_model_gguf

    if args.llama_python is None:
        return {"ran": False, "why": "not asked for (--llama-python)"}
    gguf = known_model_gguf(MODEL)
    spec = {"gguf": str(gguf), "prefill": args.prefill, "decode": args.decode, "repeats": args.repeats,
            "threads": args.threads}
    print(f"running llama.cpp ({args.llama_python}) on {gguf.name}", flush=True)
    try:
        ran = subprocess.run([str(args.llama_python), "-c", LLAMA_SCRIPT, json.dumps(spec)], capture_output=True,
                             text=True, timeout=1800)
    except OSError as e:
        return {"ran": False, "why": f"--llama-python {args.llama_python}: {e.strerror or e}"}
    if ran.returncode != 0:
        tail = ran.stderr.strip().splitlines()[-1:] or [f"exit status {ran.returncode}"]
        return {"ran": False, "why": f"--llama-python {args.llama_python}: {tail[0]}"}
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    return {"ran": True, "gguf": gguf.name, **result,
            "prefill_tokens_per_second": args.prefill / result["prefill_seconds"],
            "decode_tokens_per_second": 1 / result["decode_seconds"]}


def summary_rows(records: list[tuple[str, dict]], llama: dict, modes: tuple[str, ...]) -> list[dict]:
    """One row per model and mode: prefill and decode tokens/s, over the float32 and bfloat16
    baselines (eager llama.cpp against eager ours), peak RSS."""
    processes = {}  # name for the table -> (process record, its timings)
    for kind, record in records:
        for label, process in record["processes"].items():
            name = f"{MODEL} {process['dtype']}" if process["role"] == "baseline" else kind
            processes[name] = (process, {(t["phase"], t["mode"]): t for t in record["timings"][label]})
    baselines = {p["dtype"]: timings for p, timings in processes.values() if p["role"] == "baseline"}
    rows = []
    for mode in modes:
        for name, (process, timings) in processes.items():
            row = {"model": name, "dtype": process["dtype"], "mode": mode, "peak_rss_bytes": process["peak_rss_bytes"],
                   "threads": process["threads"]}
            for phase in ("prefill", "decode"):
                row[f"{phase}_tokens_per_second"] = timings[(phase, mode)]["tokens_per_second"]
                for dtype, base in baselines.items():
                    row[f"{phase}_x_{dtype}"] = row[f"{phase}_tokens_per_second"] / base[(phase, mode)]["tokens_per_second"]
            rows.append(row)
    if llama.get("ran"):
        row = {"model": f"llama.cpp {llama['version']}", "dtype": "Q4_1 GGUF", "mode": "llama.cpp",
               "peak_rss_bytes": llama["peak_rss_bytes"], "threads": llama["threads"]}
        for phase in ("prefill", "decode"):
            row[f"{phase}_tokens_per_second"] = llama[f"{phase}_tokens_per_second"]
            for dtype, base in baselines.items():
                row[f"{phase}_x_{dtype}"] = row[f"{phase}_tokens_per_second"] / base[(phase, "eager")]["tokens_per_second"]
        rows.append(row)
    return rows


def print_table(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{MODEL}: prefill {record['prefill']} tokens, decode at {record['prefill']}, "
                        f"{record['threads']} threads, each model in its own process")
    columns = [("model", "model"), ("dtype", "dtype"), ("mode", "mode"),
               ("prefill tok/s", "prefill_tokens_per_second"), ("decode tok/s", "decode_tokens_per_second"),
               ("prefill x fp32", "prefill_x_float32"), ("decode x fp32", "decode_x_float32"),
               ("prefill x bf16", "prefill_x_bfloat16"), ("decode x bf16", "decode_x_bfloat16"),
               ("peak RSS MiB", "peak_rss_bytes")]
    for title, _ in columns:
        table.add_column(title, justify="left" if title == "model" else "right")
    for row in record["rows"]:
        cells = []
        for _, key in columns:
            value = row.get(key)
            cells.append("" if value is None else value if isinstance(value, str) else
                         f"{value / MIB:.0f}" if key == "peak_rss_bytes" else
                         f"{value:.2f}" if "_x_" in key else f"{value:.1f}")
        table.add_row(*cells)
    Console(width=200).print(table)
    if not record["llama_cpp"].get("ran"):
        print(f"llama.cpp: not run: {record['llama_cpp']['why']}")


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.llama_python is not None and not args.llama_python.is_file():
        parser.error(f"--llama-python: {args.llama_python} is not a file")
    from serq_ao.bench import check_json_result_path, machine_info, write_json

    check_json_result_path(args.out, "--out")  # before minutes of work, not after
    args.work.mkdir(parents=True, exist_ok=True)
    packed = quantized(args.work, head=False, windows=args.calib_windows)
    packed_head = quantized(args.work, head=True, windows=args.calib_windows)
    # the packed linears compute in float32 whatever the model's dtype; the rest of the model
    # (attention, norms, a float head) runs in it, so both are timed
    records = [("SERQ MXFP4 packed", bench(packed, args, "float32,bfloat16")),
               ("SERQ MXFP4 packed, bf16 model", bench(packed, args, None, "bfloat16")),
               ("SERQ MXFP4 packed + head", bench(packed_head, args, None)),
               ("SERQ MXFP4 packed + head, bf16 model", bench(packed_head, args, None, "bfloat16"))]
    llama = llama_cpp(args)
    modes = ("eager", "compiled") if args.compile else ("eager",)
    record = {
        "model": MODEL, "prefill": args.prefill, "decode_calls": args.decode, "repeats": args.repeats,
        "threads": args.threads, "calib_windows": args.calib_windows,
        "rows": summary_rows(records, llama, modes),
        "llama_cpp": llama,
        "native_kernel": records[0][1]["processes"][str(packed)]["native_kernel"],
        "bench": {kind: bench_record for kind, bench_record in records},
        "notes": {"peak_rss": "VmHWM of each model's own process after its timing (load and compile included)",
                  "prefill": "ours: logits of every prompt position; llama.cpp: of the last one only",
                  "decode": "ours: KV cache of --prefill tokens, rewound each call; llama.cpp: grows from --prefill"},
        "machine": machine_info(),
        "command": " ".join(["benchmarks/model_speed.py", *sys.argv[1:]]),
    }
    write_json(args.out, record)
    print_table(record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
