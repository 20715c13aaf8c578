"""One linear as vLLM's CPU build runs it: its own bf16 path against serq's packed linear, side by side.

    .venv-vllm/bin/python benchmarks/vllm_linear.py                 # the default model's layers, M 1,16,64
    .venv-vllm/bin/python benchmarks/vllm_linear.py --m 16 --repeats 3   # a quick look

Runs in .venv-vllm (``make vllm-env``). For each layer of the default model as vLLM merges
them (qkv_proj, o_proj, gate_up_proj, down_proj; K x N) and each ``--m`` (rows per call: a
decode step of M requests, or a prefill):

- ``bf16``: a bfloat16 weight through vLLM's own CPU dispatch
  (``dispatch_cpu_unquantized_gemm``: oneDNN with a prepacked weight here, or whatever vLLM
  picks on this CPU), bfloat16 input;
- ``serq``: the same weight packed as SERQ MXFP4 with rank r and a saliency order, in the
  module serq's vLLM plugin serves it with (``PackedLinear``: prepacked at construction where
  the CPU path has panels), bfloat16 input, as vLLM passes it.

Medians of ``--repeats`` interleaved samples (benchmarks/linear_latency.py's timer), one thread
count (``--threads``, default 2). Writes benchmarks/results/vllm_linear_cpu.json (or ``--out``);
a table last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# the default model's linears as vLLM merges them: (name, K, N)
LAYERS = [("qkv_proj", 576, 960), ("o_proj", 576, 576), ("gate_up_proj", 576, 3072), ("down_proj", 1536, 576)]
RANK = 64


def build_parser() -> argparse.ArgumentParser:
    from linear_latency import positive_int_list

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=positive_int_list("--m"), default=[1, 16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vllm_linear_cpu.json")
    return parser


def vllm_bf16(weight):
    """vLLM's CPU linear of a bf16 weight: the callable its unquantized layers run."""
    import torch
    from torch import nn
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = nn.Module()
    layer.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return lambda x: layer.cpu_linear(x, layer.weight, None)


def serq_linear(weight):
    """serq's vLLM module for the SERQ MXFP4 packing of ``weight`` with a saliency order."""
    import torch

    from serq_ao.formats import MXFP4Format
    from serq_ao.tensor_subclass import pack_weight
    from serq_ao.integrations.vllm.linear import PackedLinear
    from serq_ao.quant.reconstruct import serq_reconstruct

    fmt = MXFP4Format()
    main, correction = serq_reconstruct(weight, RANK, fmt)
    perm = torch.randperm(weight.shape[1], generator=torch.Generator().manual_seed(1))
    packed = pack_weight(fmt, main, correction, input_scale_inv=None, input_perm=perm, dtype=torch.bfloat16)
    module = PackedLinear(packed)
    return module, module.isa is not None


def main() -> None:
    args = build_parser().parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError:
        sys.exit("vllm_linear.py: run it with .venv-vllm/bin/python (make vllm-env)")
    import torch
    from linear_latency import interleaved_medians
    from rich.console import Console
    from rich.table import Table

    from serq_ao.bench import check_json_result_path, machine_info, write_json
    from serq_ao.kernels.cpu_native import kernel_info

    check_json_result_path(args.out, "--out")  # before the run, not after it
    torch.set_num_threads(args.threads)
    rows = []
    for name, k, n in LAYERS:
        weight = torch.randn(n, k, generator=torch.Generator().manual_seed(k * 31 + n)) * k**-0.5
        bf16 = vllm_bf16(weight)
        serq, prepacked = serq_linear(weight)
        for m in args.m:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
            with torch.no_grad():
                seconds = interleaved_medians({"bf16": lambda: bf16(x), "serq": lambda: serq(x)}, args.repeats, "cpu")
            rows.append({"layer": name, "k": k, "n": n, "m": m, "rank": RANK, "prepacked": prepacked,
                         "ms": {key: value * 1e3 for key, value in seconds.items()},
                         "serq_over_bf16": seconds["serq"] / seconds["bf16"]})
            print(f"{name:13s} K={k:5d} N={n:5d} M={m:4d}  bf16 {seconds['bf16'] * 1e3:.3f} ms  "
                  f"serq {seconds['serq'] * 1e3:.3f} ms  x{rows[-1]['serq_over_bf16']:.2f}", flush=True)
    record = {"machine": {**machine_info(), "torch_threads": args.threads, "vllm": vllm.__version__},
              "kernel": kernel_info(), "repeats": args.repeats, "rows": rows}
    write_json(args.out, record)
    table = Table(title=f"One linear in vLLM's CPU build: serq MXFP4 (r = {RANK}) vs vLLM's bf16, "
                        f"{args.threads} threads, ms per call")
    for column in ("layer", "K", "N", "M", "bf16", "serq", "serq x bf16"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for r in rows:
        table.add_row(r["layer"], str(r["k"]), str(r["n"]), str(r["m"]), f"{r['ms']['bf16']:.3f}",
                      f"{r['ms']['serq']:.3f}", f"{r['serq_over_bf16']:.2f}")
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
