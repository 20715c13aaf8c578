"""Graph analysis of one exported decoder layer: linear groups and their producers.

We recognise only patterns whose folds are exact, and check that every tensor we would
change has no other reader; anything else is an :class:`UnknownProducer`, whose transform
stays a pre-op, which is always exact. The equality tests in tests/passes are the proof.

"Transparent" ops move elements without changing them (views, dtype casts, eval dropout).
Walking through them with ``keep_channels`` also requires that the last dimension (the
channel a linear reads) is the same on both sides, so channel j stays channel j.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx, nn

from serq_ao.passes.plan import (
    ActivationProducer,
    AttentionProducer,
    GatedProducer,
    LinearGroup,
    NormProducer,
    Producer,
    RowRange,
    UnknownProducer,
)
from serq_ao.passes.trace import LayerInputs, export_layer

logger = logging.getLogger(__name__)
aten = torch.ops.aten

TRANSPARENT = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.type_as.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.expand.default,
    aten.flatten.using_ints,
    aten.dropout.default,  # exported in eval mode: identity
}
IGNORED_USERS = {aten._assert_tensor_metadata.default}
GATE_ACTIVATIONS = {
    aten.silu.default: "silu",
    aten.gelu.default: "gelu",
    aten.relu.default: "relu",
    aten.sigmoid.default: "sigmoid",
    aten.tanh.default: "tanh",
}
# act(a * x) = a * act(x) for a > 0: scales fold through these too.
HOMOGENEOUS_ACTIVATIONS = {aten.relu.default: "relu"}
ATTENTION_OPS = {aten.scaled_dot_product_attention.default: 2, aten.matmul.default: 1, aten.bmm.default: 1}


def _val(node) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _keeps_channels(node: fx.Node, width: int) -> bool:
    """True if ``node`` (transparent) leaves the last dimension, of size ``width``, in place."""
    value, source = _val(node), _val(node.args[0])
    if value is None or source is None or value.shape[-1] != width or source.shape[-1] != width:
        return False
    if node.target == aten.transpose.int:
        last = value.dim() - 1
        return all(d % value.dim() != last for d in node.args[1:3])
    if node.target == aten.permute.default:
        return list(node.args[1])[-1] % value.dim() == value.dim() - 1
    return True


def source(node: fx.Node, width: int | None = None) -> fx.Node:
    """Walk back through transparent ops (channel-keeping ones when ``width`` is given)."""
    while (
        isinstance(node, fx.Node)
        and node.target in TRANSPARENT
        and (width is None or _keeps_channels(node, width))
    ):
        node = node.args[0]
    return node


def readers(node: fx.Node, width: int | None = None) -> set[fx.Node]:
    """The first non-transparent users of ``node`` (through channel-keeping ops if ``width``)."""
    found: set[fx.Node] = set()
    for user in node.users:
        if user.target in IGNORED_USERS:
            continue
        if user.target in TRANSPARENT and user.args[0] is node and (width is None or _keeps_channels(user, width)):
            found |= readers(user, width)
        else:
            found.add(user)
    return found


class LayerGraph:
    """An exported layer with helpers to name its parameters and linears."""

    def __init__(self, program: torch.export.ExportedProgram, layer: nn.Module):
        self.graph = program.graph
        self.layer = layer
        self.parameter_of = dict(program.graph_signature.inputs_to_parameters)

    def parameter(self, node) -> str | None:
        node = source(node) if isinstance(node, fx.Node) else node
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.parameter_of.get(node.name)
        return None

    def linear_name(self, node: fx.Node) -> str | None:
        """Module name of an ``aten.linear`` node whose weight is an nn.Linear's, else None."""
        if node.target != aten.linear.default:
            return None
        weight = self.parameter(node.args[1])
        if weight is None or not weight.endswith(".weight"):
            return None
        name = weight[: -len(".weight")]
        return name if isinstance(self.layer.get_submodule(name), nn.Linear) else None

    def row_range(self, node: fx.Node) -> tuple[RowRange, fx.Node] | None:
        """Output rows of a linear that ``node`` is (all of them, or a slice/chunk/split)."""
        name = self.linear_name(node)
        if name is not None:
            return RowRange(name, 0, _val(node).shape[-1]), node
        if node.target == aten.slice.Tensor:
            base, dim, start, stop = (list(node.args) + [0, None, None])[:4]
            name = self.linear_name(base) if isinstance(base, fx.Node) else None
            rows = _val(base).shape[-1] if name else 0
            if name and dim % _val(base).dim() == _val(base).dim() - 1 and (len(node.args) < 5 or node.args[4] == 1):
                start, stop = max(start or 0, 0), min(stop if stop is not None else rows, rows)
                return RowRange(name, start, stop), base
            return None
        if node.target == operator.getitem and isinstance(node.args[0], fx.Node):
            split, index = node.args
            if split.target not in (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default):
                return None
            base = split.args[0]
            name = self.linear_name(base)
            dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
            if name is None or dim % _val(base).dim() != _val(base).dim() - 1:
                return None
            sizes = [part.shape[-1] for part in split.meta["val"]]
            start = sum(sizes[:index])
            return RowRange(name, start, start + sizes[index]), base
        return None

    def rows_read_only_by(self, node: fx.Node, base: fx.Node, expected: set[fx.Node]) -> bool:
        """The rows ``node`` of linear output ``base`` flow only into ``expected``.

        For a fused linear, its other direct readers must take other rows (slice/chunk/split
        of the last dimension), so that changing our rows changes nothing else.
        """
        if readers(node) != expected:
            return False
        if node is base:
            return True
        others = [u for u in base.users if u is not node and u.target not in IGNORED_USERS]
        mine = self.row_range(node)[0]
        for other in others:
            if other.target in (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default):
                if node.target != operator.getitem or node.args[0] is not other:
                    return False
                continue
            their = self.row_range(other)
            if their is None or their[0].start < mine.stop and mine.start < their[0].stop:
                return False
        return True


def _module_output_is(graph: fx.Graph, node: fx.Node, width: int) -> str | None:
    """The module whose only output is ``node`` (up to transparent ops), if there is one."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    if not path:
        return None

    def inside(n: fx.Node) -> bool:
        return any(entry[0] == path for entry in (n.meta.get("nn_module_stack") or {}).values())

    # Nodes of the module read from outside it. A transparent view of something computed
    # outside (the norm's own input cast to fp32, read by the residual add) is no output.
    outputs = [
        n
        for n in graph.nodes
        if n.op == "call_function"
        and inside(n)
        and inside(source(n))
        and any(not inside(u) for u in n.users if u.target not in IGNORED_USERS)
    ]
    if len(outputs) == 1 and source(outputs[0], width) is node:
        return path
    return None


def _placeholder(node) -> fx.Node | None:
    node = source(node) if isinstance(node, fx.Node) else None
    return node if node is not None and node.op == "placeholder" else None


def _only_reader(node: fx.Node | None, reader: fx.Node) -> bool:
    return node is not None and readers(node) == {reader}


def _norm_producer(lg: LayerGraph, node: fx.Node, width: int) -> Producer | None:
    """``y * w``, ``y * (w + c)``, ``layer_norm(x, w, b)`` or ``rms_norm(x, w)``, w and b parameters.

    Folding 1/s into w (and b) is exact whatever y is, provided w and b feed nothing else.
    """
    if node.target in (aten.layer_norm.default, aten.rms_norm.default):
        weight_node = _placeholder(node.args[2]) if len(node.args) > 2 else None
        bias_node = _placeholder(node.args[3]) if node.target == aten.layer_norm.default and len(node.args) > 3 else None
        if not _only_reader(weight_node, node) or (bias_node is not None and not _only_reader(bias_node, node)):
            return None
        if node.target == aten.layer_norm.default and len(node.args) > 3 and node.args[3] is not None and bias_node is None:
            return None
        weight, offset = lg.parameter(weight_node), 0.0
        bias = lg.parameter(bias_node) if bias_node is not None else None
    elif node.target == aten.mul.Tensor:
        weight = None
        for factor in (a for a in node.args if isinstance(a, fx.Node)):
            factor_source = source(factor)
            if factor_source.op == "placeholder" and _only_reader(factor_source, node):
                weight, offset = lg.parameter(factor_source), 0.0
            elif factor_source.target == aten.add.Tensor and _only_reader(factor_source, node):
                tensor_arg, scalar = factor_source.args
                if not isinstance(tensor_arg, fx.Node):
                    tensor_arg, scalar = scalar, tensor_arg
                param_node = _placeholder(tensor_arg)
                if isinstance(scalar, (int, float)) and _only_reader(param_node, factor_source):
                    weight, offset = lg.parameter(param_node), float(scalar)
            if weight is not None:
                break
        bias = None
    else:
        return None
    if weight is None or tuple(lg.layer.get_parameter(weight).shape) != (width,):
        return None
    return NormProducer(weight, bias, offset, _module_output_is(lg.graph, node, width))


def _gated_producer(lg: LayerGraph, node: fx.Node, width: int) -> Producer | None:
    if node.target != aten.mul.Tensor or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    if any(_val(a) is None or _val(a).shape != _val(node).shape for a in node.args):
        return None  # broadcasting: not an elementwise product of two projections
    for act_side, up_side in (node.args, node.args[::-1]):
        act = source(act_side, width)
        if act.target not in GATE_ACTIVATIONS:
            continue
        gate_node, up_node = source(act.args[0], width), source(up_side, width)
        gate, up = lg.row_range(gate_node), lg.row_range(up_node)
        if gate is None or up is None or readers(act, width) != {node}:
            continue
        if not lg.rows_read_only_by(gate_node, gate[1], {act}) or not lg.rows_read_only_by(up_node, up[1], {node}):
            continue
        if gate[0].stop - gate[0].start != width or up[0].stop - up[0].start != width:
            continue
        return GatedProducer(gate[0], up[0], GATE_ACTIVATIONS[act.target])
    return None


def _activation_producer(lg: LayerGraph, node: fx.Node, width: int) -> Producer | None:
    if node.target not in HOMOGENEOUS_ACTIVATIONS:
        return None
    rows_node = source(node.args[0], width)
    rows = lg.row_range(rows_node)
    if rows is None or not lg.rows_read_only_by(rows_node, rows[1], {node}):
        return None
    return ActivationProducer(rows[0], HOMOGENEOUS_ACTIVATIONS[node.target])


def _attention_producer(lg: LayerGraph, node: fx.Node, consumer: str) -> Producer | None:
    attention = source(node)
    if attention.target not in ATTENTION_OPS:
        return None
    if attention.target == aten.scaled_dot_product_attention.default:
        query, value = _val(attention.args[0]), attention.args[2]
        num_heads, head_dim = query.shape[-3], query.shape[-1]
    else:
        value = attention.args[1]
        num_heads, head_dim = _val(attention).shape[-3], _val(attention).shape[-1]
    value_rows_node = source(value)
    rows = lg.row_range(value_rows_node)
    if rows is None or not lg.rows_read_only_by(value_rows_node, rows[1], {attention}):
        return None
    attention_readers = readers(attention)
    if len(attention_readers) != 1 or lg.linear_name(next(iter(attention_readers))) != consumer:
        return None
    num_kv_heads = (rows[0].stop - rows[0].start) // head_dim
    return AttentionProducer(rows[0], num_heads, num_kv_heads, head_dim, value_row_of_channel=())


def _classify(lg: LayerGraph, node: fx.Node, width: int, consumers: list[str]) -> Producer:
    for recognise in (_norm_producer, _gated_producer, _activation_producer):
        producer = recognise(lg, node, width)
        if producer is not None:
            return producer
    if len(consumers) == 1:
        producer = _attention_producer(lg, node, consumers[0])
        if producer is not None:
            return producer
    return UnknownProducer(f"unrecognised producer {node.target}" if node.op == "call_function" else f"layer input {node.name}")


def analyze_graph(program: torch.export.ExportedProgram, layer: nn.Module) -> list[tuple[LinearGroup, fx.Node]]:
    """Groups of the layer's linears (names relative to the layer), before probing."""
    lg = LayerGraph(program, layer)
    by_input: dict[fx.Node, list[tuple[str, fx.Node]]] = {}
    for node in lg.graph.nodes:
        name = lg.linear_name(node)
        if name is not None:
            width = _val(node.args[0]).shape[-1]
            by_input.setdefault(source(node.args[0], width), []).append((name, node))
    groups = []
    for input_node, members in by_input.items():
        names = [name for name, _ in members]
        width = _val(members[0][1].args[0]).shape[-1]
        linear_nodes = {n for _, n in members}
        if readers(input_node, width) != linear_nodes or any(source(n.args[0], width) is not input_node for n in linear_nodes):
            producer: Producer = UnknownProducer("the input is also read by something other than these linears")
        else:
            producer = _classify(lg, input_node, width, names)
        groups.append((LinearGroup(tuple(names), width, producer), input_node))
    return groups


@torch.no_grad()
def probe_value_rows(layer: nn.Module, inputs: LayerInputs, producer: AttentionProducer, consumer: str) -> tuple[int, ...] | None:
    """Measure which value row each input channel of ``consumer`` copies.

    Every value row r is replaced by the constant r + 1 over all tokens. Attention weights sum
    to one, so each output channel then holds exactly the number of the row it mixes,
    whatever reshapes, transposes or head repetition lie between. None if that is not so.
    """
    value_linear = layer.get_submodule(producer.value.linear)
    start, stop = producer.value.start, producer.value.stop
    seen = {}

    def replace_rows(module, args, output):
        output = output.clone()
        ids = torch.arange(start, stop, dtype=output.dtype, device=output.device) + 1
        output[..., start:stop] = ids.expand_as(output[..., start:stop])
        return output

    def record_input(module, args):
        seen["x"] = args[0].detach().double()

    handles = [
        value_linear.register_forward_hook(replace_rows),
        layer.get_submodule(consumer).register_forward_pre_hook(record_input),
    ]
    try:
        args, kwargs = inputs
        layer(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1])  # (tokens, channels)
    rows = x.round()
    if (x - rows).abs().max() > 1e-2 or not (rows == rows[:1]).all():
        return None
    rows = rows[0].long() - 1
    if rows.min() < start or rows.max() >= stop:
        return None
    return tuple(rows.tolist())


def analyze_layer(layer: nn.Module, inputs: LayerInputs) -> tuple[LinearGroup, ...]:
    """The plan of one decoder layer, names relative to it."""
    try:
        program = export_layer(layer, inputs)
    except Exception as error:  # any export failure: still correct, every linear gets a pre-op
        logger.warning("could not export %s (%s); all its linears take the pre-op path", type(layer).__name__, error)
        return tuple(
            LinearGroup((name,), module.in_features, UnknownProducer(f"export failed: {type(error).__name__}"))
            for name, module in layer.named_modules()
            if isinstance(module, nn.Linear)
        )
    groups = []
    for group, _ in analyze_graph(program, layer):
        producer = group.producer
        if isinstance(producer, AttentionProducer):
            rows = probe_value_rows(layer, inputs, producer, group.linears[0])
            if rows is None:
                producer = UnknownProducer("attention output is not a per-channel copy of value rows")
            else:
                producer = AttentionProducer(
                    producer.value, producer.num_heads, producer.num_kv_heads, producer.head_dim, rows
                )
            group = LinearGroup(group.linears, group.in_features, producer)
        groups.append(group)
    return tuple(groups)
