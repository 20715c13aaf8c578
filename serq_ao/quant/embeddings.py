"""The input embedding table, stored as ``SERQConfig.embeddings`` says (one more stage, last).

On a small model the table is a large part of the weights (SmolLM2-135M: 28 M of 135 M
parameters, half of the bytes once its linears are 4-bit), and it is often the output head
too (tied). ``embeddings="int8"`` replaces the table's weight by an
:class:`~serq_ao.tensor_subclass.Int8RowsTensor` (int8 per row, :mod:`serq_ao.formats.int8_rows`):
lookups dequantize the rows they read, and a head tied to the table keeps reading the same
tensor, so it stays tied and is stored once. A head that ``quantize_lm_head`` untied and
packed is not touched.

It runs after the decoder layers, so that every exact transform that folds into the table
(the global residual order's scales and permutation) is in the values it quantizes.
"""

from __future__ import annotations

import logging

from torch import nn

from serq_ao.options import EmbeddingFormat
from serq_ao.tensor_subclass import TABLE_TENSOR_CLASSES, Int8RowsTensor

logger = logging.getLogger(__name__)

OPTION = "embeddings"


def input_embedding_name(model: nn.Module) -> str:
    """The module name of ``model``'s input embeddings (an nn.Embedding), or a ValueError."""
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(table, nn.Embedding):
        raise ValueError(f"{OPTION}: {type(model).__name__} has no nn.Embedding input embeddings "
                         f"(get_input_embeddings() gives {type(table).__name__}); use {OPTION}='float'")
    return next(name for name, module in model.named_modules() if module is table)


def quantize_embeddings(model: nn.Module, fmt: EmbeddingFormat) -> list[str]:
    """In place: the input embedding table stored as ``fmt``; a head tied to it follows.
    Returns the names of the modules whose table was quantized ([] for ``"float"``)."""
    if fmt is EmbeddingFormat.FLOAT:
        return []
    name = input_embedding_name(model)
    table = model.get_submodule(name)
    if isinstance(table.weight, TABLE_TENSOR_CLASSES):
        raise ValueError(f"{OPTION}: {name} is quantized already")
    old = table.weight
    new = nn.Parameter(Int8RowsTensor.from_float(old.detach()), requires_grad=False)
    tied = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight is old]
    table.weight = new
    for head in tied:  # one table, two readers
        head.weight = new
    logger.info("%s: %s stored as int8 per row%s", OPTION, name, " (the tied head reads it too)" if tied else "")
    return [name]


def quantized_embedding_names(model: nn.Module) -> list[str]:
    """The modules whose weight is a quantized table (what config.json's ``packed_embeddings`` lists)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Embedding) and isinstance(module.weight, TABLE_TENSOR_CLASSES)]
