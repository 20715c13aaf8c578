"""SERQLinearConfig: SERQ through torchao's own ``quantize_`` for linears whose statistics are known.

``torchao.quantization.quantize_(model, SERQLinearConfig(input_amax=...))`` converts each
matching nn.Linear on its own: with no producer to fold into, the flattening scale and the
saliency order stay in the packed weight as its pre-op. To quantize a whole transformers
model (folding included) use :func:`serq_ao.quantize_`; to give each linear its own
statistics use torchao's ``FqnToConfig({name: SERQLinearConfig(input_amax=stats[name])})``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from serq_ao.formats import WeightScales, enum_value, get_format
from serq_ao.formats.hadamard import check_rotation, rotate_weight
from serq_ao.quant.config import DEFAULT_RANK, check_flattening_strength, check_format_rank_scale_mode
from serq_ao.quant.methods import SaliencyUnit, saliency_block
from serq_ao.quant.input_checks import NonFiniteError
from serq_ao.quant.reconstruct import flattening_scales, salient_order, serq_reconstruct
from serq_ao.tensor_subclass import pack_weight


@dataclasses.dataclass
class SERQLinearConfig(AOBaseConfig):
    """SERQ for one linear.

    - ``input_amax``: (d_in,) max |x_j| per input channel over calibration tokens (e.g.
      ``serq_ao.quant.calibration.calibrate(...).amax[group]``), a 1-D tensor or a sequence of
      floats; None quantizes without flattening or reordering (plain round to nearest, which
      needs ``rank=0``). Stored as a list of floats (exact for float32 values) so that the
      config is JSON, as torchao's ``config_to_dict`` and transformers' config.json need.
    - ``rank``: r, a multiple of 32 (0: flattening only).
    - ``format``: "mxfp4", "w4a8" or "w4a4"; ``scale_mode``: "floor" or "rceil" (MXFP4).
    - ``weight_scales``: "rule" or "search", as :class:`~serq_ao.quant.config.SERQConfig`'s.
    - ``rotation``: 0, 32, 64 or 128, the block Hadamard rotation, as ``SERQConfig``'s.
    - ``flattening_strength``: in [0, 1], as ``SERQConfig``'s (s = max|x| ** strength; the
      order by max|x| whatever it is).
    - ``saliency_unit``: "channel" or "block" (needs a rotation), as ``SERQConfig``'s.
    """

    input_amax: list[float] | None = None
    rank: int = DEFAULT_RANK
    format: str = "mxfp4"
    scale_mode: str = "floor"
    weight_scales: str = "rule"
    rotation: int = 0
    flattening_strength: float = 1.0
    saliency_unit: str = "channel"

    def __post_init__(self):
        fmt, scale_mode = check_format_rank_scale_mode(self.format, self.rank, self.scale_mode)
        self.format, self.scale_mode = str(fmt), str(scale_mode)  # plain strings: JSON as they are
        get_format(fmt, scale_mode, self.weight_scales)  # weight_scales: a known value
        self.weight_scales = str(enum_value(WeightScales, self.weight_scales, "weight_scales"))
        self.rotation = check_rotation(self.rotation)
        self.flattening_strength = check_flattening_strength(self.flattening_strength)
        self.saliency_unit = str(enum_value(SaliencyUnit, self.saliency_unit, "saliency_unit"))
        if self.saliency_unit == SaliencyUnit.BLOCK and not self.rotation:
            raise ValueError("saliency_unit='block' moves the blocks of a rotation: it needs rotation 32, 64 or 128")
        if self.input_amax is None:
            if self.rank:
                raise ValueError("rank > 0 needs input_amax (the saliency order comes from it); pass rank=0 for plain RTN")
            return
        try:
            amax = torch.as_tensor(self.input_amax, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError("input_amax must be a 1-D tensor (d_in,) or a sequence of floats, the per-channel max |x|, "
                             f"got {type(self.input_amax).__name__}") from None
        if amax.dim() != 1:
            raise ValueError(f"input_amax must be a 1-D tensor (d_in,) of per-channel max |x|, got shape {tuple(amax.shape)}")
        if not bool(torch.isfinite(amax).all()) or bool((amax < 0).any()):
            raise ValueError("input_amax must be finite and >= 0")
        self.input_amax = amax.tolist()

    def amax_tensor(self) -> torch.Tensor | None:
        return None if self.input_amax is None else torch.tensor(self.input_amax, dtype=torch.float32)

    def to_dict(self) -> dict:
        return {"input_amax": self.input_amax, "rank": self.rank, "format": str(self.format),
                "scale_mode": str(self.scale_mode), "weight_scales": self.weight_scales, "rotation": self.rotation,
                "flattening_strength": self.flattening_strength, "saliency_unit": self.saliency_unit}

    @classmethod
    def from_dict(cls, data: dict) -> "SERQLinearConfig":
        return cls(**data)


@register_quantize_module_handler(SERQLinearConfig)
@torch.no_grad()
def _serq_linear_transform(module: nn.Module, config: SERQLinearConfig) -> nn.Module:
    if not isinstance(module, nn.Linear):
        raise ValueError(f"SERQLinearConfig applies to nn.Linear modules, got {type(module).__name__}")
    weight = module.weight.detach().float()  # (N, d_in)
    if not bool(torch.isfinite(weight).all()):
        raise NonFiniteError(f"the linear's weight has {int((~torch.isfinite(weight)).sum())} NaN or inf value(s): "
                             "a non-finite weight cannot be quantized")
    d_in = weight.shape[1]
    if config.rank > d_in:
        raise ValueError(f"rank ({config.rank}) must be at most the linear's in_features ({d_in})")
    scale_inv = perm = None
    if config.input_amax is not None:
        if len(config.input_amax) != d_in:
            raise ValueError(f"input_amax must have shape ({d_in},) for this linear, got ({len(config.input_amax)},)")
        amax = config.amax_tensor().to(weight.device)
        scales = flattening_scales(amax, config.flattening_strength)
        perm = salient_order(amax, saliency_block(config.saliency_unit, config.rotation))
        weight = (weight * scales).index_select(1, perm)  # W~[:, pi]
        scale_inv = 1.0 / scales
    weight = rotate_weight(weight, config.rotation)  # W~[:, pi] H
    fmt = get_format(config.format, config.scale_mode, config.weight_scales)
    main, correction = serq_reconstruct(weight, config.rank, fmt)
    packed = pack_weight(fmt, main, correction, input_scale_inv=scale_inv, input_perm=perm, dtype=module.weight.dtype,
                      rotation=config.rotation)
    module.weight = nn.Parameter(packed, requires_grad=False)
    return module
