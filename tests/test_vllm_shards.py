"""The tensor-parallel geometry of the vLLM plugin (serq_ao/integrations/vllm/shards.py), and
the packed weights' own slicing that its loaders use: a rank's shard multiplies to its part
of the unsharded linear. (The plugin itself runs in .venv-vllm: tests/test_vllm_plugin.py.)"""

import pytest
import torch

from serq_ao.formats import get_format
from serq_ao.integrations.vllm.shards import column_parallel_rows, qkv_rows, row_parallel_columns
from serq_ao.kernels.reference import apply_pre_op
from serq_ao.tensor_subclass.common import rebuild
from serq_ao.tensor_subclass import pack_weight


def test_column_parallel_rows_tile_the_output():
    assert [column_parallel_rows(768, t, 3) for t in range(3)] == [(0, 256), (256, 512), (512, 768)]
    with pytest.raises(ValueError, match="do not split over tensor_parallel_size 5"):
        column_parallel_rows(768, 0, 5)


def test_qkv_rows_replicate_kv_heads_when_ranks_outnumber_them():
    # 8 q heads, 2 kv heads, head size 64, 4 ranks: 2 q heads per rank, each kv head on 2 ranks
    assert [qkv_rows("q", 2, 1, 64, t, 2) for t in range(4)] == [(0, 128), (128, 256), (256, 384), (384, 512)]
    assert [qkv_rows("k", 2, 1, 64, t, 2) for t in range(4)] == [(0, 64), (0, 64), (64, 128), (64, 128)]
    with pytest.raises(ValueError, match="'q', 'k' or 'v'"):
        qkv_rows(0, 2, 1, 64, 0, 1)


def test_row_parallel_columns_fall_on_blocks():
    assert row_parallel_columns(256, 1, 2, 128) == (128, 256)
    with pytest.raises(ValueError, match="does not end on the packed format's 128-column blocks"):
        row_parallel_columns(384, 0, 2, 128)


def packed(fmt: str, rows: int, columns: int, rank: int, generator) -> torch.Tensor:
    """A packed weight with outlier columns, R of ``rank`` and a pre-op (scale and order)."""
    quant_format = get_format(fmt)
    weight = torch.randn(rows, columns, generator=generator)
    weight[:, :8] *= 20
    correction = quant_format.quantize_correction(0.1 * torch.randn(rows, rank, generator=generator))
    return pack_weight(quant_format, quant_format.quantize_weight(weight), correction, dtype=torch.float32,
                             input_scale_inv=torch.rand(columns, generator=generator) + 0.5,
                             input_perm=torch.randperm(columns, generator=generator))


@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8"])
def test_shards_multiply_to_the_unsharded_linear(fmt):
    """Column-parallel: a rank's rows give its rows of the output. Row-parallel with a pre-op
    (the plugin's path): the pre-op on the whole input, then each rank's stored columns, summed."""
    generator = torch.Generator().manual_seed(0)
    weight = packed(fmt, 96, 256, 64, generator)
    x = torch.randn(5, 256, generator=generator)
    x[:, 3] *= 30
    whole = torch.nn.functional.linear(x, weight)
    assert weight.rank == 64 and weight.input_perm is not None
    rows = [torch.nn.functional.linear(x, weight[a:b]) for a, b in (column_parallel_rows(96, t, 2) for t in range(2))]
    torch.testing.assert_close(torch.cat(rows, -1), whole, rtol=0, atol=0)
    x_hat = apply_pre_op(x, weight.input_scale_inv, weight.input_perm)
    bare = rebuild(weight, input_perm=None, input_scale_inv=None)
    parts = []
    for t in range(2):
        a, b = row_parallel_columns(256, t, 2, 128)
        parts.append(torch.nn.functional.linear(x_hat[:, a:b].contiguous(), bare.slice_columns(a, b)))
    scale = (x.abs() @ weight.dequantize().abs().T).max()
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=0, atol=1e-5 * float(scale))
