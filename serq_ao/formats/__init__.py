"""Number formats: the numerics (quantize, dequantize, fake-quantize along the last dimension)
and one :class:`QuantFormat` object per family that the method core asks for everything
format-specific (see :mod:`serq_ao.formats.base`)."""

from serq_ao.formats.base import FormatName, Quantized, QuantFormat, ScaleMode, WeightScales, enum_value

from serq_ao.formats.integer import (
    GRANULARITIES,
    IntQuantized,
    dequantize_int,
    dequantize_int4_groups,
    fake_quantize_int,
    pack_int4,
    quantize_int,
    quantize_int_by_error,
    unpack_int4,
)
from serq_ao.formats.mxfp4 import (
    BLOCK_SIZE,
    SCALE_MODES,
    dequantize_mxfp4,
    e8m0_to_float32,
    fake_quantize_mxfp4,
    pack_uint4,
    quantize_mxfp4,
    quantize_mxfp4_by_error,
    unpack_uint4,
)

from serq_ao.formats.int_format import IntFormat
from serq_ao.formats.mxfp4_format import MXFP4Format

from serq_ao.options import FORMATS, WEIGHT_SCALES  # where the CLI reads them without importing torch


def get_format(name: str | FormatName, scale_mode: str | ScaleMode = ScaleMode.FLOOR,
               weight_scales: str | WeightScales = WeightScales.RULE) -> QuantFormat:
    """The format object of a ``SERQConfig.format`` name (``scale_mode``: MXFP4's block-scale
    rule; ``weight_scales``: how weight and R scales are chosen, by the format's rule or by
    error: MXFP4's E8M0 exponent, INT4's clip of the group maximum)."""
    name = enum_value(FormatName, name, "format")
    scale_mode = enum_value(ScaleMode, scale_mode, "scale_mode")
    weight_scales = enum_value(WeightScales, weight_scales, "weight_scales")
    if name is FormatName.MXFP4:
        return MXFP4Format(scale_mode, weight_scales)
    return IntFormat(name, activation_bits={FormatName.W4A8: 8, FormatName.W4A4: 4}[name],
                     weight_scales=weight_scales)


__all__ = [
    "FORMATS",
    "FormatName",
    "IntFormat",
    "MXFP4Format",
    "Quantized",
    "QuantFormat",
    "ScaleMode",
    "WEIGHT_SCALES",
    "WeightScales",
    "dequantize_int4_groups",
    "enum_value",
    "get_format",
    "BLOCK_SIZE",
    "GRANULARITIES",
    "IntQuantized",
    "dequantize_int",
    "fake_quantize_int",
    "pack_int4",
    "quantize_int",
    "quantize_int_by_error",
    "unpack_int4",
    "SCALE_MODES",
    "dequantize_mxfp4",
    "e8m0_to_float32",
    "fake_quantize_mxfp4",
    "pack_uint4",
    "quantize_mxfp4",
    "quantize_mxfp4_by_error",
    "unpack_uint4",
]
