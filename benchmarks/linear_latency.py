"""Latency of one packed linear (MXFP4 r = 0, SERQ MXFP4, SERQ INT W4A8) next to fp32 and bf16 F.linear.

    .venv/bin/python benchmarks/linear_latency.py                      # CPU, all shapes, M 1,8,512, 1 and 2 threads
    .venv/bin/python benchmarks/linear_latency.py --models smollm2 --m 1 --threads 1 --repeats 2   # smoke test
    .venv/bin/python benchmarks/linear_latency.py --kernel portable    # time a forced native kernel path
    .venv/bin/python benchmarks/linear_latency.py --device cuda        # adds TFLOP/s and GB/s

For the (K, N) shapes of Llama-2-7B, Llama-3-8B and the default model, at each ``--m`` (rows per
call: 1 is decode, 512 a prefill) and each ``--threads`` (torch.set_num_threads), five
``torch.compile``d linears run side by side, timed in turns:

- ``fp32``: ``nn.Linear`` in float32, float32 input;
- ``bf16``: ``nn.Linear`` in bfloat16, bfloat16 input;
- ``mxfp4``: packed MXFP4 with r = 0 (the op ``serq::linear_mxfp4``, the same code path as serq);
- ``serq``: packed MXFP4 ``[W^q | R]`` with rank r (SERQMXFP4Tensor);
- ``int_w4a8``: packed SERQ INT W4A8 with rank r (SERQIntTensor, the op ``serq::linear_int``).

The packed linears take float32 input (on CUDA bfloat16, as the GPU kernels do) and run
through the normal packed modules, so whichever native kernel the ops dispatch to is what is
timed; the JSON records which (``serq_ao.kernels.cpu_native.kernel_info()`` where that module
exists). ``--kernel`` sets SERQ_CPU_KERNEL before serq_ao is imported, to time a forced path.

Figures of merit per cell: ``serq / mxfp4 - 1``, the price of the correction, against the
paper's budget ``r / K + 3`` percentage points; ``serq`` and ``int_w4a8`` over the faster of
fp32 and bf16 in the same cell. Medians of ``--repeats`` samples after a warm-up, each sample a
loop of calls long enough for a timer on a noisy machine. With ``--device cuda`` the device's
own bf16 matmul TFLOP/s and copy GB/s, measured in the same run, are reported next to each
linear's. Writes benchmarks/results/linear_latency_<device>.json (or ``--out``); a table last.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
# (K, N) of every distinct linear shape, and the rank SERQ uses at that width
SHAPES = {
    "llama2-7b": {"rank": 128, "shapes": [(4096, 4096), (4096, 11008), (11008, 4096)]},
    "llama3-8b": {"rank": 128, "shapes": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]},
    "smollm2": {"rank": 64, "shapes": [(576, 576), (576, 192), (576, 1536), (1536, 576)]},
}
# not run by default: one small shape for the smoke tests
TEST_SHAPES = {"tiny": {"rank": 32, "shapes": [(64, 96)]}}
COLUMNS = ("fp32", "bf16", "mxfp4", "serq", "int_w4a8")
FLOAT_COLUMNS = ("fp32", "bf16")
KERNELS = ("auto", "avx512_vnni", "avx512", "avx2", "portable", "reference")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (compiles)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int, device: str, min_sample: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each fn, timed in turns (so drift of this shared machine
    hits all alike), each sample a loop of enough calls to last ``min_sample`` seconds."""
    loops = {}
    for name, fn in fns.items():
        once = median_seconds(fn, 1, device)  # also the warm-up
        loops[name] = max(1, int(min_sample / max(once, 1e-6)))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / loops[name])
    return {name: statistics.median(times) for name, times in samples.items()}


def linears(k: int, n: int, rank: int, device: str) -> dict[str, nn.Module]:
    """The five linears of one shape, from one random weight, in :data:`COLUMNS` order."""
    from serq_ao.formats import MXFP4Format, get_format
    from serq_ao.tensor_subclass import pack_weight
    from serq_ao.quant.packing import packed_linear
    from serq_ao.quant.reconstruct import serq_reconstruct

    g = torch.Generator().manual_seed(k * 31 + n)
    weight = torch.randn(n, k, generator=g) * k**-0.5
    made = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        fp = nn.Linear(k, n, bias=False)
        fp.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        made[name] = fp.to(device)
    # the packed ops compute in fp32 on CPU; the GPU kernels take bf16
    packed_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    mxfp4, int_w4a8 = MXFP4Format(), get_format("w4a8")
    for name, fmt, r in (("mxfp4", mxfp4, 0), ("serq", mxfp4, rank), ("int_w4a8", int_w4a8, rank)):
        main, correction = serq_reconstruct(weight, r, fmt)
        packed = pack_weight(fmt, main, correction, input_scale_inv=None, input_perm=None, dtype=packed_dtype)
        made[name] = packed_linear(packed, None).to(device)
    return made


def input_dtypes(device: str) -> dict[str, torch.dtype]:
    packed = torch.bfloat16 if device == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "mxfp4": packed, "serq": packed, "int_w4a8": packed}


def device_peaks(device: str, repeats: int) -> dict:
    """The device's bf16 matmul TFLOP/s and copy GB/s, for scale."""
    if device != "cuda":
        return {}
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    matmul = median_seconds(lambda: a @ a, repeats, device)
    src = torch.empty(2**28, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy = median_seconds(lambda: dst.copy_(src), repeats, device)
    return {"bf16_matmul_tflops": 2 * 8192**3 / matmul / 1e12, "copy_gbps": 2 * src.numel() / copy / 1e9}


def native_kernel_info() -> dict:
    """Which native CPU kernel path the packed ops dispatch to, as the kernels module says."""
    try:
        from serq_ao.kernels.cpu_native import kernel_info
    except ImportError:
        return {"native": None}
    return kernel_info()


def positive_int_list(option: str):
    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"comma-separated positive integers, got {text!r}") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"comma-separated positive integers, got {text!r}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"a value given twice in {text!r}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--m", type=positive_int_list("--m"), default=[1, 8, 512],
                        help="comma-separated rows per call (1: decode; 512: a prefill); default 1,8,512")
    parser.add_argument("--threads", type=positive_int_list("--threads"), default=[1, 2],
                        help="comma-separated torch.set_num_threads values, one pass each; default 1,2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--kernel", choices=KERNELS, default=None,
                        help="set SERQ_CPU_KERNEL to this before serq_ao loads (default: the environment's)")
    parser.add_argument("--no-compile", action="store_true", help="eager modules (for debugging)")
    parser.add_argument("--out", type=Path, default=None)
    return parser


def cell_row(model: str, k: int, n: int, rank: int, m: int, threads: int, seconds: dict) -> dict:
    faster_float = min(FLOAT_COLUMNS, key=lambda name: seconds[name])
    overhead = seconds["serq"] / seconds["mxfp4"] - 1
    return {
        "model": model, "phase": "decode" if m == 1 else "prefill", "M": m, "K": k, "N": n, "rank": rank,
        "threads": threads, "seconds": seconds, "faster_float": faster_float,
        "serq_over_mxfp4": seconds["serq"] / seconds["mxfp4"],
        # over the faster of fp32 and bf16 in this cell: what a user would run instead
        "serq_over_fp": seconds["serq"] / seconds[faster_float],
        "mxfp4_over_fp": seconds["mxfp4"] / seconds[faster_float],
        "int_over_fp": seconds["int_w4a8"] / seconds[faster_float],
        "correction_budget": rank / k + 0.03,
        "within_budget": overhead <= rank / k + 0.03,
    }


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    known = {**SHAPES, **TEST_SHAPES}
    models = args.models.split(",")
    unknown = sorted(set(models) - set(known))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(SHAPES)}")
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.kernel is not None:  # read by serq_ao's kernels when they load
        os.environ["SERQ_CPU_KERNEL"] = args.kernel
    import serq_ao  # noqa: F401  (registers the ops, after SERQ_CPU_KERNEL is set)
    from serq_ao.bench import machine_info, write_json
    from serq_ao.tensor_subclass import stored_bytes

    out = args.out or RESULTS / f"linear_latency_{args.device}.json"
    peaks = device_peaks(args.device, args.repeats)
    dtypes = input_dtypes(args.device)
    rows = []
    for model in models:
        rank = known[model]["rank"]
        for k, n in known[model]["shapes"]:
            modules = linears(k, n, rank, args.device)
            for m in args.m:
                base = torch.randn(m, k, generator=torch.Generator().manual_seed(m), dtype=torch.float32)
                inputs = {name: base.to(args.device, dtypes[name]) for name in COLUMNS}
                for threads in args.threads:
                    # Inductor's CPU code fixes its OpenMP thread count when it compiles: a fresh
                    # compile per thread count, after set_num_threads
                    torch.set_num_threads(threads)
                    runs = {name: module if args.no_compile else torch.compile(module, fullgraph=True)
                            for name, module in modules.items()}
                    with torch.no_grad():
                        seconds = interleaved_medians(
                            {name: (lambda run=run, x=inputs[name]: run(x)) for name, run in runs.items()},
                            args.repeats, args.device)
                    torch._dynamo.reset()
                    row = cell_row(model, k, n, rank, m, threads, seconds)
                    if peaks:
                        flops = {name: 2 * m * (k + (rank if name in ("serq", "int_w4a8") else 0)) * n for name in seconds}
                        moved = {name: stored_bytes(modules[name].weight) + inputs[name].numel() * inputs[name].element_size()
                                 + m * n * 2 for name in seconds}
                        row["tflops"] = {name: flops[name] / seconds[name] / 1e12 for name in seconds}
                        row["gbps"] = {name: moved[name] / seconds[name] / 1e9 for name in seconds}
                    rows.append(row)
                    print(f"{model:9s} M={m:<4d} K={k:<5d} N={n:<5d} t={threads} "
                          + " ".join(f"{name} {s * 1e3:.3f}" for name, s in seconds.items())
                          + f" ms; correction +{(row['serq_over_mxfp4'] - 1) * 100:.1f}% "
                            f"(budget {100 * row['correction_budget']:.1f}%)", flush=True)

    record = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "compiled": not args.no_compile,
        "columns": {"fp32": "nn.Linear float32", "bf16": "nn.Linear bfloat16, bfloat16 input",
                    "mxfp4": "packed MXFP4, r = 0", "serq": "packed SERQ MXFP4, rank r",
                    "int_w4a8": "packed SERQ INT W4A8, rank r",
                    "packed_input": str(dtypes["serq"]).removeprefix("torch.")},
        "ratios": {"serq_over_fp": "serq / the faster of fp32 and bf16 in the cell (faster_float)",
                   "int_over_fp": "int_w4a8 / the faster of fp32 and bf16 in the cell"},
        "kernel_requested": os.environ.get("SERQ_CPU_KERNEL"),
        "native_kernel": native_kernel_info(),
        "peaks": peaks,
        "rows": rows,
        "machine": machine_info(),
        "command": " ".join(["benchmarks/linear_latency.py", *sys.argv[1:]]),
    }
    write_json(out, record)
    print_table(record)
    if peaks:
        print(f"device peaks measured in this run: bf16 matmul {peaks['bf16_matmul_tflops']:.0f} TFLOP/s, "
              f"copy {peaks['copy_gbps']:.0f} GB/s")
    print(f"native kernel: {record['native_kernel']}")
    print(f"wrote {out}")


def print_table(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    compiled = "compiled" if record["compiled"] else "eager"
    table = Table(title=f"One linear, {compiled}, on {record['device_name']}: ms per call; "
                        "x float = over the faster of fp32 and bf16")
    columns = ["model", "M", "K", "N", "r", "thr", "fp32", "bf16", "MXFP4", "SERQ", "INT W4A8",
               "SERQ/MXFP4", "budget", "SERQ x float", "INT x float"]
    if record["peaks"]:
        columns += ["SERQ TFLOP/s", "SERQ GB/s"]
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in record["rows"]:
        s = r["seconds"]
        cells = [r["model"], str(r["M"]), str(r["K"]), str(r["N"]), str(r["rank"]), str(r["threads"]),
                 *(f"{s[name] * 1e3:.3f}" for name in COLUMNS),
                 f"{r['serq_over_mxfp4']:.3f}" + ("" if r["within_budget"] else " over"),
                 f"{1 + r['correction_budget']:.3f}", f"{r['serq_over_fp']:.2f}", f"{r['int_over_fp']:.2f}"]
        if record["peaks"]:
            cells += [f"{r['tflops']['serq']:.1f}", f"{r['gbps']['serq']:.0f}"]
        table.add_row(*cells)
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
