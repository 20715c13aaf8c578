"""vLLM's method for a quantized embedding table (``SERQConfig(embeddings="int8")``).

The table is stored as ``<embedding>.weight_qdata`` (int8, one row per token) and
``<embedding>.weight_scale`` (float32, one per row); both load through the embedding layer's
own loader (``output_dim`` 0: each tensor-parallel rank keeps its vocabulary rows, padded rows
get zeros). A lookup and a head tied to the table compute what serq's own model computes with
:class:`~serq_ao.tensor_subclass.Int8RowsTensor`: the rows ``q * scale`` in float32 then the
model's dtype, and the logits by ``serq::linear_int8_weights`` (the same kernel, so the same
numbers). A tied head shares the embedding's two tensors (:meth:`tie_weights`), one copy.
"""

from __future__ import annotations

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from serq_ao.kernels.ops import linear_int8_weights

TABLE_FIELDS = ("weight_qdata", "weight_scale")


class SERQEmbeddingMethod(QuantizeMethodBase):
    """An int8 embedding table: ``embedding()`` for the lookup, ``apply()`` for a tied head."""

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        rows = sum(output_partition_sizes)
        qdata = Parameter(torch.empty(rows, input_size_per_partition, dtype=torch.int8), requires_grad=False)
        set_weight_attrs(qdata, {"input_dim": 1, "output_dim": 0, **extra_weight_attrs})
        scale = Parameter(torch.empty(rows, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(scale, {"output_dim": 0, **extra_weight_attrs})
        layer.register_parameter("weight_qdata", qdata)
        layer.register_parameter("weight_scale", scale)
        layer.serq_dtype = params_dtype  # what a lookup returns: the model's dtype

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        rows = layer.weight_qdata[input_].float() * layer.weight_scale[input_].unsqueeze(-1)  # (..., K)
        return rows.to(layer.serq_dtype)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_int8_weights(x, layer.weight_qdata, layer.weight_scale, bias)

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module):
        if not isinstance(getattr(embed_tokens, "quant_method", None), SERQEmbeddingMethod):
            raise ValueError(f"serq: the head is tied to {type(embed_tokens).__name__}, which does not hold the int8 "
                             "table the folder stores")
        for field in TABLE_FIELDS:
            setattr(layer, field, getattr(embed_tokens, field))
        layer.serq_dtype = embed_tokens.serq_dtype
        return layer
