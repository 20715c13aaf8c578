"""One global channel order for the residual stream (the hidden dimension).

Permuting the hidden dimension of every tensor on the residual stream by the same order P
changes no output, provided every parameter indexed by it is permuted too: embeddings
(columns), norms on the stream and between a branch and its residual add (weights, biases),
linears that write into the stream (rows), linears that read it through a norm (columns),
the final norm and lm_head (columns; nothing more when it is tied to the embedding). After
that, every norm-fed group already sees its input in order P and needs no gather.

Per decoder layer the stream is found in the exported graph: the chain of adds from the
layer input to its output. Each add's other operand is a branch, walked back through
norm-like ops (multiplication by a parameter or a per-token statistic, layer_norm, rms_norm)
to the linear that writes it. Forward from the stream, norm-like ops lead to the linears
that read it. Anything else makes the layer unsupported, and the order is refused before any
weight changes. The result is also checked numerically on the model.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import fx, nn

from serq_ao.passes.analysis import TRANSPARENT, LayerGraph, _keeps_channels, _val
from serq_ao.passes.trace import (
    capture_layer_inputs,
    example_input_ids,
    export_layer,
    find_decoder_layers,
    structure_signature,
)

logger = logging.getLogger(__name__)
aten = torch.ops.aten

ELEMENTWISE = {
    aten.pow.Tensor_Scalar,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.neg.default,
    aten.rsqrt.default,
    aten.sqrt.default,
}
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.var.correction, aten.amax.default}
NORMS = {aten.layer_norm.default, aten.rms_norm.default}


class ResidualOrderError(ValueError):
    """The model's residual stream has a structure we cannot permute exactly."""


@dataclasses.dataclass(frozen=True)
class ResidualPlan:
    """Everything indexed by the hidden dimension, by role. Names are model-wide."""

    width: int
    readers: tuple[str, ...]  # linears whose columns (input channels) are the stream
    writers: tuple[str, ...]  # linears whose rows (output channels) are the stream
    vectors: tuple[str, ...]  # 1-D parameters (norm weights and biases) along the stream
    embeddings: tuple[str, ...]  # nn.Embedding modules (columns)


class _LayerStream:
    """Residual-stream roles inside one exported layer (names relative to the layer)."""

    def __init__(self, program: torch.export.ExportedProgram, layer: nn.Module, width: int):
        self.lg = LayerGraph(program, layer)
        self.width = width
        self.readers: set[str] = set()
        self.writers: set[str] = set()
        self.vectors: set[str] = set()
        self._analyse()

    def _fail(self, node: fx.Node, why: str):
        raise ResidualOrderError(f"{type(self.lg.layer).__name__}: {why} at {node.name} ({node.target})")

    def _vector(self, node) -> bool:
        """Record a (d,) parameter, or (w + c) of one; False if ``node`` is neither."""
        inner = node
        while isinstance(inner, fx.Node) and inner.target in TRANSPARENT:
            inner = inner.args[0]
        if isinstance(inner, fx.Node) and inner.target == aten.add.Tensor:
            tensors = [a for a in inner.args if isinstance(a, fx.Node)]
            if len(tensors) != 1:
                return False
            inner = tensors[0]
            while inner.target in TRANSPARENT:
                inner = inner.args[0]
        name = self.lg.parameter(inner) if isinstance(inner, fx.Node) else None
        if name is None or tuple(self.lg.layer.get_parameter(name).shape) != (self.width,):
            return False
        self.vectors.add(name)
        return True

    def _per_token(self, node) -> bool:
        value = _val(node)
        return not isinstance(node, fx.Node) or (value is not None and value.shape[-1] == 1)

    def _branch(self, node: fx.Node) -> None:
        """Walk a branch back from its residual add to the linear that writes it."""
        while True:
            if node.target in TRANSPARENT:
                if not _keeps_channels(node, self.width):
                    self._fail(node, "branch output changes the channel layout")
                node = node.args[0]
            elif node.target == aten.linear.default:
                name = self.lg.linear_name(node)
                if name is None:
                    self._fail(node, "branch written by a linear that is not an nn.Linear")
                self.writers.add(name)
                return
            elif node.target in NORMS:
                for arg in node.args[2:4]:
                    if isinstance(arg, fx.Node) and not self._vector(arg):
                        self._fail(node, "norm with a parameter that is not a hidden-size vector")
                node = node.args[0]
            elif node.target == aten.mul.Tensor:
                data = [a for a in node.args if isinstance(a, fx.Node) and not self._per_token(a) and not self._is_vector_like(a)]
                others = [a for a in node.args if a not in data]
                if len(data) != 1 or not all(self._per_token(a) or self._vector(a) for a in others):
                    self._fail(node, "branch multiplied by something other than a norm weight or statistic")
                node = data[0]
            else:
                self._fail(node, "branch is not a (normed) linear output")

    def _is_vector_like(self, node: fx.Node) -> bool:
        value = _val(node)
        return value is not None and value.dim() == 1

    def _analyse(self) -> None:
        graph = self.lg.graph
        user_inputs = [n for n in graph.nodes if n.op == "placeholder" and n.name not in self.lg.parameter_of]
        stream: set[fx.Node] = {user_inputs[0]}  # the layer's hidden_states
        statistics: set[fx.Node] = set()
        for node in graph.nodes:
            if node.op != "call_function" or node.target == aten._assert_tensor_metadata.default:
                continue
            inputs = [a for a in node.args if isinstance(a, fx.Node)]
            on_stream = [a for a in inputs if a in stream]
            if not on_stream:
                if any(a in statistics for a in inputs) and node.target in ELEMENTWISE:
                    statistics.add(node)
                continue
            if node.target in TRANSPARENT:
                if node.args[0] not in stream:  # e.g. type_as(x, stream): only dtype is read
                    continue
                if not _keeps_channels(node, self.width):
                    self._fail(node, "the residual stream is reshaped")
                stream.add(node)
            elif node.target in REDUCTIONS:
                dims = node.args[1] if len(node.args) > 1 else None
                if not dims or any(d % _val(node.args[0]).dim() != _val(node.args[0]).dim() - 1 for d in dims):
                    self._fail(node, "a reduction over something other than the hidden dimension")
                statistics.add(node)
            elif node.target == aten.linear.default:
                name = self.lg.linear_name(node)
                if name is None or node.args[0] not in stream:
                    self._fail(node, "the stream is read by a linear that is not an nn.Linear")
                self.readers.add(name)
            elif node.target in NORMS:
                for arg in node.args[2:4]:
                    if isinstance(arg, fx.Node) and not self._vector(arg):
                        self._fail(node, "norm with a parameter that is not a hidden-size vector")
                stream.add(node)
            elif node.target in (aten.add.Tensor, aten.sub.Tensor) and len(inputs) == 2 and len(on_stream) == 1 and not self._per_token(next(a for a in inputs if a not in stream)):
                self._branch(next(a for a in inputs if a not in stream))  # the residual add
                stream.add(node)
            elif node.target in ELEMENTWISE:
                others = [a for a in inputs if a not in stream]
                if not all(a in statistics or self._per_token(a) or self._vector(a) for a in others):
                    self._fail(node, "the stream is combined with a tensor that is not a norm weight or statistic")
                stream.add(node)
            else:
                self._fail(node, "unsupported operation on the residual stream")
        output = next(n for n in graph.nodes if n.op == "output")
        result = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
        if result not in stream:
            self._fail(output, "the layer output is not on the residual stream")


def _final_norm_and_head(model: nn.Module, layers_name: str, layers: nn.ModuleList, input_ids) -> tuple[str, str]:
    """The module that reads the last layer's output (the final norm), and the one reading its output."""
    outputs: dict[str, torch.Tensor] = {}
    readers_of: dict[str, list[str]] = {}

    def record_output(name):
        def hook(module, args, output):
            outputs[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def record_reader(name):
        def hook(module, args):
            read = args[0] if args and isinstance(args[0], torch.Tensor) else None
            for source_name, tensor in outputs.items():
                # the head may read a view (CausalLM heads slice the positions to keep)
                if read is not None and (read is tensor or read._base is tensor):
                    readers_of.setdefault(source_name, []).append(name)

        return hook

    last = f"{layers_name}.{len(layers) - 1}"
    handles = [layers[-1].register_forward_hook(record_output(last))]
    for name, module in model.named_modules():
        if name and name != layers_name and not name.startswith(layers_name + "."):
            handles.append(module.register_forward_pre_hook(record_reader(name)))
            handles.append(module.register_forward_hook(record_output(name)))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    logger.debug("readers after the decoder layers: %s", readers_of)
    norms = readers_of.get(last, [])
    heads = readers_of.get(norms[0], []) if len(norms) == 1 else []
    if len(norms) != 1 or len(heads) != 1:
        raise ResidualOrderError("could not find one final norm and one output head after the decoder layers")
    return norms[0], heads[0]


@torch.no_grad()
def analyze_residual(model: nn.Module, input_ids: torch.Tensor | None = None) -> ResidualPlan:
    """Find everything indexed by the residual stream; ResidualOrderError if not exact."""
    layers_name, layers = find_decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, input_ids)
    width = inputs[0][0][0].shape[-1]
    readers, writers, vectors = set(), set(), set()
    analysed: dict[tuple, _LayerStream] = {}
    for index, layer in enumerate(layers):
        signature = structure_signature(layer)
        if signature not in analysed:
            analysed[signature] = _LayerStream(export_layer(layer, inputs[index]), layer, width)
        stream, prefix = analysed[signature], f"{layers_name}.{index}."
        readers |= {prefix + n for n in stream.readers}
        writers |= {prefix + n for n in stream.writers}
        vectors |= {prefix + n for n in stream.vectors}
    ids = example_input_ids(model) if input_ids is None else input_ids
    norm, head = _final_norm_and_head(model, layers_name, layers, ids)
    for name, param in model.get_submodule(norm).named_parameters():
        if tuple(param.shape) != (width,):
            raise ResidualOrderError(f"final norm {norm} has a parameter {name} that is not a hidden-size vector")
        vectors.add(f"{norm}.{name}")
    embeddings = tuple(
        name for name, m in model.named_modules() if isinstance(m, nn.Embedding) and m.embedding_dim == width
    )
    head_module = model.get_submodule(head)
    if not isinstance(head_module, nn.Linear):
        raise ResidualOrderError(f"the output head {head} is not an nn.Linear")
    if not any(head_module.weight is model.get_submodule(e).weight for e in embeddings):
        readers.add(head)
    return ResidualPlan(width, tuple(sorted(readers)), tuple(sorted(writers)), tuple(sorted(vectors)), embeddings)


@torch.no_grad()
def apply_residual_order(model: nn.Module, plan: ResidualPlan, order: torch.Tensor, *, check: bool = True) -> None:
    """Permute the hidden dimension of ``model`` by ``order`` in place; outputs unchanged.

    With ``check`` (default) the logits on a short example are compared before and after,
    and a mismatch raises (the model is then left permuted: reload it).
    """
    if tuple(order.shape) != (plan.width,) or not torch.equal(order.sort().values, torch.arange(plan.width)):
        raise ValueError(f"order must be a permutation of range({plan.width})")
    if check:
        ids = example_input_ids(model)
        reference = model(input_ids=ids, use_cache=False).logits
    seen: set[int] = set()

    def permute(param: torch.Tensor, dim: int) -> None:
        if id(param) in seen:  # tied weights: once is enough
            return
        seen.add(id(param))
        param.data = param.data.index_select(dim, order.to(param.device)).contiguous()

    for name in plan.embeddings:
        permute(model.get_submodule(name).weight, 1)
    for name in plan.readers:
        permute(model.get_submodule(name).weight, 1)
    for name in plan.writers:
        linear = model.get_submodule(name)
        permute(linear.weight, 0)
        if linear.bias is not None:
            permute(linear.bias, 0)
    for name in plan.vectors:
        permute(model.get_parameter(name), 0)
    if check:
        got = model(input_ids=ids, use_cache=False).logits
        error = ((got - reference).abs().max() / reference.abs().max()).item()
        if error > 1e-4:
            raise ResidualOrderError(f"the residual order changed the logits (relative error {error:.2e}); reload the model")
