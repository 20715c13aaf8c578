"""serq-ao: SERQ 4-bit weight and activation quantization for PyTorch models.

Importing the package is cheap where torch is not imported yet: the public API below is
imported on first use (PEP 562), and what lets torch and transformers meet serq's tensors, ops
and folders is registered when they are imported or first look for a quantizer
(:mod:`serq_ao.registration`). So ``serq --help`` answers at once, and ``import serq_ao``
followed by ``from_pretrained(serq_folder)``, ``torch.load(weights_only=True)`` or
``torch.export.load`` still works.
"""

import importlib
import logging

# torchao logs failures to load its CUDA extensions on CPU-only machines; they are harmless
# for us, so keep them out of users' logs (must happen before torchao is first imported).
logging.getLogger("torchao").setLevel(logging.ERROR)
# torchao 0.18 registers its enums with torch's pytree at import, which torch 2.13 answers
# with a deprecation warning per enum: noise for our users, nothing they can act on.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__version__ = "0.1.0"

# the public API: name -> the module that defines it, imported when the name is first used
_API = {
    "CalibrationStats": "serq_ao.quant.calibration",
    "FormatName": "serq_ao.options",
    "Method": "serq_ao.quant.methods",
    "ScaleMode": "serq_ao.options",
    "QuantizationReport": "serq_ao.quant.report",
    "SERQConfig": "serq_ao.quant.config",
    "SERQLinearConfig": "serq_ao.integrations.torchao_config",
    "calibrate": "serq_ao.quant.calibration",
    "pack_model": "serq_ao.quant.packing",
    "quantize_": "serq_ao.quant.pipeline",
    "quantize_model": "serq_ao.quant.pipeline",
    "recipe_config": "serq_ao.quant.recipes",
    "register": "serq_ao.registration",
    "transform_model": "serq_ao.quant.pipeline",
    "storage_report": "serq_ao.quant.packing",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


from serq_ao import registration as _registration  # noqa: E402

_registration.install()
