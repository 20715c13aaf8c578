"""Latency of one compiled SERQ linear vs the same MXFP4 linear without correction vs FP.

    .venv/bin/python benchmarks/linear_latency.py                      # CPU, all shapes
    .venv/bin/python benchmarks/linear_latency.py --models smollm2 --repeats 5
    .venv/bin/python benchmarks/linear_latency.py --device cuda        # adds TFLOP/s and GB/s

For the (K, N) shapes of Llama-2-7B, Llama-3-8B and the default model, at decode (M = 1) and
prefill (M = ``--prefill-m``) sizes, three ``torch.compile``d linears run side by side:

- ``serq``: packed ``[W^q | R]`` with rank r (SERQMXFP4Tensor, the op ``serq::linear_mxfp4``);
- ``mxfp4``: the same packed weight type with r = 0, the same op and code path;
- ``fp``: ``nn.Linear`` in float32 (bf16 on CUDA).

The figure of merit is ``serq / mxfp4 - 1``, the price of the correction; the paper's claim,
checked per shape, is that it stays within ``r / K + 3`` percentage points (the extra columns
cost their share and nothing more). Medians of ``--repeats`` samples after a warm-up, the three linears timed in turns, each
sample long enough (a loop of calls) for a timer on a noisy machine. With
``--device cuda`` the device's own bf16 matmul TFLOP/s and copy GB/s, measured in the same
run, are reported next to each linear's. Writes benchmarks/results/linear_latency.json
(or ``--out``); a table last.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serq_ao  # noqa: E402
from serq_ao.bench import machine_info, write_json  # noqa: E402
from serq_ao.formats import MXFP4Format  # noqa: E402
from serq_ao.quant.packing import packed_linear  # noqa: E402
from serq_ao.quant.reconstruct import serq_reconstruct  # noqa: E402
from serq_ao.tensor_subclass import stored_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (K, N) of every distinct linear shape, and the rank SERQ uses at that width
SHAPES = {
    "llama2-7b": {"rank": 128, "shapes": [(4096, 4096), (4096, 11008), (11008, 4096)]},
    "llama3-8b": {"rank": 128, "shapes": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]},
    "smollm2": {"rank": 64, "shapes": [(576, 576), (576, 192), (576, 1536), (1536, 576)]},
}


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


MXFP4 = MXFP4Format()


def linears(k: int, n: int, rank: int, device: str) -> dict[str, nn.Module]:
    g = torch.Generator().manual_seed(k * 31 + n)
    weight = torch.randn(n, k, generator=g) * k**-0.5
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    fp = nn.Linear(k, n, bias=False)
    fp.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    made = {"fp": fp.to(device)}
    for name, r in (("mxfp4", 0), ("serq", rank)):
        main, correction = serq_reconstruct(weight, r, MXFP4)
        packed = MXFP4.pack(main, correction, input_scale_inv=None, input_perm=None, dtype=dtype)
        made[name] = packed_linear(packed, None).to(device)
    return made


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--prefill-m", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-compile", action="store_true", help="eager modules (for debugging)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    models = args.models.split(",")
    unknown = sorted(set(models) - set(SHAPES))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(SHAPES)}")
    if args.prefill_m < 1 or args.repeats < 1:
        parser.error("--prefill-m and --repeats must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    out = args.out or RESULTS / f"linear_latency_{args.device}.json"

    peaks = device_peaks(args.device, args.repeats)
    rows = []
    for model in models:
        rank = SHAPES[model]["rank"]
        for k, n in SHAPES[model]["shapes"]:
            modules = linears(k, n, rank, args.device)
            for phase, m in (("decode", 1), ("prefill", args.prefill_m)):
                dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m), dtype=torch.float32).to(args.device, dtype)
                runs = {name: module if args.no_compile else torch.compile(module, fullgraph=True)
                        for name, module in modules.items()}
                with torch.no_grad():
                    seconds = interleaved_medians({name: (lambda run=run: run(x)) for name, run in runs.items()},
                                                  args.repeats, args.device)
                torch._dynamo.reset()
                overhead = seconds["serq"] / seconds["mxfp4"] - 1
                row = {
                    "model": model, "phase": phase, "M": m, "K": k, "N": n, "rank": rank,
                    "seconds": seconds,
                    "serq_over_mxfp4": seconds["serq"] / seconds["mxfp4"],
                    "serq_over_fp": seconds["serq"] / seconds["fp"],
                    "mxfp4_over_fp": seconds["mxfp4"] / seconds["fp"],
                    "correction_budget": rank / k + 0.03,
                    "within_budget": overhead <= rank / k + 0.03,
                }
                if peaks:
                    flops = {name: 2 * m * (k + (rank if name == "serq" else 0)) * n for name in seconds}
                    moved = {name: stored_bytes(modules[name].weight) + x.numel() * x.element_size() + m * n * 2 for name in seconds}
                    row["tflops"] = {name: flops[name] / seconds[name] / 1e12 for name in seconds}
                    row["gbps"] = {name: moved[name] / seconds[name] / 1e9 for name in seconds}
                rows.append(row)
                print(f"{model:10s} {phase:7s} M={m:<4d} K={k:<5d} N={n:<5d} "
                      + "  ".join(f"{name} {s * 1e3:8.3f} ms" for name, s in seconds.items())
                      + f"  correction +{overhead * 100:.1f}% (budget {100 * (rank / k + 0.03):.1f}%)", flush=True)

    record = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "compiled": not args.no_compile,
        "peaks": peaks,
        "rows": rows,
        "machine": machine_info(),
        "command": " ".join(["benchmarks/linear_latency.py", *sys.argv[1:]]),
    }
    write_json(out, record)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"One linear, compiled, on {record['device_name']}: SERQ vs MXFP4-only (r = 0) vs FP")
    columns = ["model", "phase", "M", "K", "N", "r", "FP ms", "MXFP4 ms", "SERQ ms", "SERQ / MXFP4", "budget", "SERQ / FP"]
    if peaks:
        columns += ["SERQ TFLOP/s", "SERQ GB/s"]
    for column in columns:
        table.add_column(column, justify="right")
    for r in rows:
        s = r["seconds"]
        cells = [r["model"], r["phase"], str(r["M"]), str(r["K"]), str(r["N"]), str(r["rank"]),
                 f"{s['fp'] * 1e3:.3f}", f"{s['mxfp4'] * 1e3:.3f}", f"{s['serq'] * 1e3:.3f}",
                 f"{r['serq_over_mxfp4']:.3f}" + ("" if r["within_budget"] else " (over)"),
                 f"{1 + r['correction_budget']:.3f}", f"{r['serq_over_fp']:.2f}"]
        if peaks:
            cells += [f"{r['tflops']['serq']:.1f}", f"{r['gbps']['serq']:.0f}"]
        table.add_row(*cells)
    Console(width=220).print(table)
    if peaks:
        print(f"device peaks measured in this run: bf16 matmul {peaks['bf16_matmul_tflops']:.0f} TFLOP/s, copy {peaks['copy_gbps']:.0f} GB/s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
