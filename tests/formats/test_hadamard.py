"""The block Hadamard rotation (serq_ao.formats.hadamard) against a dense float64 matrix, its
exactness on a linear, and the rotated models: quantized, packed, saved, reloaded."""

import math

import pytest
import torch
import torch.nn.functional as F

from serq_ao.formats.hadamard import (
    block_hadamard,
    check_rotation,
    rotate_hessian,
    rotate_weight,
    rotation_blocks,
)
from serq_ao.kernels.reference import apply_pre_op
from serq_ao.quant.config import SERQConfig

SHAPES = [(576, 128), (576, 32), (100, 32), (96, 64), (7, 32), (1536, 64)]


def sylvester(size: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard of ``size`` (a power of two), float64, by Kronecker products."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h / math.sqrt(size)


def dense_rotation(columns: int, size: int) -> torch.Tensor:
    """The block-diagonal matrix the module doc describes, built independently of the code
    under test: full blocks, then the tail's binary digits, largest first."""
    matrix = torch.zeros(columns, columns, dtype=torch.float64)
    start = 0
    while start < columns:
        block = size if columns - start >= size else 1 << ((columns - start).bit_length() - 1)
        matrix[start:start + block, start:start + block] = sylvester(block)
        start += block
    return matrix


def random_data(rows, columns, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=g, dtype=torch.float64) * torch.exp(torch.randn(columns, generator=g,
                                                                                                  dtype=torch.float64))


@pytest.mark.parametrize("columns, size", SHAPES)
def test_matches_the_dense_float64_matrix(columns, size):
    x = random_data(5, columns, seed=columns + size)
    expected = x @ dense_rotation(columns, size)
    assert torch.allclose(block_hadamard(x, size), expected, rtol=0, atol=1e-12 * x.abs().max().item())
    # float32 at run time: within float32's rounding of the float64 result
    got32 = block_hadamard(x.float(), size).double()
    assert (got32 - expected).abs().max() <= 1e-5 * x.abs().max()
    assert sum(b for _, b in rotation_blocks(columns, size)) == columns


def test_blocks_of_the_module_doc():
    assert rotation_blocks(576, 128) == [(0, 128), (128, 128), (256, 128), (384, 128), (512, 64)]
    assert rotation_blocks(100, 32) == [(0, 32), (32, 32), (64, 32), (96, 4)]
    assert rotation_blocks(7, 32) == [(0, 4), (4, 2), (6, 1)]


@pytest.mark.parametrize("columns, size", SHAPES)
def test_rotating_input_and_weight_leaves_the_linear_exact(columns, size):
    x = random_data(4, columns, seed=1)
    weight = random_data(24, columns, seed=2)
    rotated = block_hadamard(weight, size)
    assert torch.allclose(F.linear(block_hadamard(x, size), rotated), F.linear(x, weight), rtol=1e-10, atol=1e-10)
    assert rotate_weight(weight.float(), size).dtype == torch.float32
    assert torch.equal(rotate_weight(weight.float(), size), block_hadamard(weight.float().double(), size).float())
    assert torch.allclose(block_hadamard(block_hadamard(x, size), size), x, atol=1e-12)  # symmetric, orthonormal


@pytest.mark.parametrize("columns, size", SHAPES)
def test_the_rotated_hessian_is_the_hessian_of_the_rotated_input(columns, size):
    x = random_data(3 * columns, columns, seed=3)
    hessian = x.T @ x
    rotated_x = x @ dense_rotation(columns, size)
    assert torch.allclose(rotate_hessian(hessian, size), rotated_x.T @ rotated_x, rtol=1e-9,
                          atol=1e-9 * hessian.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_pre_op_rotates_last_in_float32(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 200, generator=g).to(dtype)
    scale_inv, perm = torch.rand(200, generator=g) + 0.5, torch.randperm(200, generator=g)
    got = apply_pre_op(x, scale_inv, perm, 64)
    assert got.dtype == torch.float32
    assert torch.equal(got, block_hadamard((x.float() * scale_inv)[..., perm], 64))
    assert torch.equal(apply_pre_op(x, scale_inv, perm), (x.float() * scale_inv)[..., perm])


def test_rotation_values_are_checked_with_the_option_named():
    for bad in (16, 256, -32, True, 32.0, "32"):
        with pytest.raises(ValueError, match=r"rotation must be one of \(0, 32, 64, 128\)"):
            check_rotation(bad)
        with pytest.raises(ValueError, match="rotation must be one of"):
            SERQConfig(rotation=bad)
    with pytest.raises(ValueError, match="rotation applies to methods"):
        SERQConfig(method="l2qer", rotation=32)
    assert SERQConfig.from_dict(SERQConfig(rotation=64).to_dict()).rotation == 64
    assert SERQConfig.from_dict({k: v for k, v in SERQConfig().to_dict().items() if k != "rotation"}).rotation == 0


CALIBRATION = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))


def _quantized(config, dtype=torch.float32):
    import serq_ao
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama().to(dtype)
    serq_ao.quantize_model(model, config, CALIBRATION)  # evaluation mode: FakeQuantLinear
    return model


@pytest.mark.parametrize("config", [SERQConfig(rank=32, rotation=32), SERQConfig(method="rtn", rotation=64),
                                    SERQConfig(format="w4a8", rank=32, rotation=128),
                                    SERQConfig(rank=32, rotation=32, gptq=True),
                                    SERQConfig(rank=32, rotation=32, gptq=True, gptq_order="hessian",
                                               flattening_strength=0.0),
                                    SERQConfig(rank=32, rotation=32, gptq=True, gptq_order="hessian",
                                               flattening_strength=0.0, saliency_unit="block")], ids=str)
def test_quantized_linears_compute_the_float64_rotated_reference(config):
    """Each quantized linear: its weights are the format's codes of W H (for SERQ: W~[:, pi] H),
    its input x^ H, quantized; checked against a dense float64 H on the layer's real input."""
    from serq_ao.quant.fake_quant import FakeQuantLinear

    model = _quantized(config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert linears and all(m.rotation == config.rotation for m in linears.values())
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, args[0]))
             for n, m in linears.items()]
    with torch.no_grad():
        model(IDS)
    for hook in hooks:
        hook.remove()
    fmt = config.quant_format
    for name, linear in linears.items():
        x_hat = apply_pre_op(inputs[name], linear.input_scale_inv, linear.input_perm).double()
        rotated = (x_hat @ dense_rotation(linear.in_features, config.rotation)).float()
        x_q = fmt.fake_quantize_activation(rotated).double()
        expected = x_q @ linear.weight.double().T
        if linear.correction is not None:
            expected += x_q[..., : linear.rank] @ linear.correction.double().T
        with torch.no_grad():
            got = linear(inputs[name]).double()
        # the float32 butterfly and the float64 matrix may round one activation across a grid
        # point; nearly all outputs agree to float32 precision
        close = (got - expected).abs() <= 1e-4 * expected.abs().max()
        assert close.float().mean() > 0.97, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt, rotation", [("mxfp4", 32), ("mxfp4", 128), ("w4a4", 64)])
def test_packed_rotated_model_saves_and_reloads_bitwise(tmp_path, dtype, fmt, rotation, monkeypatch):
    from transformers import AutoModelForCausalLM

    import serq_ao
    from tests.conftest import make_tiny_llama

    make_tiny_llama().save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=dtype)
    reference = _quantized(SERQConfig(format=fmt, rank=32, rotation=rotation))
    serq_ao.quantize_(model, SERQConfig(format=fmt, rank=32, rotation=rotation), CALIBRATION)
    weights = [p for p in model.parameters() if hasattr(p, "rotation")]
    assert weights and {w.rotation for w in weights} == {rotation}
    with torch.no_grad():
        logits = model(IDS).logits
        if dtype == torch.float32:  # the packed op's reference computes what the evaluation mode computes
            with monkeypatch.context() as env:
                env.setenv("SERQ_CPU_KERNEL", "reference")
                assert torch.equal(model(IDS).logits, reference(IDS).logits)
    model.save_pretrained(tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert back.serq_config.rotation == rotation
    assert {p.rotation for p in back.parameters() if hasattr(p, "rotation")} == {rotation}
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, logits)


@pytest.mark.parametrize("value", [48, 32.0, "32"])
def test_rotation_changes_the_result_and_a_folder_that_lies_about_it_is_refused(tmp_path, value):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    import serq_ao
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    serq_ao.quantize_(model, SERQConfig(rank=32, rotation=32), CALIBRATION)
    plain = make_tiny_llama()
    serq_ao.quantize_(plain, SERQConfig(rank=32), CALIBRATION)
    with torch.no_grad():
        assert not torch.equal(model(IDS).logits, plain(IDS).logits)
    model.save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    key = next(k for k, v in metadata.items() if "serq_packed" in v)
    edited = json.loads(metadata[key])
    edited["serq_packed"]["attributes"]["rotation"] = value
    save_file(tensors, str(path), metadata={**metadata, key: json.dumps(edited)})
    with pytest.raises(Exception, match="rotation"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_cli_option(tiny_model_dir, tmp_path, capsys):
    import json

    from serq_ao.cli.main import main

    argv = ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "q"), "--rank", "32", "--calib-samples", "2",
            "--calib-seqlen", "32", "--no-diagnostics", "--quiet", "--rotation", "32"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "q" / "serq_report.json").read_text())["report"]["config"]["rotation"] == 32
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["quantize", str(tiny_model_dir), "-o", str(tmp_path / "r"), "--rotation", "48", "--quiet"])
    assert "--rotation: invalid choice: 48" in capsys.readouterr().err
    assert main(["quantize", str(tiny_model_dir), "-o", str(tmp_path / "r"), "--method", "l2qer", "--rotation", "32",
                 "--quiet"]) == 2
    assert "--rotation applies to methods rtn, smoothquant and serq only" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8"])
def test_a_rotated_packed_model_exports_and_compiles_to_the_eager_logits(fmt):
    """The rotation is an argument of the one serq op per linear: export keeps the op, and
    Inductor's C++ code for the CPU reference gives the eager logits."""
    import serq_ao
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    serq_ao.quantize_(model, SERQConfig(format=fmt, rank=32, rotation=64), CALIBRATION)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids, use_cache=False).logits

    wrapped = Logits(model)
    with torch.no_grad():
        eager = wrapped(IDS)
        program = torch.export.export(wrapped, (IDS,))
        ops = [n for n in program.graph.nodes if n.op == "call_function" and "serq.linear" in str(n.target)]
        assert len(ops) == 14 and all(n.kwargs.get("rotation", n.args[-1] if n.args else None) == 64 for n in ops)
        assert torch.equal(program.module()(IDS), eager)
        torch._dynamo.reset()
        compiled = torch.compile(wrapped, fullgraph=True)(IDS)
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-4)
