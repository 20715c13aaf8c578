"""Which part of a checkpoint linear one vLLM layer holds: merged projections and tensor-parallel
shards of packed weights, as plain functions of the layer's geometry (no vLLM import).

vLLM builds one layer for projections that read the same input (``qkv_proj`` for q, k, v;
``gate_up_proj`` for gate, up) and splits layers across tensor-parallel ranks:

- column-parallel (``ColumnParallelLinear`` and its merged forms): each rank holds a range of
  output rows of every projection. A packed weight's rows are independent (codes, scales and
  R's rows are per output channel), so a row range is a plain slice, and the pre-op (input
  side) is shared. QKV: rank ``t`` holds q heads ``t * heads ...``; k and v heads are
  replicated ``num_kv_head_replicas`` times when there are fewer kv heads than ranks.
- row-parallel (``RowParallelLinear``): each rank holds a range of input columns and the
  ranks' outputs are summed. A packed weight splits at block or group boundaries, each
  shard carrying its part of R (:meth:`slice_columns`). A weight whose pre-op gathers its
  input by a saliency order cannot be split: a rank's input columns are contiguous in the
  original order, not in the stored one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """A checkpoint linear's part held by one vLLM layer on one rank: output rows
    [row_start, row_stop) and input columns [column_start, column_stop) (None: all)."""

    name: str  # the checkpoint linear (q_proj's name for qkv_proj's "q" shard)
    shard_id: str | int | None  # the id vLLM's loader passes with its tensors
    row_start: int
    row_stop: int
    column_start: int | None = None
    column_stop: int | None = None


def column_parallel_rows(out_features: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Rows of one rank of a column-parallel split of ``out_features`` rows."""
    if out_features % tp_size:
        raise ValueError(f"{out_features} output rows do not split over tensor_parallel_size {tp_size}")
    size = out_features // tp_size
    return tp_rank * size, (tp_rank + 1) * size


def qkv_rows(shard_id: str, num_heads: int, num_kv_heads: int, head_size: int, tp_rank: int,
             num_kv_head_replicas: int) -> tuple[int, int]:
    """Rows of q, k or v held by rank ``tp_rank`` of a QKV layer; ``num_heads`` and
    ``num_kv_heads`` are the heads per rank (vLLM's ``QKVParallelLinear`` attributes)."""
    if shard_id == "q":
        size, index = num_heads * head_size, tp_rank
    elif shard_id in ("k", "v"):
        size, index = num_kv_heads * head_size, tp_rank // num_kv_head_replicas
    else:
        raise ValueError(f"a QKV shard id is 'q', 'k' or 'v', got {shard_id!r}")
    return index * size, (index + 1) * size


def row_parallel_columns(in_features: int, tp_rank: int, tp_size: int, multiple: int) -> tuple[int, int]:
    """Input columns of one rank of a row-parallel split, which must fall on the format's
    block (MXFP4: 32) or group (INT: 128) boundaries."""
    if in_features % tp_size:
        raise ValueError(f"{in_features} input columns do not split over tensor_parallel_size {tp_size}")
    size = in_features // tp_size
    if size % multiple:
        raise ValueError(f"a shard of {size} input columns (tensor_parallel_size {tp_size}) does not end on the "
                         f"packed format's {multiple}-column blocks")
    return tp_rank * size, (tp_rank + 1) * size
