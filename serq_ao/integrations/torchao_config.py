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

from serq_ao.formats import get_format
from serq_ao.quant.config import DEFAULT_RANK, check_format_rank_scale_mode
from serq_ao.quant.calibration import NonFiniteError
from serq_ao.quant.reconstruct import flattening_scales, saliency_order, serq_reconstruct


@dataclasses.dataclass
class SERQLinearConfig(AOBaseConfig):
    """SERQ for one linear.

    - ``input_amax``: (d_in,) max |x_j| per input channel over calibration tokens (e.g.
      ``serq_ao.quant.calibration.calibrate(...).amax[group]``); None quantizes without flattening
      or reordering (plain round to nearest, which needs ``rank=0``).
    - ``rank``: r, a multiple of 32 (0: flattening only).
    - ``format``: "mxfp4", "w4a8" or "w4a4"; ``scale_mode``: "floor" or "rceil" (MXFP4).
    """

    input_amax: torch.Tensor | None = None
    rank: int = DEFAULT_RANK
    format: str = "mxfp4"
    scale_mode: str = "floor"

    def __post_init__(self):
        self.format, self.scale_mode = check_format_rank_scale_mode(self.format, self.rank, self.scale_mode)
        if self.input_amax is None:
            if self.rank:
                raise ValueError("rank > 0 needs input_amax (the saliency order comes from it); pass rank=0 for plain RTN")
        else:
            if not isinstance(self.input_amax, torch.Tensor) or self.input_amax.dim() != 1:
                raise ValueError("input_amax must be a 1-D tensor (d_in,) of per-channel max |x|")
            amax = self.input_amax.float()
            if not bool(torch.isfinite(amax).all()) or bool((amax < 0).any()):
                raise ValueError("input_amax must be finite and >= 0")

    def to_dict(self) -> dict:
        amax = None if self.input_amax is None else self.input_amax.float().tolist()
        return {"input_amax": amax, "rank": self.rank, "format": str(self.format), "scale_mode": str(self.scale_mode)}

    @classmethod
    def from_dict(cls, data: dict) -> "SERQLinearConfig":
        data = dict(data)
        if data.get("input_amax") is not None:
            data["input_amax"] = torch.tensor(data["input_amax"], dtype=torch.float32)
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
        if config.input_amax.shape != (d_in,):
            raise ValueError(f"input_amax must have shape ({d_in},) for this linear, got {tuple(config.input_amax.shape)}")
        scales = flattening_scales(config.input_amax.float().to(weight.device))
        perm = saliency_order(scales)
        weight = (weight * scales).index_select(1, perm)  # W~[:, pi]
        scale_inv = 1.0 / scales
    fmt = get_format(config.format, config.scale_mode)
    main, correction = serq_reconstruct(weight, config.rank, fmt)
    packed = fmt.pack(main, correction, input_scale_inv=scale_inv, input_perm=perm, dtype=module.weight.dtype)
    module.weight = nn.Parameter(packed, requires_grad=False)
    return module
