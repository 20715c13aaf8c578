"""GPTQ's two sweep orders under the rotated-gptq recipe, linear by linear.

    .venv/bin/python benchmarks/gptq_order_error.py                   # MXFP4, layers 1,8,15,22,29
    .venv/bin/python benchmarks/gptq_order_error.py --format w4a8 --layers 0,1

The default model gets the recipe's exact transforms (``transform_model``: block order,
rotation plans; nothing quantized). For each linear of the chosen layers, R is taken out as
the pipeline does and GPTQ quantizes the residual in each order (``columns``: SERQ's order;
``hessian``: MR-GPTQ's static order) against the Hessian of the linear's transformed input
on the protocol's 32 wiki calibration windows. Each result's weight error D = W - (W^q + [R, 0])
is then scored on two Hessians, that calibration one and one of 32 wiki evaluation windows
(held out)::

    relative output error = tr(D H D^T) / tr(W H W^T)
    its part on R's columns = tr(D_r H_rr D_r^T) / tr(W H W^T)   (D_r: the first r columns)

and R's columns' weight error relative to the residual they hold, ||D_r|| / ||(W - [R, 0])_r||.
Inputs come from the float model (no upstream quantization), so this isolates what each order
does to one linear. Prints a table and writes benchmarks/results/gptq_order_error.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serq_ao.bench import machine_info, write_json  # noqa: E402
from serq_ao.data import calibration_batches, evaluation_windows  # noqa: E402
from serq_ao.formats.hadamard import rotate_weight  # noqa: E402
from serq_ao.kernels.reference import apply_pre_op  # noqa: E402
from serq_ao.models import load_model  # noqa: E402
from serq_ao.quant.gptq import GPTQ_ORDERS, gptq_quantize  # noqa: E402
from serq_ao.quant.pipeline import transform_model  # noqa: E402
from serq_ao.quant.recipes import recipe_config  # noqa: E402
from serq_ao.quant.reconstruct import residual_after, salient_correction  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"
WINDOWS = 32  # docs/protocol.md's calibration and evaluation window counts


@torch.no_grad()
def input_hessians(model, plans: dict, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 X^T X of each group's transformed input X (pre-op and rotation applied), per group."""
    hessians: dict[str, torch.Tensor] = {}
    first = {}
    for plan in plans.values():
        first.setdefault(plan.group.name, plan)

    def hook_for(plan):
        def hook(module, args):
            x = apply_pre_op(args[0], plan.input_scale_inv, plan.input_perm, plan.rotation)
            x = x.reshape(-1, plan.group.in_features).double()  # (tokens, d_in)
            hessians[plan.group.name] = hessians.get(plan.group.name, 0) + x.T @ x

        return hook

    handles = [model.get_submodule(p.group.linears[0]).register_forward_pre_hook(hook_for(p)) for p in first.values()]
    try:
        for window in windows:
            model(window.reshape(1, -1))
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def order_errors(weight: torch.Tensor, plan, calibration_h: torch.Tensor, held_out_h: torch.Tensor) -> dict:
    """Each order's errors (module doc) for one linear's transformed ``weight`` (d_out, d_in)."""
    fmt, rank = plan.quant_format, plan.rank
    correction = salient_correction(weight, rank, fmt) if rank else None
    residual = residual_after(weight, correction)
    w = weight.double()
    row = {}
    for order in GPTQ_ORDERS:
        quantized = gptq_quantize(residual, calibration_h.float(), fmt, order=order).dequantize().double()
        if correction is not None:
            quantized[:, :rank] += correction.dequantize().double()
        d = w - quantized  # (d_out, d_in)
        scores = {}
        for which, h in (("calibration", calibration_h), ("held_out", held_out_h)):
            norm = float(((w @ h) * w).sum())
            scores[which] = float(((d @ h) * d).sum()) / norm
            scores[f"{which}_r_columns"] = float(((d[:, :rank] @ h[:rank, :rank]) * d[:, :rank]).sum()) / norm
        held = residual[:, :rank].double().norm()
        scores["r_columns_weight_error"] = float(d[:, :rank].norm() / held) if rank and held > 0 else 0.0
        row[order] = scores
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="mxfp4", choices=["mxfp4", "w4a8", "w4a4"])
    parser.add_argument("--layers", default="1,8,15,22,29", help="decoder layer indices, comma-separated")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = [int(i) for i in args.layers.split(",")]

    model, tokenizer = load_model(MODEL)
    config = recipe_config("rotated-gptq", format=args.format, rank=args.rank)
    calibration = calibration_batches(tokenizer, "wiki", WINDOWS)
    plans = transform_model(model, config, calibration)
    chosen = {name: plan for name, plan in plans.items() if any(f".layers.{i}." in name for i in layers)}
    if not chosen:
        parser.error(f"--layers {args.layers}: no quantized linear in those layers")
    calibration_h = input_hessians(model, chosen, calibration)
    held_out_h = input_hessians(model, chosen, evaluation_windows(tokenizer, "wiki", WINDOWS))

    rows = {}
    for name, plan in chosen.items():
        weight = rotate_weight(model.get_submodule(name).weight.detach().float(), plan.rotation)
        rows[name] = order_errors(weight, plan, calibration_h[plan.group.name], held_out_h[plan.group.name])
        print(name, {o: round(r["held_out"], 6) for o, r in rows[name].items()}, flush=True)

    keys = ("calibration", "calibration_r_columns", "held_out", "held_out_r_columns", "r_columns_weight_error")
    totals = {order: {k: sum(r[order][k] for r in rows.values()) / len(rows) for k in keys} for order in GPTQ_ORDERS}
    print(f"\nmean over {len(rows)} linears ({args.format}, layers {args.layers}, r = {args.rank})")
    print("| order | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for order, total in totals.items():
        print(f"| {order} | " + " | ".join(f"{total[k]:.6f}" for k in keys) + " |")
    lower = sum(r["hessian"]["held_out"] < r["columns"]["held_out"] for r in rows.values())
    print(f"held-out output error lower with the static order in {lower} of {len(rows)} linears")
    write_json(RESULTS / f"gptq_order_error_{args.format}.json",
               {"model": MODEL, "format": args.format, "layers": layers, "rank": args.rank, "windows": WINDOWS,
                "config": config.to_dict(), "mean": totals, "linears": rows, "machine": machine_info()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
