"""serq-ao: SERQ 4-bit weight and activation quantization for PyTorch models."""

import logging

# torchao logs failures to load its CUDA extensions on CPU-only machines; they are harmless
# for us, so keep them out of users' logs (must happen before torchao is first imported).
logging.getLogger("torchao").setLevel(logging.ERROR)
# torchao 0.18 registers its enums with torch's pytree at import, which torch 2.13 answers
# with a deprecation warning per enum: noise for our users, nothing they can act on.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__version__ = "0.1.0"

from serq_ao.formats import FormatName, ScaleMode  # noqa: E402
from serq_ao.quant.calibration import CalibrationStats, calibrate  # noqa: E402
from serq_ao.quant.methods import Method  # noqa: E402
from serq_ao.quant.config import SERQConfig  # noqa: E402
from serq_ao.quant.recipes import recipe_config  # noqa: E402
from serq_ao.integrations import checkpoint_config as _checkpoint_config  # noqa: E402
from serq_ao.integrations import hf_quantizer as _hf_quantizer  # noqa: E402
from serq_ao.integrations import torchao_route as _torchao_route  # noqa: E402
from serq_ao.quant.packing import pack_model, storage_report  # noqa: E402
from serq_ao.quant.pipeline import quantize_, quantize_model, transform_model  # noqa: E402
from serq_ao.quant.report import QuantizationReport  # noqa: E402
from serq_ao.integrations.torchao_config import SERQLinearConfig  # noqa: E402

# what lets transformers load serq folders: serq_ao.integrations.checkpoint_config says why
_checkpoint_config.allow_in_torchao()
_hf_quantizer.register_legacy()
_torchao_route.install()

__all__ = [
    "CalibrationStats",
    "FormatName",
    "Method",
    "ScaleMode",
    "QuantizationReport",
    "SERQConfig",
    "SERQLinearConfig",
    "calibrate",
    "pack_model",
    "quantize_",
    "quantize_model",
    "recipe_config",
    "transform_model",
    "storage_report",
]
