"""serq configs on transformers' torchao route (``TorchAoConfig``), loading and saving.

transformers picks a quantizer by ``quant_method`` alone: every ``TorchAoConfig`` goes to its
``TorchAoHfQuantizer``, which can neither rebuild a packed serq folder (its output wrappers,
its fields beyond torchao's) nor save serq's packed tensors. :func:`install` puts
:class:`TorchAoOrSERQHfQuantizer` in its place: the same torchao quantizer for every other
config, and for serq's

- :class:`~serq_ao.integrations.checkpoint_config.SERQCheckpointConfig` (a folder serq wrote):
  :class:`~serq_ao.integrations.hf_quantizer.SERQHfQuantizer`;
- :class:`~serq_ao.SERQLinearConfig`, alone or as every entry of an ``FqnToConfig`` (quantize
  on load): :class:`SERQOnLoadHfQuantizer`, torchao's quantize-on-load, after which the model
  describes itself as a packed serq model, so ``save_pretrained`` writes a folder that
  ``from_pretrained`` reads back to the same logits;
- ``SERQEvaluationCheckpointConfig`` (a folder of dequantized weights): an error that says to
  use ``load_quantized``.
"""

from __future__ import annotations

import logging

from torchao.quantization import FqnToConfig
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

from serq_ao.integrations.checkpoint_config import SERQCheckpointConfig, SERQEvaluationCheckpointConfig
from serq_ao.integrations.hf_quantizer import SERQHfQuantizer, attach_quantizer
from serq_ao.integrations.torchao_config import SERQLinearConfig
from serq_ao.quant.config import SERQConfig

logger = logging.getLogger(__name__)

TORCHAO_METHOD = "torchao"


def serq_linear_configs(quant_type) -> list[SERQLinearConfig] | None:
    """The SERQLinearConfigs of a ``TorchAoConfig.quant_type`` (None when it holds none);
    a mix with other torchao configs is refused: no one format could save it."""
    if isinstance(quant_type, SERQLinearConfig):
        return [quant_type]
    if not isinstance(quant_type, FqnToConfig):
        return None
    configs = [c for c in quant_type.fqn_to_config.values() if c is not None]
    serq = [c for c in configs if isinstance(c, SERQLinearConfig)]
    if serq and len(serq) != len(configs):
        other = next(type(c).__name__ for c in configs if not isinstance(c, SERQLinearConfig))
        raise ValueError(f"TorchAoConfig's FqnToConfig mixes SERQLinearConfig with {other}: a model quantized so "
                         "could not be saved in either format; quantize with one kind of config")
    return serq or None


def model_config_of(configs: list[SERQLinearConfig]) -> SERQConfig:
    """The one :class:`SERQConfig` a packed folder records for linears quantized with ``configs``."""
    kinds = {(str(c.format), c.rank, str(c.scale_mode), str(c.weight_scales), c.rotation, c.flattening_strength,
              c.saliency_unit) for c in configs}
    if len(kinds) > 1:
        raise ValueError("the SERQLinearConfigs of one TorchAoConfig must agree on format, rank, scale_mode, "
                         f"weight_scales, rotation, flattening_strength and saliency_unit (one packed folder records one of each), got {sorted(kinds)}")
    fmt, rank, scale_mode, weight_scales, rotation, strength, unit = kinds.pop()
    # without statistics a linear is plain round to nearest (rank 0 enforced by SERQLinearConfig)
    method = "serq" if any(c.input_amax is not None for c in configs) else "rtn"
    return SERQConfig(method=method, format=fmt, rank=rank, scale_mode=scale_mode, weight_scales=weight_scales,
                      rotation=rotation, flattening_strength=strength if method == "serq" else 1.0,
                      saliency_unit=unit if method == "serq" else "channel")


class SERQOnLoadHfQuantizer(TorchAoHfQuantizer):
    """torchao's quantize-on-load with SERQLinearConfig; the loaded model then saves as a
    packed serq folder."""

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.serq_config = model_config_of(serq_linear_configs(quantization_config.quant_type))

    def _process_model_after_weight_loading(self, model, **kwargs):
        model = super()._process_model_after_weight_loading(model, **kwargs)
        attach_quantizer(model, self.serq_config)  # the config and quantizer save_pretrained uses
        return model


class TorchAoOrSERQHfQuantizer(TorchAoHfQuantizer):
    """transformers' quantizer for quant_method "torchao", with serq's configs sent to serq."""

    def __new__(cls, quantization_config, **kwargs):
        quant_type = getattr(quantization_config, "quant_type", None)
        if isinstance(quant_type, SERQCheckpointConfig):
            return SERQHfQuantizer(quantization_config, **kwargs)
        if isinstance(quant_type, SERQEvaluationCheckpointConfig):
            raise ValueError("this folder was saved by serq-ao in evaluation mode (dequantized weights, "
                             "serq_config.json): load it with serq_ao.integrations.serialization.load_quantized(path), "
                             "or use `serq eval`")
        if serq_linear_configs(quant_type):
            return SERQOnLoadHfQuantizer(quantization_config, **kwargs)
        return super().__new__(cls)


def install() -> None:
    """Answer quant_method "torchao" with :class:`TorchAoOrSERQHfQuantizer` (once)."""
    current = AUTO_QUANTIZER_MAPPING.get(TORCHAO_METHOD)
    if current is TorchAoOrSERQHfQuantizer:
        return
    if current is not TorchAoHfQuantizer:
        # someone else replaced torchao's quantizer: do not undo it silently
        logger.warning("transformers' torchao quantizer was replaced by %s; serq folders will not load through it",
                       getattr(current, "__name__", current))
        return
    AUTO_QUANTIZER_MAPPING[TORCHAO_METHOD] = TorchAoOrSERQHfQuantizer
