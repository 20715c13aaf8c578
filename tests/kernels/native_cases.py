"""Packed weights and their reference results, for the native CPU kernels' tests.

``reference_and_bound`` gives what the plain-PyTorch reference computes for a packed weight,
and the largest distance :mod:`serq_ao.kernels.cpu_native` allows from it (its module doc):
``2 gamma(K' + 2) sum_k |a_k| |w_k|``, the products taken from the reference's own quantized
activations and dequantized weights, in float64.
"""

import dataclasses

import torch

from serq_ao.formats import get_format
from serq_ao.formats.integer import fake_quantize_int
from serq_ao.formats.mxfp4 import fake_quantize_mxfp4
from serq_ao.kernels import cpu_native
from serq_ao.kernels.ops import int_row_weights, mxfp4_row_weights, padded_in_features
from serq_ao.kernels.reference import apply_pre_op, linear_on_weights
from serq_ao.quant.reconstruct import serq_reconstruct
from serq_ao.tensor_subclass import pack_weight


def available_kernels() -> list[str]:
    """The native paths this CPU runs (each is tested)."""
    best = cpu_native.cpu_best()
    return list(cpu_native.KERNELS[: cpu_native.KERNELS.index(best) + 1])


def packed_weight(fmt: str, d_in: int, d_out: int, rank: int, *, preop: bool = True, rotation: int = 0, seed: int = 0,
                  scale_mode: str = "floor", group_size: int | None = None):
    """A packed SERQ weight (the tensor subclass) of a random weight with an outlier column
    (``group_size``: an INT format's, instead of its default)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=g) * 0.1
    weight[:, 3 % d_in] *= 20
    quant_format = get_format(fmt, scale_mode)
    if group_size is not None:
        quant_format = dataclasses.replace(quant_format, group_size=group_size)
    if rotation:
        from serq_ao.formats.hadamard import rotate_weight

        weight = rotate_weight(weight, rotation)
    main, correction = serq_reconstruct(weight, rank, quant_format)
    scale_inv = torch.rand(d_in, generator=g) + 0.5 if preop else None
    perm = torch.randperm(d_in, generator=g) if preop else None
    return pack_weight(quant_format, main, correction, input_scale_inv=scale_inv, input_perm=perm, dtype=torch.float32,
                             rotation=rotation)


def random_input(shape, d_in: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    """Fresh data with salient channels (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d_in, generator=g) * 3
    x[..., 7 % d_in] *= 40
    x[..., (d_in - 1)] *= -25
    return x.to(dtype)


GEMM_PANELS = "panels"  # run_native's gemm: prepack the weight, then the *_panels op


def prepacked(packed, isa: int) -> torch.Tensor:
    """The packed weight's codes prepacked for path ``isa``."""
    if _is_mxfp4(packed):
        kp = padded_in_features(packed.shape[1])
        return cpu_native.prepack_weight(packed.qdata[:, : kp // 2], packed.qdata[:, kp // 2 :], 32, isa)
    return cpu_native.prepack_weight(packed.qdata, packed.correction_qdata, packed.group_size, isa)


def run_native(packed, x: torch.Tensor, bias, isa: int, gemm) -> torch.Tensor:
    if gemm == GEMM_PANELS:
        panels = prepacked(packed, isa)
        if _is_mxfp4(packed):
            return cpu_native.linear_mxfp4_panels(x, panels, cpu_native.prepack_e8m0(packed.scale, isa), packed.shape[0],
                                                  packed.shape[1], packed.rank,
                                                  packed.scale_mode, packed.input_scale_inv, packed.input_perm, bias,
                                                  packed.rotation, isa)
        rank = 0 if packed.correction_qdata is None else 2 * packed.correction_qdata.shape[1]
        return cpu_native.linear_int_panels(x, panels, packed.scale, packed.shape[1], packed.group_size, rank,
                                            packed.activation_bits, packed.correction_scale, packed.input_scale_inv,
                                            packed.input_perm, bias, packed.rotation, isa)
    if _is_mxfp4(packed):
        return cpu_native.linear_mxfp4(x, packed.qdata, packed.scale, packed.shape[1], packed.rank, packed.scale_mode,
                                       packed.input_scale_inv, packed.input_perm, bias, packed.rotation, isa, gemm)
    return cpu_native.linear_int(x, packed.qdata, packed.scale, packed.shape[1], packed.group_size,
                                 packed.activation_bits, packed.correction_qdata, packed.correction_scale,
                                 packed.input_scale_inv, packed.input_perm, bias, packed.rotation, isa, gemm)


def _is_mxfp4(packed) -> bool:
    return hasattr(packed, "scale_mode")


def reference_and_bound(packed, x: torch.Tensor, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """(the reference's float32 output, the allowed distance), both (..., N)."""
    d_in, n = packed.shape[1], packed.shape[0]
    x_hat = apply_pre_op(x, packed.input_scale_inv, packed.input_perm, packed.rotation)
    if _is_mxfp4(packed):
        x_q = fake_quantize_mxfp4(x_hat, packed.scale_mode)
        rank = packed.rank
        weights = mxfp4_row_weights(packed.qdata, packed.scale, d_in, rank)
        columns = padded_in_features(d_in) + rank
    else:
        x_q = fake_quantize_int(x_hat, packed.activation_bits, symmetric=False, granularity=packed.group_size)
        rank = 0 if packed.correction_qdata is None else 2 * packed.correction_qdata.shape[1]
        weights = int_row_weights(packed.qdata, packed.scale, d_in, packed.correction_qdata, packed.correction_scale)
        columns = padded_in_features(d_in, packed.group_size) + rank
    reference = linear_on_weights(x_q, n, d_in + rank, weights, bias)
    main, correction = weights(0, n)
    products = x_q.double().abs() @ main.double().abs().T
    if correction is not None:
        products += x_q[..., : correction.shape[1]].double().abs() @ correction.double().abs().T
    if bias is not None:
        products += bias.double().abs()
    return reference, cpu_native.error_bound(products, columns)
