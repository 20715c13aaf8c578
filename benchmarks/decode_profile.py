"""Where a decode step of the default model spends its time: the linears, and everything else.

    .venv/bin/python benchmarks/decode_profile.py             # after benchmarks/model_speed.py
    .venv/bin/python benchmarks/decode_profile.py --steps 10  # a quick look

For the bf16 source model and the packed models that ``benchmarks/model_speed.py`` made (MXFP4,
without and with ``--quantize-lm-head``; run it first, or pass ``--work``), each run in bf16,
eager, with ``--threads`` threads, one after another in this process. Per model, medians of
``--steps`` calls after a warm-up:

- ``step``: one decode step, one token against a static KV cache of ``--prefill`` tokens
  (rewound each call, as ``serq bench`` does);
- ``without linears``: the same step with every ``nn.Linear`` returning a ready zero tensor:
  what the model costs apart from its linears (attention, norms, the Python of the modeling
  code), the part no linear kernel can change;
- ``linears, modules``: every linear of the model called once through its module on a one-token
  input, in model order (for packed ones: the tensor subclass's dispatch, then the op);
- ``linears, ops``: the same calls straight into the kernels (``torch.ops.serq_cpu``; a float
  head through ``F.linear``): the linears' arithmetic and memory traffic alone.

``step`` is close to ``without linears`` + ``linears, modules``; the difference between the
last two is the Python of a packed linear call. Writes benchmarks/results/decode_profile.json
(or ``--out``); a table last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m"


def build_parser() -> argparse.ArgumentParser:
    from serq_ao.cli.common import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefill", type=positive_int, default=128, help="KV cache length of the decode step")
    parser.add_argument("--steps", type=positive_int, default=30, help="timed calls of each measurement")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads")
    parser.add_argument("--calib-windows", type=positive_int, default=4,
                        help="the calibration windows model_speed.py quantized with (names its folders)")
    parser.add_argument("--work", type=Path, default=RESULTS / ".cache", help="where model_speed.py keeps its folders")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_profile.json")
    return parser


def median_ms(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def decode_step(model: nn.Module, prefill: int):
    """One decode step against a static cache of ``prefill`` tokens, as serq bench times it."""
    from serq_ao.bench import prepared_decode

    _, decode_forward, rewind, token, position = prepared_decode(model, 1, prefill)

    def step():
        rewind()
        return decode_forward(token, position)

    return step


def linear_calls(model: nn.Module, dtype: torch.dtype):
    """Every linear of the model in order, a one-token input for each, and the direct kernel call
    of each on its input (None where a packed format has none here)."""
    from serq_ao.kernels import cpu_native
    from serq_ao.tensor_subclass.serq_mxfp4_tensor import SERQMXFP4Tensor

    isa = cpu_native.selected_isa()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    inputs = [torch.randn(1, 1, m.in_features, dtype=dtype, generator=torch.Generator().manual_seed(i))
              for i, m in enumerate(linears)]
    kernels = []
    for linear, x in zip(linears, inputs):
        w = linear.weight
        if isinstance(w, SERQMXFP4Tensor) and isa is not None:
            kernels.append(lambda x=x, w=w, b=linear.bias: cpu_native.linear_mxfp4(
                x, w.qdata, w.scale, w.shape[1], w.rank, w.scale_mode, w.input_scale_inv, w.input_perm, b, w.rotation,
                isa))
        elif type(w) in (nn.Parameter, torch.Tensor):
            kernels.append(lambda x=x, w=w, b=linear.bias: F.linear(x, w, b))
        else:
            return linears, inputs, None
    return linears, inputs, kernels


def without_linears(linears: list[nn.Linear], step):
    """``step`` with every linear returning a ready zero tensor of its output's shape."""
    ready = {}

    def zero_output(self, x):
        key = (id(self), x.shape, x.dtype)
        if key not in ready:
            ready[key] = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype)
        return ready[key]

    def run():
        for linear in linears:
            linear.forward = zero_output.__get__(linear)
        try:
            return step()
        finally:
            for linear in linears:
                del linear.forward

    return run


@torch.no_grad()
def profile(name: str, model: nn.Module, args) -> dict:
    model.eval()
    step = decode_step(model, args.prefill)
    linears, inputs, kernels = linear_calls(model, torch.bfloat16)

    def modules():
        for linear, x in zip(linears, inputs):
            linear(x)

    def ops():
        for call in kernels:
            call()

    row = {"model": name, "linears": len(linears),
           "step_ms": median_ms(step, args.steps),
           "without_linears_ms": median_ms(without_linears(linears, step), args.steps),
           "linears_modules_ms": median_ms(modules, args.steps),
           "linears_ops_ms": median_ms(ops, args.steps) if kernels else None}
    print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.endswith("_ms") and v is not None),
          flush=True)
    return row


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    from serq_ao.bench import check_json_result_path, machine_info, native_kernel_info, write_json
    from serq_ao.integrations.serialization import is_quantized_folder
    from serq_ao.models import load_model

    check_json_result_path(args.out, "--out")
    folders = {f"SERQ MXFP4 packed{label}": args.work / f"{MODEL}-serq-mxfp4-{args.calib_windows}w{suffix}"
               for label, suffix in (("", ""), (" + head", "-head"))}
    for folder in folders.values():
        if not is_quantized_folder(folder):
            parser.error(f"{folder} is not a serq output folder: run benchmarks/model_speed.py first (or pass --work)")
    torch.set_num_threads(args.threads)

    rows = [profile(f"{MODEL} bfloat16", load_model(MODEL, dtype=torch.bfloat16)[0], args)]
    rows += [profile(name, load_model(folder, dtype=torch.bfloat16)[0], args) for name, folder in folders.items()]
    record = {"model": MODEL, "prefill": args.prefill, "steps": args.steps, "threads": args.threads, "rows": rows,
              "native_kernel": native_kernel_info(), "machine": machine_info(),
              "command": " ".join(["benchmarks/decode_profile.py", *sys.argv[1:]])}
    write_json(args.out, record)
    print_table(record)
    print(f"wrote {args.out}")


def print_table(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{MODEL}, bf16, decode at {record['prefill']}, {record['threads']} threads: ms per step")
    for title in ("model", "step", "without linears", "linears, modules", "linears, ops"):
        table.add_column(title, justify="left" if title == "model" else "right")
    for row in record["rows"]:
        table.add_row(row["model"], *("" if row[k] is None else f"{row[k]:.2f}" for k in
                                      ("step_ms", "without_linears_ms", "linears_modules_ms", "linears_ops_ms")))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
