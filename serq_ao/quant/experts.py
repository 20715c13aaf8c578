"""Mixture-of-experts layers: fused expert tensors become one nn.Linear per projection.

transformers 5 stores a MoE layer's experts as two 3-D parameters (Mixtral, Qwen2/3-MoE,
OLMoE, ... through ``@use_experts_implementation``)::

    gate_up_proj  (E, 2I, H)   rows [:I] gate, [I:] up
    down_proj     (E, H, I)

and runs them with ``forward(hidden_states (N, H), top_k_index (N, k), top_k_weights (N, k))``.
SERQ quantizes nn.Linear modules, each with statistics of its own input, so
:func:`unfuse_experts` replaces such a module by :class:`SERQExperts`: children ``"0"`` ..
``"E-1"``, each a SwiGLU MLP with ``gate_proj``, ``up_proj``, ``down_proj`` (the names
Qwen-MoE checkpoints use per expert). Expert ``e``'s linears then see exactly the tokens the
router sends to ``e``, so their calibration statistics (and GPTQ Hessians) are per expert.
The forward is transformers' eager loop over the experts that got tokens; the outputs equal
the fused module's eager implementation bitwise (tests/quant/test_experts.py).

Under torch.export / torch.compile the loop over data-dependent token sets cannot be traced,
so there every expert runs on all tokens with the unrouted ones zeroed (``x * routed_e``) and
its output weighted by its routing weight (0 for unrouted tokens): the same result up to
float rounding, E/k times the work. Each expert reading its own masked copy is also what
tells the graph passes that experts are separate groups.

An expert that no calibration token reached has no statistics; the fallback
(:func:`fill_unreached`) is stated in a warning: its gate/up group takes the statistics of
all the tokens of the layer's experts (what it would have seen had every token been routed
to it: the elementwise max over its siblings), its down_proj is not flattened (s = 1, channel
order kept) because another expert's intermediate channels say nothing about its own. GPTQ
gives such an expert's linears round-to-nearest (no Hessian).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

logger = logging.getLogger(__name__)

FUSED_PARAMETERS = ("gate_up_proj", "down_proj")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, *, dtype=None, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, H) -> (n, H)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SERQExperts(nn.Module):
    """A MoE layer's experts as modules ``"0"`` .. ``"E-1"`` (:class:`ExpertMLP`), called
    like transformers' fused experts module it replaces."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module, *, dtype=None,
                 device=None):
        super().__init__()
        self.num_experts = num_experts
        for index in range(num_experts):
            self.add_module(str(index), ExpertMLP(hidden, intermediate, act_fn, dtype=dtype, device=device))

    def expert(self, index: int) -> ExpertMLP:
        return self._modules[str(index)]  # type: ignore[return-value]

    @classmethod
    @torch.no_grad()
    def from_fused(cls, fused: nn.Module) -> "SERQExperts":
        gate_up, down = fused.gate_up_proj, fused.down_proj
        num_experts, twice_intermediate, hidden = gate_up.shape
        intermediate = twice_intermediate // 2
        experts = cls(num_experts, hidden, intermediate, fused.act_fn, dtype=gate_up.dtype, device=gate_up.device)
        if gate_up.device.type != "meta":
            for index in range(num_experts):
                expert = experts.expert(index)
                expert.gate_proj.weight.copy_(gate_up[index, :intermediate])
                expert.up_proj.weight.copy_(gate_up[index, intermediate:])
                expert.down_proj.weight.copy_(down[index])
        return experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:  # (N, H), (N, k), (N, k) -> (N, H)
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return self._dense_forward(hidden_states, top_k_index, top_k_weights)
        output = torch.zeros_like(hidden_states)
        with torch.no_grad():
            routed = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, N)
            hit = torch.greater(routed.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit[:, 0].tolist():
            slot, token = torch.where(routed[index])
            expert_output = self.expert(index)(hidden_states[token])  # (n_e, H)
            expert_output = expert_output * top_k_weights[token, slot, None]
            output.index_add_(0, token, expert_output.to(output.dtype))
        return output

    def _dense_forward(self, hidden_states, top_k_index, top_k_weights):
        output = torch.zeros_like(hidden_states)
        for index in range(self.num_experts):
            chosen = top_k_index == index  # (N, k)
            routed = chosen.any(dim=-1, keepdim=True).to(hidden_states.dtype)  # (N, 1)
            weight = (top_k_weights * chosen).sum(dim=-1, keepdim=True)  # (N, 1)
            output = output + (self.expert(index)(hidden_states * routed) * weight).to(output.dtype)
        return output


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module of the layout :class:`SERQExperts` reproduces: gated,
    concatenated [gate; up] rows, not transposed, no biases, no norm after the experts."""
    gate_up, down = (getattr(module, name, None) for name in FUSED_PARAMETERS)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not hasattr(module, "act_fn"):
        return False
    experts, twice_intermediate, hidden = gate_up.shape
    layout = (getattr(module, "has_gate", None), getattr(module, "is_concatenated", None),
              getattr(module, "is_transposed", None), getattr(module, "has_bias", None),
              getattr(module, "has_post_expert_norm", False))
    return (layout == (True, True, False, False, False) and twice_intermediate % 2 == 0
            and tuple(down.shape) == (experts, hidden, twice_intermediate // 2))


def fused_experts(model: nn.Module) -> list[str]:
    """Names of the modules :func:`unfuse_experts` would replace."""
    return [name for name, module in model.named_modules() if is_fused_experts(module)]


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` by :class:`SERQExperts` (same values,
    same device and dtype; meta stays meta); returns their names. Experts of another layout
    are left alone (and reported unquantized by the pipeline)."""
    from serq_ao.passes.transforms import replace_module

    names = fused_experts(model)
    for name in names:
        replace_module(model, name, SERQExperts.from_fused(model.get_submodule(name)))
    if names:
        logger.info("unfused the experts of %d MoE layers into one nn.Linear per projection", len(names))
    return names


def has_unfused_experts(model: nn.Module) -> bool:
    return any(isinstance(m, SERQExperts) for m in model.modules())


_EXPERT_LINEAR = re.compile(r"^(?P<experts>.+)\.(?P<index>\d+)\.(?P<projection>gate_proj|up_proj|down_proj)$")


def _expert_linear(name: str, model_experts: set[str]) -> tuple[str, int, str] | None:
    """(experts module, expert index, projection) of a linear inside a :class:`SERQExperts`."""
    match = _EXPERT_LINEAR.match(name)
    if match is None or match["experts"] not in model_experts:
        return None
    return match["experts"], int(match["index"]), match["projection"]


def fill_unreached(groups, amax: dict, abs_sum: dict, count: dict, experts: set[str]) -> dict[str, list[int]]:
    """Give every group of an expert no token reached the fallback statistics (module doc),
    in place; returns {experts module: [expert indices]} of those filled. ``groups``: the
    :class:`~serq_ao.passes.LinearGroup` s observed; ``experts``: names of the SERQExperts."""
    filled: dict[str, list[int]] = {}
    for group in groups:
        if group.name in amax:
            continue
        where = _expert_linear(group.linears[0], experts)
        if where is None:
            continue
        module, index, projection = where
        if projection == "down_proj":
            amax[group.name] = torch.ones(group.in_features)
            abs_sum[group.name] = torch.ones(group.in_features, dtype=torch.float64)
            count[group.name] = 1
        else:
            siblings = [g.name for g in groups if g.name in amax and g.name in count
                        and (w := _expert_linear(g.linears[0], experts)) is not None
                        and w[0] == module and w[2] != "down_proj"]
            if siblings:
                amax[group.name] = torch.stack([amax[s] for s in siblings]).amax(dim=0)
                abs_sum[group.name] = sum(abs_sum[s] for s in siblings)
                count[group.name] = sum(count[s] for s in siblings)
            else:  # no expert of the layer got a token (no calibration at all reached it)
                amax[group.name] = torch.ones(group.in_features)
                abs_sum[group.name] = torch.ones(group.in_features, dtype=torch.float64)
                count[group.name] = 1
        if index not in filled.setdefault(module, []):
            filled[module].append(index)
    for module, indices in filled.items():
        logger.warning("%s: no calibration token was routed to expert(s) %s; their gate/up take the statistics of "
                       "all the layer's tokens, their down_proj is not flattened (calibrate on more tokens to give "
                       "them statistics of their own)", module, ", ".join(map(str, sorted(indices))))
    return filled


def merges_experts(conversion) -> bool:
    """Is ``conversion`` (a transformers WeightConverter) one that builds a fused expert
    parameter out of per-expert checkpoint tensors?"""
    targets = getattr(conversion, "_original_target_patterns", None) or getattr(conversion, "target_patterns", [])
    targets = [targets] if isinstance(targets, str) else list(targets)
    return any(t.rstrip("$").endswith(tuple(f"experts.{p}" for p in FUSED_PARAMETERS)) for t in targets)


# Mixtral's original checkpoints: block_sparse_moe.experts.<e>.w1 (gate), w3 (up), w2 (down)
_MIXTRAL_PROJECTIONS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_STORED_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<projection>gate_proj|up_proj|down_proj)"
                            r"\.weight$")
Selection = tuple[int, str] | None  # (expert, projection) of a fused tensor, or None: the whole tensor


def stored_names(name: str) -> list[tuple[str, Selection]]:
    """Where a checkpoint may hold the tensor a model with :class:`SERQExperts` calls
    ``name``, most likely first: under that name; under Mixtral's original module name
    (``block_sparse_moe`` for ``mlp``) and expert names (w1/w3/w2); or as a slice of the
    fused 3-D parameter (:func:`select_stored`)."""
    bases = [name] + ([name.replace(".mlp.", ".block_sparse_moe.", 1)] if ".mlp." in name else [])
    candidates: list[tuple[str, Selection]] = [(base, None) for base in bases]
    for base in bases:
        match = _STORED_EXPERT.match(base)
        if match is None:
            continue
        experts, index, projection = match["experts"], int(match["index"]), match["projection"]
        candidates.append((f"{experts}.{index}.{_MIXTRAL_PROJECTIONS[projection]}.weight", None))
        fused = "down_proj" if projection == "down_proj" else "gate_up_proj"
        candidates.append((f"{experts}.{fused}", (index, projection)))
    return candidates


def select_stored(tensor: torch.Tensor, selection: Selection) -> torch.Tensor:
    """The part of a stored tensor that :func:`stored_names` pointed at (a copy, so the fused
    tensor can be dropped)."""
    if selection is None:
        return tensor
    index, projection = selection
    if projection == "down_proj":
        return tensor[index].clone()
    intermediate = tensor.shape[1] // 2
    return tensor[index, :intermediate].clone() if projection == "gate_proj" else tensor[index, intermediate:].clone()


def expert_modules(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, SERQExperts)}
