"""Rank where it pays (``SERQConfig(rank_allocation="error")``): SERQ's correction rank chosen
per linear, within the storage a uniform rank would take.

Numerics.

- For each quantized linear and each candidate rank r in {0, 32, ..., min(4 r_u, d_in)}
  (r_u: the config's ``rank``), the squared output error on the calibration tokens::

      E(r) = || X^ W^T - Q(X^) V_r^T ||_F^2,    V_r = W^q_r + [R_r, 0]

  X^ is the linear's input as quantization sees it (times 1/s, in saliency order, rotated),
  from the float model after its exact transforms (folds included: a producer's weight
  carries the 1/s of the linear it feeds); W its weight as quantization sees it; W^q_r and
  R_r SERQ's
  round-to-nearest reconstruction at rank r. (GPTQ's weights exist only after its sweep, so
  round-to-nearest stands in for them.) Only the first r columns of V_r depend on r beyond
  the shared blocks, but each rank is computed in full.
- E comes from three Gram matrices of the group's input, with A = X^ - Q(X^) the activation
  error and D = W - V_r the weight error (small terms only: no difference of large sums)::

      E = tr(W Gaa W^T) + 2 tr(W Gaq D^T) + tr(D Gqq D^T),   Gaa = A^T A, Gaq = A^T Q, Gqq = Q^T Q

  each window's products in float32 (as GPTQ's Hessians), summed in float64.
- Each curve is divided by the output's squared norm tr(W Gxx W^T): a relative error, which
  compares linears of different widths and activation scales (an output that is exactly zero
  on every calibration token counts as error 0).
- Allocation: the storage of linear l at rank r is ``effective_bits(d_in, r) * d_in * d_out``
  bits; the budget is the sum at r_u. Each curve is reduced to the steps of its lower convex
  hull (from r = 0, the jump with the largest error reduction per added bit, ties to the
  smaller rank), so a flat stretch followed by a drop is still reached. All steps of all
  linears are taken in order of decreasing reduction per bit (ties: model order) while they
  fit; a step that does not fit ends its linear. This is the optimum of the convex hulls
  (the greedy of a fractional knapsack), up to the last step that does not fit.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from serq_ao.formats import QuantFormat
from serq_ao.formats.hadamard import rotate_weight
from serq_ao.kernels.reference import apply_pre_op
from serq_ao.passes.trace import find_decoder_layers
from serq_ao.quant.activations import ActivationCache
from serq_ao.quant.config import RANK_MULTIPLE
from serq_ao.quant.layerwise import capture_layer_inputs, run_stream
from serq_ao.quant.linear_plan import LinearPlan
from serq_ao.quant.reconstruct import serq_reconstruct

# Curves are measured up to this multiple of the uniform rank: a linear may take up to four
# times its share, and the curves stay cheap (9 points for r_u = 64).
CANDIDATE_FACTOR = 4


def candidate_ranks(in_features: int, rank: int) -> tuple[int, ...]:
    """0, 32, ... up to ``CANDIDATE_FACTOR * rank`` and at most ``in_features``."""
    top = min(CANDIDATE_FACTOR * rank, in_features // RANK_MULTIPLE * RANK_MULTIPLE)
    return tuple(range(0, top + 1, RANK_MULTIPLE))


@dataclasses.dataclass(frozen=True)
class RankCurve:
    """A linear's relative squared output error ``E(r) / ||Y||^2`` at each candidate rank."""

    name: str
    in_features: int
    out_features: int
    ranks: tuple[int, ...]
    errors: tuple[float, ...]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class InputGrams:
    """Gaa, Gaq, Gqq (d_in, d_in) float64 of one group's transformed input X^: Q = Q(X^),
    A = X^ - Q (module doc)."""

    aa: torch.Tensor | float = 0.0
    aq: torch.Tensor | float = 0.0
    qq: torch.Tensor | float = 0.0

    def add(self, x: torch.Tensor, q: torch.Tensor) -> None:
        """``x``, ``q``: (tokens, d_in) float32, one window."""
        a = x - q
        self.aa = (a.T @ a).double() + self.aa
        self.aq = (a.T @ q).double() + self.aq
        self.qq = (q.T @ q).double() + self.qq


def output_error_curve(weight: torch.Tensor, grams: InputGrams, ranks: tuple[int, ...],
                       fmt: QuantFormat) -> tuple[float, ...]:
    """Relative squared output error at each of ``ranks`` (see the module doc) of the
    transformed weight ``weight`` (d_out, d_in) float32 on the input ``grams`` summarise."""
    if isinstance(grams.qq, float):  # no token reached this group (an MoE expert)
        return tuple(0.0 for _ in ranks)
    w = weight.double()
    w_aa, w_aq = w @ grams.aa, w @ grams.aq  # (d_out, d_in)
    activation_only = float((w_aa * w).sum())  # ||A W^T||^2
    gxx = grams.aa + grams.aq + grams.aq.T + grams.qq  # X^T X, X = A + Q
    norm = float(((w @ gxx) * w).sum())
    errors = []
    for rank in ranks:
        main, correction = serq_reconstruct(weight, rank, fmt)
        v = main.dequantize().double()
        if correction is not None:
            v[:, :rank] += correction.dequantize().double()
        d = w - v
        error = activation_only + 2 * float((w_aq * d).sum()) + float(((d @ grams.qq) * d).sum())
        errors.append(max(error, 0.0) / norm if norm > 0 else 0.0)
    return tuple(errors)


def _hull_steps(curve: RankCurve, bits: Callable[[int], float]) -> list[tuple[float, int, float]]:
    """(error reduction per bit, rank after the step, added bits) along the lower convex hull
    of ``curve`` from rank 0; only steps that reduce the error."""
    steps, at = [], 0
    while True:
        best = None
        for j in range(at + 1, len(curve.ranks)):
            gain = curve.errors[at] - curve.errors[j]
            cost = bits(curve.ranks[j]) - bits(curve.ranks[at])
            if gain > 0 and cost > 0 and (best is None or gain / cost > best[0]):
                best = (gain / cost, j, cost)
        if best is None:
            return steps
        steps.append((best[0], curve.ranks[best[1]], best[2]))
        at = best[1]


def allocate_ranks(curves: list[RankCurve], fmt: QuantFormat, rank: int) -> dict[str, int]:
    """Each linear's rank: the steps of every curve's convex hull by decreasing error reduction
    per bit, within the storage of ``rank`` everywhere (module doc)."""
    def bits_of(curve: RankCurve) -> Callable[[int], float]:
        return lambda r: fmt.effective_bits(curve.in_features, r) * curve.in_features * curve.out_features

    budget = sum(bits_of(c)(rank) - bits_of(c)(0) for c in curves)  # the corrections' share
    steps = sorted(((-ratio, index, order, new_rank, cost)
                    for index, curve in enumerate(curves)
                    for order, (ratio, new_rank, cost) in enumerate(_hull_steps(curve, bits_of(curve)))))
    ranks = {c.name: 0 for c in curves}
    ended: set[int] = set()
    for _, index, _, new_rank, cost in steps:
        if index in ended:
            continue
        if cost > budget:
            ended.add(index)
            continue
        budget -= cost
        ranks[curves[index].name] = new_rank
    return ranks


@torch.no_grad()
def measure_rank_curves(
    model: nn.Module,
    plans: dict[str, LinearPlan],
    windows: list[torch.Tensor],
    *,
    rank: int,
    quantized: Callable[[str], bool] = lambda name: True,
    cache: ActivationCache | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[RankCurve]:
    """Every decoder-layer linear's :class:`RankCurve` (model order) on the calibration
    ``windows``, one decoder layer at a time. ``model`` is already transformed and ``plans``
    are its linears' (:func:`~serq_ao.quant.pipeline.transform_model`): each linear's input
    goes through its plan's pre-op and rotation and its weight is rotated, exactly as
    quantization will see them. The model is not changed. ``quantized(name)``: False for
    linears left in floating point (they get no curve)."""
    report = progress or (lambda stage, done, total: None)
    own_cache = cache is None
    cache = cache or ActivationCache()
    layers_name, layers = find_decoder_layers(model)
    hidden, calls = capture_layer_inputs(model, layers, windows)
    stream = cache.stream()
    for h in hidden:
        stream.append(h)
    del hidden
    groups = list({id(p.group): p.group for p in plans.values()}.values())
    curves: list[RankCurve] = []
    try:
        for index, layer in enumerate(layers):
            prefix = f"{layers_name}.{index}."
            layer_groups = [g for g in groups if g.linears[0].startswith(prefix)]
            grams = {g.name: InputGrams() for g in layer_groups}

            def accumulate(plan: LinearPlan, grams: dict[str, InputGrams]):
                def hook(module, args):
                    x = apply_pre_op(args[0], plan.input_scale_inv, plan.input_perm, plan.rotation)
                    x = x.reshape(-1, plan.group.in_features)
                    grams[plan.group.name].add(x, plan.quant_format.fake_quantize_activation(x))

                return hook

            handles = [model.get_submodule(g.linears[0]).register_forward_pre_hook(
                accumulate(plans[g.linears[0]], grams))
                       for g in layer_groups]
            device = next(layer.parameters()).device
            try:
                last = index == len(layers) - 1
                next_stream = run_stream(layer, stream, calls[index], device, None if last else cache)
            finally:
                for handle in handles:
                    handle.remove()
            for group in layer_groups:
                for name in group.linears:
                    if not quantized(name):
                        continue
                    plan = plans[name]
                    linear = model.get_submodule(name)
                    weight = rotate_weight(linear.weight.detach().float(), plan.rotation)
                    ranks = candidate_ranks(group.in_features, rank)
                    curves.append(RankCurve(name, group.in_features, linear.out_features, ranks,
                                            output_error_curve(weight, grams[group.name], ranks, plan.quant_format)))
            stream.release()
            stream = next_stream
            report("rank curves", index + 1, len(layers))
    finally:
        if stream is not None:
            stream.release()
        if own_cache:
            cache.close()
    return curves
