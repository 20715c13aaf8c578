"""Number formats: quantize, dequantize and fake-quantize along the last dimension."""

from serq_ao.formats.integer import (
    GRANULARITIES,
    IntQuantized,
    dequantize_int,
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

__all__ = [
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
