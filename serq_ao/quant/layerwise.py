"""Quantization one decoder layer at a time ("sequential onloading"), for every method.

In memory at once: one decoder layer on the compute device, the calibration activations at
its input (:mod:`serq_ao.quant.activations`: CPU up to a budget, then disk) and the
statistics (two vectors per linear group). The other layers stay where their
:class:`LayerWeights` keeps them: on the CPU, in accelerate's offload, or still in the
checkpoint's safetensors shards (:mod:`serq_ao.streaming`).

1. **Capture.** The model runs once per calibration window with every decoder layer's
   forward replaced by a recorder, so nothing but the embeddings computes: layer 0's input
   and each layer's keyword arguments (position embeddings, masks) per window.
2. **Per layer i**, in order:
   a. onload its weights to the compute device;
   b. analyse it (passes/) if it is the first layer of its structure, on a short analysis
      window carried through the float layers;
   c. statistics: the float layer runs on F_i, the float model's inputs at layer i, with
      observers on its groups; its outputs are F_{i+1}. These are exactly the whole-model
      forward's statistics (the paper's definition);
   d. exact transforms of its groups (folds stay inside the layer: every producer the
      passes fold into is part of it);
   e. quantize: round-to-nearest per linear, or GPTQ with Hessians from the transformed
      layer run on Q_i, the inputs that the already-quantized predecessors produce; the
      quantized layer's outputs are Q_{i+1};
   f. output errors (diagnostics): a copy of the transformed float layer runs on the first
      error windows of F_i, each linear's input also through its quantized twin;
   g. ``on_layer_done`` (the caller packs and writes it), then offload.

Every step runs the same operations on the same tensors as a whole-model forward would, one
window at a time, so the result is bitwise that of quantizing the whole model at once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from typing import Callable, Protocol

import torch
from torch import nn

from serq_ao.kernels.reference import apply_pre_op
from serq_ao.memory import release_freed_memory
from serq_ao.passes import LinearGroup, ModelPlan
from serq_ao.passes.analysis import analyze_layer
from serq_ao.passes.planner import _prefixed_group
from serq_ao.passes.trace import example_input_ids, find_decoder_layers, structure_signature
from serq_ao.quant.activations import ActivationCache, ActivationStream
from serq_ao.quant.calibration import StatisticsObserver
from serq_ao.quant.statistics import CalibrationStats
from serq_ao.quant.linear_plan import LinearPlan

logger = logging.getLogger(__name__)


class LayerWeights(Protocol):
    """Where decoder layers' weights live between their turns."""

    def onload(self, index: int, layer: nn.Module, device: torch.device) -> None:
        """Make ``layer``'s weights real and put them on ``device``."""

    def offload(self, index: int, layer: nn.Module) -> None:
        """Put ``layer`` back where it lives (after ``on_layer_done``)."""


class ResidentWeights:
    """Layers that are in memory already: each visits the compute device for its turn."""

    def __init__(self):
        self._home: dict[int, torch.device] = {}

    def onload(self, index, layer, device):
        home = next((t.device for t in [*layer.parameters(), *layer.buffers()]), device)
        self._home[index] = home
        if home != device:
            layer.to(device)

    def offload(self, index, layer):
        home = self._home.pop(index)
        if any(t.device != home for t in layer.parameters()):
            layer.to(home)


@dataclasses.dataclass
class LayerwiseState:
    """Everything carried from one layer to the next: a run stopped after ``next_layer - 1``
    continues from this alone (:mod:`serq_ao.resume` saves and loads it).

    - ``analysis``, ``floats``, ``quantized``: the activation streams at layer
      ``next_layer``'s input (the analysis window; the float model's calibration windows;
      with GPTQ, the quantized model's), None where not kept;
    - ``observer``: the statistics of the layers done;
    - ``analysed``: each layer structure's groups (names relative to the layer), by
      ``repr`` of its :func:`~serq_ao.passes.trace.structure_signature`;
    - ``plans``, ``linears``: every linear quantized so far, model order;
    - ``squared``: per linear, the output error's (squared error, squared norm) sums."""

    next_layer: int
    analysis: ActivationStream
    floats: ActivationStream
    quantized: ActivationStream | None
    observer: StatisticsObserver | None
    analysed: dict[str, tuple[LinearGroup, ...]] = dataclasses.field(default_factory=dict)
    plans: dict[str, LinearPlan] = dataclasses.field(default_factory=dict)
    linears: list = dataclasses.field(default_factory=list)
    squared: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    # time per stage, summed over layers: calibration (the float layer runs), transform,
    # quantize (GPTQ's layer runs included), output_error
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def clock(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - since
        return now

    def release(self) -> None:
        for stream in (self.analysis, self.floats, self.quantized):
            if stream is not None:
                stream.release()


@dataclasses.dataclass
class LayerwiseResult:
    plans: dict[str, LinearPlan]  # every quantized linear, model order
    linears: list  # what quantize_linear returned for each, same order
    statistics: CalibrationStats | None
    output_errors: dict[str, tuple[float, float]]  # linear -> (squared error, squared norm)
    windows: int
    seconds: dict[str, float]  # see LayerwiseState.seconds


class _Stop(Exception):
    """Raised by the last layer's recorder: the capture needs nothing after it."""


def _first_tensor_device(module: nn.Module) -> torch.device | None:
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type != "meta":
            return tensor.device
    return None


@contextlib.contextmanager
def layer_forwards(layers: nn.ModuleList, forward_of: Callable[[int], Callable]):
    """Within the block, layer ``i`` runs ``forward_of(i)`` instead of its own forward. It is
    an instance attribute: the class's forward is untouched; one that was there already
    (accelerate's hook wrapper) is put back afterwards."""
    wrapped = [layer.__dict__.get("forward") for layer in layers]
    for index, layer in enumerate(layers):
        layer.forward = forward_of(index)
    try:
        yield
    finally:
        for layer, forward in zip(layers, wrapped):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, windows: list[torch.Tensor],
                         device: torch.device | None = None) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Layer 0's input per window, and each layer's keyword arguments per window
    (``kwargs[layer][window]``), without running any decoder layer.

    The arguments layers share (position embeddings, masks) are referenced, not copied."""
    hidden: list[torch.Tensor] = []
    calls: list[list[dict]] = [[] for _ in layers]

    def recorder(index: int):
        def forward(*args, **kwargs):
            x = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                hidden.append(x.detach().clone())
            calls[index].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            if index == len(layers) - 1:
                raise _Stop
            return x

        return forward

    device = device or _first_tensor_device(model) or torch.device("cpu")
    with layer_forwards(layers, recorder):
        for ids in windows:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
    if len(hidden) != len(windows) or any(len(c) != len(windows) for c in calls):
        raise RuntimeError("the model's forward did not call every decoder layer once per window")
    return hidden, calls


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, device: torch.device) -> torch.Tensor:
    out = layer(hidden.to(device), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _kwargs_on(kwargs: dict, device: torch.device) -> dict:
    """The recorded keyword arguments with their tensors on ``device`` (one copy per call)."""
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return {k: move(v) for k, v in kwargs.items()}


def run_stream(layer, stream, calls, device, cache: ActivationCache | None,
               limit: int | None = None) -> ActivationStream | None:
    """Run ``layer`` on each window of ``stream`` (the first ``limit``); the outputs as a new
    stream in ``cache`` (None: outputs dropped, for hooks only)."""
    out = None if cache is None else cache.stream()
    for index in range(len(stream) if limit is None else min(limit, len(stream))):
        y = _run_layer(layer, stream[index], _kwargs_on(calls[index], device), device)
        if out is not None:
            out.append(y)
    return out


# (the linear's plan, its GPTQ Hessian or None, the statistics so far) -> its report
Quantize = Callable[[LinearPlan, "torch.Tensor | None", "CalibrationStats | None"], object]
# (last layer's float outputs, its quantized outputs or None, observer or None, statistics or
# None) -> (plans, reports, statistics)
FinalStage = Callable[[ActivationStream, "ActivationStream | None", "StatisticsObserver | None",
                       "CalibrationStats | None"], tuple[dict, list, "CalibrationStats | None"]]


def _initial_state(hidden: list[torch.Tensor], cache: ActivationCache, float_windows: int, gptq: bool,
                   collect_statistics: bool) -> LayerwiseState:
    """Layer 0's streams from the captured inputs (``hidden[0]``: the analysis window)."""
    analysis, floats = cache.stream(), cache.stream()
    analysis.append(hidden[0])
    for h in hidden[1:1 + float_windows]:
        floats.append(h)
    quantized = None
    if gptq:
        quantized = cache.stream()
        for h in hidden[1:]:
            quantized.append(h)
    return LayerwiseState(0, analysis, floats, quantized, StatisticsObserver() if collect_statistics else None)


@torch.no_grad()
def quantize_layerwise(
    model: nn.Module,
    *,
    windows: list[torch.Tensor] | None,
    plan: ModelPlan | None,
    statistics: CalibrationStats | None,
    collect_statistics: bool,
    transform_layer: Callable[[ModelPlan, CalibrationStats | None], dict[str, LinearPlan]],
    quantize_linear: Quantize,
    gptq: bool,
    check_groups: Callable[[tuple[LinearGroup, ...]], None] = lambda groups: None,
    weights: LayerWeights | None = None,
    device: torch.device | None = None,
    cache: ActivationCache | None = None,
    error_windows: int = 0,
    on_layer_done: Callable[[int, nn.Module, dict[str, LinearPlan]], None] | None = None,
    resume: Callable[[ActivationCache], LayerwiseState | None] | None = None,
    on_checkpoint: Callable[[LayerwiseState], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    final_stage: FinalStage | None = None,
) -> LayerwiseResult:
    """Quantize ``model``'s decoder layers one at a time (see the module doc).

    ``windows``: calibration input ids, one (1, L_i) tensor per window, or None
    (round-to-nearest without statistics).
    ``statistics``: already collected (then none are collected here); ``collect_statistics``
    asks for them otherwise. ``transform_layer(layer_plan, statistics)`` applies one layer's
    exact transforms and returns its linears' plans; ``quantize_linear(plan, hessian,
    statistics)`` replaces one linear and returns its report. ``device``: the compute device
    (default: where the layer is). ``resume(cache)``: the state of an earlier run to continue
    from (or None); ``on_checkpoint(state)`` is called after every layer but the last, once
    ``on_layer_done`` has taken it. ``final_stage(floats, quantized, observer, statistics)``
    runs after the last layer on its float (and, with GPTQ, quantized) outputs and returns
    ``(plans, reports, statistics)`` of what it quantized (the output head:
    :mod:`serq_ao.quant.lm_head`).
    """
    weights = weights or ResidentWeights()
    report = progress or (lambda stage, done, total: None)
    own_cache = cache is None
    cache = cache or ActivationCache()
    layers_name, layers = find_decoder_layers(model)
    device = device or _first_tensor_device(layers[0]) or _first_tensor_device(model) or torch.device("cpu")
    calibration = [] if windows is None else list(windows)
    started = time.perf_counter()
    # the layers' keyword arguments are recomputed (cheap: only the embeddings run) even when
    # resuming; their inputs come from the saved state then
    hidden, calls = capture_layer_inputs(model, layers, [example_input_ids(model, device="cpu"), *calibration])
    float_windows = len(calibration) if collect_statistics else min(error_windows, len(calibration))
    state = resume(cache) if resume is not None else None
    if state is None:
        state = _initial_state(hidden, cache, float_windows, gptq, collect_statistics)
    del hidden
    tokens = sum(w.numel() for w in calibration)
    try:
        for index in range(state.next_layer, len(layers)):
            layer = layers[index]
            prefix = f"{layers_name}.{index}."
            weights.onload(index, layer, device)
            window_calls = calls[index]  # [analysis window, calibration windows...]
            # (b) the plan of this layer
            if plan is not None:
                groups = tuple(g for g in plan.groups if g.linears[0].startswith(prefix))
            else:
                signature = repr(structure_signature(layer))
                if signature not in state.analysed:
                    logger.info("analysing %s (%s)", prefix[:-1], type(layer).__name__)
                    inputs = ((state.analysis[0].to(device),), _kwargs_on(window_calls[0], device))
                    state.analysed[signature] = analyze_layer(layer, inputs)
                groups = tuple(_prefixed_group(g, prefix) for g in state.analysed[signature])
            check_groups(groups)
            last = index == len(layers) - 1
            clock = time.perf_counter()
            # (c) float outputs: the analysis window, and the calibration windows with observers
            next_analysis = None if last else run_stream(layer, state.analysis, window_calls[:1], device, cache)
            observer = state.observer
            handles = observer.attach(model, ModelPlan(layers_name, groups)) if observer is not None else []
            try:
                next_floats = run_stream(layer, state.floats, window_calls[1:], device,
                                          None if last and final_stage is None else cache)
            finally:
                for handle in handles:
                    handle.remove()
            layer_stats = statistics if observer is None else observer.statistics(tokens, time.perf_counter() - started)
            clock = state.clock("calibration", clock)
            # (d) exact transforms
            layer_plans = transform_layer(ModelPlan(layers_name, groups), layer_stats)
            state.plans.update(layer_plans)
            reference = copy.deepcopy(layer) if error_windows and len(state.floats) else None
            clock = state.clock("transform", clock)
            # (e) quantize
            next_quantized = None
            if gptq:
                hessians = _hessians(model, layer, groups, layer_plans, state.quantized, window_calls[1:], device)
                for group in groups:
                    for name in group.linears:
                        # no Hessian: an expert no token reached (experts.py): round-to-nearest
                        state.linears.append(quantize_linear(layer_plans[name], hessians.get(group.name), layer_stats))
                next_quantized = (None if last and final_stage is None
                                  else run_stream(layer, state.quantized, window_calls[1:], device, cache))
            else:
                for name in layer_plans:
                    state.linears.append(quantize_linear(layer_plans[name], None, layer_stats))
            clock = state.clock("quantize", clock)
            # (f) output errors of each linear on the float inputs
            if reference is not None:
                _accumulate_errors(reference, layer, prefix, layer_plans, state.floats, window_calls[1:], device,
                                   error_windows, state.squared)
                del reference
                state.clock("output_error", clock)
            if on_layer_done is not None:
                on_layer_done(index, layer, layer_plans)
            weights.offload(index, layer)
            state.release()
            release_freed_memory()
            state.analysis, state.floats, state.quantized = next_analysis, next_floats, next_quantized
            state.next_layer = index + 1
            if on_checkpoint is not None and not last:
                on_checkpoint(state)
            report("layers", index + 1, len(layers))
        if final_stage is not None:
            clock = time.perf_counter()
            plans, reports, statistics = final_stage(state.floats, state.quantized, state.observer, statistics)
            state.plans.update(plans)
            state.linears.extend(reports)
            state.clock("quantize", clock)
    finally:
        state.release()
        if own_cache:
            cache.close()
    if state.observer is not None:
        statistics = state.observer.statistics(tokens, time.perf_counter() - started)
    squared = {k: (v[0], v[1]) for k, v in state.squared.items()}
    return LayerwiseResult(state.plans, state.linears, statistics, squared, len(calibration), dict(state.seconds))


def _hessians(model, layer, groups, layer_plans, stream, calls, device) -> dict[str, torch.Tensor]:
    """H = X^T X of each group's transformed input over the quantized stream, in fp64."""
    hessians: dict[str, torch.Tensor] = {}

    def accumulate(linear_plan: LinearPlan):
        def hook(module, args):
            # what the linear multiplies with its weight: its input after the pre-op, in
            # fp32 products (as in the GPTQ reference), summed per window; GPTQ itself then
            # works in fp64
            x = apply_pre_op(args[0], linear_plan.input_scale_inv, linear_plan.input_perm)
            x = x.reshape(-1, args[0].shape[-1])
            hessians[linear_plan.group.name] = (x.T @ x).double() + hessians.get(linear_plan.group.name, 0)

        return hook

    handles = [model.get_submodule(g.linears[0]).register_forward_pre_hook(accumulate(layer_plans[g.linears[0]]))
               for g in groups]
    try:
        run_stream(layer, stream, calls, device, None)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def relative_error(squared_error: float, squared_norm: float) -> float:
    """sqrt(error / norm), NaN where either is NaN (never 0: a broken linear must show), 0 for
    an exact zero output, inf for a nonzero error on a zero output."""
    if math.isnan(squared_error) or math.isnan(squared_norm):
        return math.nan
    if squared_norm == 0:
        return 0.0 if squared_error == 0 else math.inf
    return math.sqrt(squared_error / squared_norm)


def _accumulate_errors(reference, layer, prefix, layer_plans, floats, calls, device, limit, squared):
    """Add each linear's ||Y_q - Y||^2 and ||Y||^2 over the first ``limit`` float windows."""
    def hook(name: str):
        quantized_linear = layer.get_submodule(name)

        def compare(module, args, output):
            difference = quantized_linear(args[0]).double() - output.double()
            sums = squared.setdefault(prefix + name, [0.0, 0.0])
            sums[0] += float(difference.pow(2).sum())
            sums[1] += float(output.double().pow(2).sum())

        return compare

    names = [n.removeprefix(prefix) for n in layer_plans]
    handles = [reference.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        run_stream(reference, floats, calls, device, None, limit)
    finally:
        for handle in handles:
            handle.remove()
