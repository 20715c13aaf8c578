"""An evaluation-mode linear and the packed nn.Linear built from the same records."""

import torch

from serq_ao.formats import get_format
from serq_ao.quant.fake_quant import FakeQuantLinear
from serq_ao.quant.packing import packed_linear
from serq_ao.quant.reconstruct import serq_reconstruct
from serq_ao.tensor_subclass import pack_weight

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_pair(fmt="w4a8", d_in=200, d_out=48, rank=32, preop=True, bias=True, seed=0, dtype=torch.float32,
              scale_mode="floor"):
    """(FakeQuantLinear, packed nn.Linear) of one random weight in ``dtype`` (the model's)."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(d_out, d_in, generator=g) * 0.1).to(dtype)
    weight[:, 3] *= 20  # an outlier column
    quant_format = get_format(fmt, scale_mode)
    main, correction = serq_reconstruct(weight.float(), rank, quant_format)
    scale_inv = torch.rand(d_in, generator=g) + 0.5 if preop else None
    perm = torch.randperm(d_in, generator=g) if preop else None
    b = (torch.randn(d_out, generator=g)).to(dtype) if bias else None
    fake = FakeQuantLinear(main, correction, b, quant_format=quant_format, model_dtype=dtype,
                           input_scale_inv=scale_inv, input_perm=perm)
    packed = packed_linear(pack_weight(quant_format, main, correction, input_scale_inv=scale_inv, input_perm=perm,
                                             dtype=dtype), b)
    return fake, packed


def random_input(d_in, dtype, seed=1, shape=(3, 5)):
    x = torch.randn(*shape, d_in, generator=torch.Generator().manual_seed(seed)) * 3
    x[..., 7] *= 40  # a salient channel
    return x.to(dtype)


def assert_native_within_bound(native, packed, x):
    """``native`` (the packed linear on the native CPU kernels) is the reference up to the bound
    of :mod:`serq_ao.kernels.cpu_native`, plus the rounding of the result to the model's dtype."""
    from tests.kernels.native_cases import reference_and_bound

    reference, bound = reference_and_bound(packed.weight, x, None if packed.bias is None else packed.bias.float())
    dtype = native.dtype
    half_ulp = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    allowed = bound + 2 * half_ulp * reference.double().abs()
    assert ((native.double() - reference.to(dtype).double()).abs() <= allowed).all()
