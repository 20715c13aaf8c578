"""How a serq folder's config.json names its quantization, so that no process loads it wrong.

transformers applies a folder's ``quantization_config`` only for the methods it ships or that
a library registered in the running process; any other ``quant_method`` is skipped with a
warning, and the weights then load as if unquantized. Under a name of its own ("serq", format
3) a packed folder loaded by a process that had not imported serq_ao therefore came back with
random weights in every linear.

So serq folders are written under torchao's method (format 4), whose handling transformers
ships and which serq-ao depends on::

    "quantization_config": {"quant_method": "torchao",
                            "quant_type": {"default": {"_type": "serq_ao.SERQCheckpointConfig",
                                                       "_version": 1, "_data": {...}}}}

transformers hands ``quant_type`` to torchao's ``config_from_dict``, which looks the type up only
in the modules of ``torchao.core.config.ALLOWED_AO_MODULES``. Without serq_ao it raises
"Failed to find class serq_ao.SERQCheckpointConfig in any of the allowed modules", an error
that names the package to install and import. Importing serq_ao adds this module to that
allowlist (:func:`allow_in_torchao`), and :mod:`serq_ao.integrations.torchao_route` puts
serq's quantizer in front of torchao's for these configs. (Without torchao installed,
transformers refuses every "torchao" folder with "requires torchao": an error too.)

The type is spelled with its package so that the error names it; the class keeps its plain
``__qualname__``, and torchao reads ``__name__`` only.
"""

from __future__ import annotations

import dataclasses
import sys

from torchao.core.config import ALLOWED_AO_MODULES, AOBaseConfig

from serq_ao.quant.config import SERQConfig

# 3: quant_method "serq" (still read); 4: the same tensors under quant_method "torchao"
FORMAT_VERSION = 4
LEGACY_FORMAT_VERSION = 3
LEGACY_QUANT_METHOD = "serq"
PACKED_TYPE = "serq_ao.SERQCheckpointConfig"
EVALUATION_TYPE = "serq_ao.SERQEvaluationCheckpointConfig"


@dataclasses.dataclass
class SERQCheckpointConfig(AOBaseConfig):
    """``quant_type`` of a packed serq folder (``TorchAoConfig(SERQCheckpointConfig(...))``).

    - ``serq_config``: the :class:`SERQConfig` it was quantized with, as a dict.
    - ``output_gathers``: module name -> ``{"width": int, "buffers": [...]}`` for every norm
      (or other producer) wrapped in an :class:`~serq_ao.passes.OutputGather` holding a
      folded order.
    - ``packed_linears``: names of the linears whose weights are packed.
    - ``packed_embeddings``: names of the embeddings whose tables are quantized
      (``SERQConfig.embeddings``; a head tied to one reads it too). Absent in folders written
      before the option existed: none.

    Describes a folder; it quantizes nothing (use :class:`~serq_ao.SERQLinearConfig` or
    :func:`serq_ao.quantize_` for that).
    """

    serq_config: dict = dataclasses.field(default_factory=dict)
    output_gathers: dict = dataclasses.field(default_factory=dict)
    packed_linears: list = dataclasses.field(default_factory=list)
    format_version: int = FORMAT_VERSION
    packed_embeddings: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        check_format_version(self.format_version, FORMAT_VERSION)
        if not isinstance(self.output_gathers, dict) or not isinstance(self.packed_linears, list) \
                or not isinstance(self.packed_embeddings, list):
            raise ValueError("output_gathers must be a dict, packed_linears and packed_embeddings lists of module names")
        self.serq_config = SERQConfig.from_dict(self.serq_config or {}).to_dict()  # validates


@dataclasses.dataclass
class SERQEvaluationCheckpointConfig(AOBaseConfig):
    """``quant_type`` of an evaluation-mode serq folder (dequantized weights and
    ``serq_config.json``, :mod:`serq_ao.integrations.serialization`): it marks the folder so
    that plain transformers refuses it; serq_ao loads it with ``load_quantized``."""

    format_version: int = 1


SERQCheckpointConfig.__name__ = PACKED_TYPE
SERQEvaluationCheckpointConfig.__name__ = EVALUATION_TYPE


def check_format_version(found, expected: int) -> None:
    if found != expected:
        older = " (an older serq-ao, whose weights cannot be verified): re-quantize it" if found in (1, 2) else ""
        raise ValueError(f"this serq-ao reads quantization format {expected}, "
                         f"the checkpoint has format {found!r}{older}")


def allow_in_torchao() -> None:
    """Let torchao's ``config_from_dict`` find serq's configs: the two checkpoint types
    (their names are not attributes Python would make, so they are set by hand) and
    :class:`~serq_ao.SERQLinearConfig`."""
    module = sys.modules[__name__]
    setattr(module, PACKED_TYPE, SERQCheckpointConfig)
    setattr(module, EVALUATION_TYPE, SERQEvaluationCheckpointConfig)
    ALLOWED_AO_MODULES.update({__name__, "serq_ao.integrations.torchao_config"})


def serq_checkpoint_type(quantization_config: dict | None) -> str | None:
    """The serq type a config.json ``quantization_config`` names (``PACKED_TYPE``,
    ``EVALUATION_TYPE``; ``LEGACY_QUANT_METHOD`` for format 3), or None."""
    if not isinstance(quantization_config, dict):
        return None
    if quantization_config.get("quant_method") == LEGACY_QUANT_METHOD:
        return LEGACY_QUANT_METHOD
    quant_type = quantization_config.get("quant_type")
    if quantization_config.get("quant_method") != "torchao" or not isinstance(quant_type, dict):
        return None
    default = quant_type.get("default")
    found = default.get("_type") if isinstance(default, dict) else None
    return found if found in (PACKED_TYPE, EVALUATION_TYPE) else None


def checkpoint_fields(quantization_config: dict) -> dict:
    """The serq fields (serq_config, output_gathers, packed_linears, format_version) of a
    packed folder's config.json ``quantization_config``, in either format."""
    kind = serq_checkpoint_type(quantization_config)
    if kind == LEGACY_QUANT_METHOD:
        return quantization_config
    if kind != PACKED_TYPE:
        raise ValueError("not the quantization_config of a packed serq folder")
    return quantization_config["quant_type"]["default"]["_data"]
