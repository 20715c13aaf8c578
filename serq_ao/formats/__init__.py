"""Number formats: the numerics (quantize, dequantize, fake-quantize along the last dimension)
and one :class:`QuantFormat` object per family that the method core asks for everything
format-specific (see :mod:`serq_ao.formats.base`)."""

from serq_ao.formats.base import FormatName, Quantized, QuantFormat, ScaleMode, enum_value

from serq_ao.formats.integer import (
    GRANULARITIES,
    IntQuantized,
    dequantize_int,
    dequantize_int4_groups,
    fake_quantize_int,
    pack_int4,
    quantize_int,
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
    unpack_uint4,
)

from serq_ao.formats.int_format import IntFormat
from serq_ao.formats.mxfp4_format import MXFP4Format

FORMATS = tuple(f.value for f in FormatName)


def get_format(name: str | FormatName, scale_mode: str | ScaleMode = ScaleMode.FLOOR) -> QuantFormat:
    """The format object of a ``SERQConfig.format`` name (``scale_mode``: MXFP4's block-scale rule)."""
    name = enum_value(FormatName, name, "format")
    scale_mode = enum_value(ScaleMode, scale_mode, "scale_mode")
    if name is FormatName.MXFP4:
        return MXFP4Format(scale_mode)
    return IntFormat(name, activation_bits={FormatName.W4A8: 8, FormatName.W4A4: 4}[name])


__all__ = [
    "FORMATS",
    "FormatName",
    "IntFormat",
    "MXFP4Format",
    "Quantized",
    "QuantFormat",
    "ScaleMode",
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
    "unpack_int4",
    "SCALE_MODES",
    "dequantize_mxfp4",
    "e8m0_to_float32",
    "fake_quantize_mxfp4",
    "pack_uint4",
    "quantize_mxfp4",
    "unpack_uint4",
]
