"""``python -m serq_ao.passes MODEL``: print the dataflow plan of a model."""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # our output is the table; no loading bars

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from rich.console import Console

import serq_ao  # noqa: F401  (quiet torchao first)
from serq_ao.models import DEFAULT_MODEL, ModelNotFoundError, load_model
from serq_ao.passes import analyze, plan_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serq_ao.passes", description=__doc__)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model name, Hugging Face folder or .gguf file")
    parser.add_argument("--layers", type=int, default=1, help="how many decoder layers to show (0: all)")
    parser.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model, _ = load_model(args.model)
    except ModelNotFoundError as error:
        Console(stderr=True).print(f"error: {error}", highlight=False)
        return 2
    plan = analyze(model)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        Console().print(plan_table(plan, layer_limit=args.layers or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
