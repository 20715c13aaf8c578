"""What ``--embeddings int8`` costs in accuracy and saves in bytes, per docs/protocol.md.

    .venv/bin/python benchmarks/embedding_table.py                 # docs/usage.md's table
    .venv/bin/python benchmarks/embedding_table.py --windows 4     # a quick look (not protocol)

For the float model and each (recipe, format) row: the default model (smollm2-135m, tied
head) quantized in evaluation mode by the recipe (32 wiki calibration windows), its wiki
perplexity on ``--windows`` evaluation windows with the embedding table as the model has it,
then the same quantized model with the table stored as int8 per row
(:func:`serq_ao.quant.embeddings.quantize_embeddings`; the tied head reads it too). The table
is quantized after every transform either way, so the two columns differ by the table alone
(``tests/quant/test_embeddings.py`` checks that). Bytes: every stored tensor once, packed
linears and the int8 table at their stored size, the rest in bf16 (what vLLM serves).

Writes benchmarks/results/embedding_table.json (or ``--out``); a table last.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serq_ao  # noqa: E402,F401
from serq_ao.bench import machine_info, write_json  # noqa: E402
from serq_ao.data import calibration_batches, evaluation_windows  # noqa: E402
from serq_ao.eval import perplexity  # noqa: E402
from serq_ao.models import load_model  # noqa: E402
from serq_ao.options import EmbeddingFormat, recipe_options  # noqa: E402
from serq_ao.quant.config import SERQConfig  # noqa: E402
from serq_ao.quant.embeddings import quantize_embeddings  # noqa: E402
from serq_ao.quant.pipeline import quantize_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"
ROWS = [("fp", None), ("paper", "mxfp4"), ("rotated-gptq", "mxfp4"), ("rotated-gptq", "w4a8")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=32, help="evaluation windows (protocol: 32)")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "embedding_table.json")
    args = parser.parse_args()
    rows = []
    for recipe, fmt in ROWS:
        started = time.perf_counter()
        model, tokenizer = load_model(MODEL)
        windows = evaluation_windows(tokenizer, "wiki", args.windows)
        if recipe != "fp":
            config = SERQConfig(method="serq", format=fmt, **recipe_options(recipe, fmt))
            quantize_model(model, config, calibration_batches(tokenizer, "wiki", args.calib_windows))
        row = {"recipe": recipe, "format": fmt or "fp32"}
        for table in (EmbeddingFormat.FLOAT, EmbeddingFormat.INT8):
            quantize_embeddings(model, table)
            row[f"ppl_{table.value}"] = perplexity(model, windows).ppl
        row["seconds"] = time.perf_counter() - started
        print(row, flush=True)
        rows.append(row)
    write_json(args.out, {"model": MODEL, "windows": args.windows, "calib_windows": args.calib_windows,
                          "machine": machine_info(), "rows": rows})
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{MODEL}: the embedding table as float or int8 per row (wiki perplexity, "
                        f"{args.windows} windows)")
    for column in ("recipe", "format", "float table", "int8 table", "ratio"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["recipe"], row["format"], f"{row['ppl_float']:.2f}", f"{row['ppl_int8']:.2f}",
                      f"{row['ppl_int8'] / row['ppl_float']:.4f}")
    Console().print(table)


if __name__ == "__main__":
    main()
