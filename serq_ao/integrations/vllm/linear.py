"""vLLM's linear method for packed serq weights: parameters, loaders and ``apply``.

A vLLM layer may hold several checkpoint linears (``qkv_proj``: q, k, v) and, under tensor
parallelism, a part of each (:mod:`serq_ao.integrations.vllm.shards`). vLLM's loader hands
each stored field (``q_proj.weight_qdata``, ...) to the parameter of the same field with the
shard's id; the loaders below keep the fields, and once every tensor is in,
:meth:`SERQLinearMethod.process_weights_after_loading` rebuilds each checkpoint linear's packed
weight (:func:`serq_ao.tensor_subclass.flatten.build_packed`), cuts the rank's part with the
packed tensors' own slicing ops, and merges the projections into one weight where their rank,
format and pre-op agree (q, k, v of a uniform-rank folder), so that ``apply`` is one call of
serq's op (the native CPU kernel, the Triton kernels on CUDA).

A norm's folded order (the ``OutputGather`` that transformers' packed model wraps the norm
in) reaches the layer that reads the norm (:mod:`serq_ao.integrations.vllm.config` maps its
tensors there): an order alone becomes the op's own input gather (a gather moves values, so
this is exact); an order with a scale runs as the packed transformers model runs it, then
the op.

A row-parallel layer whose weight has a pre-op (o_proj's saliency order, which cannot be
folded into attention) cannot take a rank's contiguous input columns: its stored order
mixes all of them. Under tensor parallelism each rank then all-gathers the input, applies
the pre-op in float32 (:func:`~serq_ao.kernels.reference.apply_pre_op`, the values the op's
fused pre-op computes), and multiplies its own range of stored columns (the weight's column
shard, with its part of R); vLLM's all-reduce sums the ranks' outputs as for any
row-parallel layer. The cost is one all-gather of the layer's input per call.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from vllm.model_executor.layers.linear import LinearMethodBase, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.utils import set_weight_attrs

from serq_ao.integrations.vllm.shards import Shard, column_parallel_rows, qkv_rows, row_parallel_columns
from serq_ao.integrations.verify import check_order, fail_checkpoint
from serq_ao.kernels import cpu_native
from serq_ao.kernels.ops import linear_int, linear_mxfp4, padded_in_features
from serq_ao.kernels.reference import apply_pre_op
from serq_ao.passes import OutputGather
from serq_ao.tensor_subclass.common import attribute_names, compact_perm, field_names, rebuild
from serq_ao.tensor_subclass.flatten import build_packed
from serq_ao.tensor_subclass.serq_mxfp4_tensor import SERQMXFP4Tensor

from vllm.distributed import tensor_model_parallel_all_gather

GATHER_FIELDS = ("perm", "scale_inv")  # an OutputGather's buffers, stored as "<norm>.perm", ...
GATHER_PARAMETER = "serq_gather_{}"  # their parameters on the layer that reads the norm


class PackedLinear(nn.Module):
    """One packed weight's fields as buffers, multiplied by serq's op with the arguments the
    packed tensor's own ``F.linear`` passes (:mod:`serq_ao.tensor_subclass`).

    On a CPU whose native path has a prepacked GEMM, the weight's codes (and MXFP4 scales) are
    prepacked once here and replace the stored ones (the same bytes, in the kernel's order:
    :func:`serq_ao.kernels.cpu_native.prepack_weight`), and ``forward`` calls the native op
    itself: a server multiplies the same weight millions of times, and a compiled graph calls a
    C++ op with no Python in between. The outputs are bitwise the many-row kernel's on the
    stored codes."""

    def __init__(self, weight):
        super().__init__()
        self.is_mxfp4 = isinstance(weight, SERQMXFP4Tensor)
        self.out_features, self.in_features = weight.shape
        for name in attribute_names(type(weight)):
            if name not in ("shape", "dtype"):
                setattr(self, name, getattr(weight, name))
        self.rank = weight.rank
        self.isa = self._panel_isa(weight)
        fields = {name: getattr(weight, name) for name in field_names(type(weight))}
        if self.isa is not None:
            fields.update(self._prepacked(weight))
        for name, value in fields.items():
            self.register_buffer(name, value)

    def _panel_isa(self, weight) -> int | None:
        """The native path that runs this weight prepacked, or None: the op as for any packed
        weight (other devices, the reference, a path without panels, INT groups the kernels lack)."""
        if weight.qdata.device.type != "cpu":
            return None
        isa = cpu_native.selected_isa() if self.is_mxfp4 else cpu_native.int_isa(self.group_size)
        return isa if isa is not None and cpu_native.panel_columns(isa) > 1 else None

    def _prepacked(self, weight) -> dict:
        """The fields that change when prepacked: codes in panels (None: dropped), the order as int32."""
        perm = None if weight.input_perm is None else weight.input_perm.to(torch.int32)
        if self.is_mxfp4:
            kp = padded_in_features(self.in_features)  # [W^q | R] splits there
            codes = weight.qdata
            return {"qdata": None, "scale": None, "input_perm": perm,
                    "panels": cpu_native.prepack_weight(codes[:, : kp // 2], codes[:, kp // 2 :], 32, self.isa),
                    "panel_scale": cpu_native.prepack_e8m0(weight.scale, self.isa)}
        return {"qdata": None, "correction_qdata": None, "input_perm": perm,
                "panels": cpu_native.prepack_weight(weight.qdata, weight.correction_qdata, self.group_size, self.isa)}

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.isa is not None and self.is_mxfp4:
            return torch.ops.serq_cpu.linear_mxfp4_panels(
                x, self.panels, self.panel_scale, self.out_features, self.in_features, self.rank,
                self.scale_mode == "rceil", self.input_scale_inv, self.input_perm, bias, self.rotation, self.isa)
        if self.isa is not None:
            return torch.ops.serq_cpu.linear_int_panels(
                x, self.panels, self.scale, self.in_features, self.group_size, self.rank, self.activation_bits,
                self.correction_scale, self.input_scale_inv, self.input_perm, bias, self.rotation, self.isa)
        if self.is_mxfp4:
            return linear_mxfp4(x, self.qdata, self.scale, self.in_features, self.rank, self.scale_mode,
                                self.input_scale_inv, self.input_perm, bias, rotation=self.rotation)
        return linear_int(x, self.qdata, self.scale, self.in_features, self.group_size, self.activation_bits,
                          self.correction_qdata, self.correction_scale, self.input_scale_inv, self.input_perm, bias,
                          rotation=self.rotation)


class GatheredPreOp(nn.Module):
    """A row-parallel rank's input under tensor parallelism when its weight has a pre-op: the
    whole input (all-gathered), the pre-op in float32, then the rank's stored columns."""

    def __init__(self, scale_inv: torch.Tensor | None, perm: torch.Tensor | None, start: int, stop: int):
        super().__init__()
        # only this rank's stored columns are gathered: the gather of a slice of the order is
        # the slice of the whole gather; without an order, the stored columns are the input's
        if perm is None:
            perm = torch.arange(start, stop, dtype=torch.int32, device=scale_inv.device)
        else:
            perm = perm[start:stop].contiguous()
        self.register_buffer("scale_inv", scale_inv)
        self.register_buffer("perm", perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = tensor_model_parallel_all_gather(x.contiguous())  # (T, d_in / tp) -> (T, d_in)
        return apply_pre_op(x, self.scale_inv, self.perm)  # (T, stop - start), float32


class SERQLinearMethod(LinearMethodBase):
    """The method of one vLLM linear layer whose checkpoint linears are all packed.

    ``checkpoint_linears``: (shard id, checkpoint linear name, packed description) in the
    layer's output order (shard id None for a layer that is one checkpoint linear);
    ``gather``: the folded norm order it reads its input through ({"width", "buffers"}), or
    None."""

    def __init__(self, prefix: str, checkpoint_linears: list[tuple], gather: dict | None):
        self.prefix = prefix
        self.checkpoint_linears = checkpoint_linears
        self.gather = gather

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        layer.serq_loaded = {}  # shard id -> {field: tensor}, filled by the loaders
        fields = sorted({f for _, _, d in self.checkpoint_linears for f in d["fields"]})
        for field in fields:
            self._placeholder(layer, f"weight_{field}", field)
        for field in (self.gather or {}).get("buffers", []):
            self._placeholder(layer, GATHER_PARAMETER.format(field), f"gather_{field}")

    def _placeholder(self, layer, name: str, field: str) -> None:
        # the fields' shapes vary by shard and rank; each loaded tensor is kept as it comes
        # and the packed weight is built from them once all are in
        param = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        layer.register_parameter(name, param)

        def load(param, loaded_weight, shard_id=None):
            shard_id = shard_id if shard_id is not None else getattr(loaded_weight, "shard_id", None)
            layer.serq_loaded.setdefault(shard_id, {})[field] = loaded_weight.detach().to(param.device, copy=True)

        set_weight_attrs(param, {"weight_loader": load})

    def process_weights_after_loading(self, layer) -> None:
        weights = []
        for shard in self._shards(layer):
            fields = layer.serq_loaded.get(shard.shard_id, {})
            description = next(d for s, _, d in self.checkpoint_linears if s == shard.shard_id)
            missing = [f for f in description["fields"] if f not in fields]
            if missing:
                fail_checkpoint(shard.name, f"the checkpoint did not provide its {missing[0]}")
            weight = build_packed(description, fields)
            if shard.column_start is not None:
                if weight.input_perm is not None or weight.input_scale_inv is not None:
                    layer.serq_pre_op = GatheredPreOp(weight.input_scale_inv, weight.input_perm, shard.column_start,
                                                      shard.column_stop)
                    weight = rebuild(weight, input_perm=None, input_scale_inv=None)
                weight = weight.slice_columns(shard.column_start, shard.column_stop)
            weights.append(weight[shard.row_start : shard.row_stop])
        if not hasattr(layer, "serq_pre_op"):
            layer.serq_pre_op = None
        gather = self._loaded_gather(layer)
        try:  # one weight, one op call, where the projections' attributes and pre-ops agree
            weights = [torch.cat(weights)] if len(weights) > 1 else weights
        except ValueError:
            pass
        if gather is not None and gather.scale_inv is None and all(w.input_perm is None for w in weights):
            weights = [rebuild(w, input_perm=compact_perm(gather.perm)) for w in weights]
            gather = None
        layer.serq_gather = gather
        layer.serq_parts = nn.ModuleList(PackedLinear(w) for w in weights)
        for name in [n for n, _ in layer.named_parameters(recurse=False) if n.startswith(("weight_", "serq_gather_"))]:
            delattr(layer, name)
        del layer.serq_loaded

    def _loaded_gather(self, layer) -> OutputGather | None:
        if self.gather is None:
            return None
        loaded = layer.serq_loaded.get(None, {})
        values = {f: loaded.get(f"gather_{f}") for f in GATHER_FIELDS}
        for field in self.gather["buffers"]:
            if values[field] is None:
                fail_checkpoint(self.prefix, f"the checkpoint did not provide the {field} of the norm it reads")
        perm = values["perm"]
        check_order(f"{self.prefix} (the order of the norm it reads)", perm, self.gather["width"])
        return OutputGather(nn.Identity(), None if perm is None else perm.long(), values["scale_inv"])

    def _shards(self, layer) -> list[Shard]:
        """Each checkpoint linear's part on this layer and rank."""
        tp_rank, tp_size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
        shards = []
        for shard_id, name, description in self.checkpoint_linears:
            rows, columns = description["attributes"]["shape"]
            start, stop, column_start, column_stop = 0, rows, None, None
            if tp_size > 1:
                if isinstance(layer, QKVParallelLinear):
                    start, stop = qkv_rows(shard_id, layer.num_heads, layer.num_kv_heads, layer.head_size, tp_rank,
                                           layer.num_kv_head_replicas)
                elif isinstance(layer, RowParallelLinear):
                    column_start, column_stop = row_parallel_columns(columns, tp_rank, tp_size,
                                                                     split_multiple(description))
                elif not getattr(layer, "disable_tp", False) and hasattr(layer, "output_size_per_partition"):
                    start, stop = column_parallel_rows(rows, tp_rank, tp_size)
            shards.append(Shard(name, shard_id, start, stop, column_start, column_stop))
        return shards

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.serq_pre_op is not None:  # row-parallel under tensor parallelism, one part
            return layer.serq_parts[0](layer.serq_pre_op(x), bias).to(x.dtype)
        if layer.serq_gather is not None:
            x = layer.serq_gather(x)
        parts = layer.serq_parts
        if len(parts) == 1:
            return parts[0](x, bias)
        out = torch.cat([part(x) for part in parts], dim=-1)
        return out if bias is None else out + bias


def split_multiple(description: dict) -> int:
    """The column multiple a packed weight splits at: MXFP4's block or INT's group, and the
    rotation's block (the op rotates each shard's columns block by block)."""
    attributes = description["attributes"]
    block = 32 if description["class"] == SERQMXFP4Tensor.__name__ else attributes["group_size"]
    return math.lcm(block, attributes.get("rotation") or 1)

