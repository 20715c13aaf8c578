"""Save a quantized model to a folder and load it back as the same model.

Two kinds of folder, both Hugging Face folders (config.json, tokenizer files, safetensors),
both written under the rules of :mod:`serq_ao.files` (a temporary folder beside the
destination, a manifest of every file written last, then an atomic swap):

- packed (:func:`serq_ao.quantize_`): written by ``save_pretrained`` with serq's quantizer
  (:mod:`serq_ao.integrations.hf_quantizer`); ``config.json`` holds the
  ``quantization_config`` and ``AutoModelForCausalLM.from_pretrained`` loads it (with serq_ao
  imported; without, it raises an error naming serq_ao). ``serq_report.json`` records how it
  was made.
- evaluation mode (format 1, :func:`serq_ao.quantize_model`, needed for LQER / L2QER, which
  have no packed format): dequantized weights in ``model.safetensors`` and
  ``serq_config.json`` describing which modules were replaced, so that the architecture can
  be rebuilt before the state is loaded. config.json's ``quantization_config`` only marks the
  folder, so that ``from_pretrained`` refuses it (the weights alone would load as a wrong
  model) and points at :func:`load_quantized`.

Which of the two a folder is, and why config.json is written as it is:
:mod:`serq_ao.integrations.checkpoint_config`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TorchAoConfig
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from serq_ao.formats import get_format
from serq_ao.formats.hadamard import check_rotation
from serq_ao.quant.config import SERQConfig
from serq_ao.quant.experts import unfuse_experts
from serq_ao.files import TOKENIZER_FILES, Output, claim_output, strict_json
from serq_ao.integrations.checkpoint_config import (
    LEGACY_QUANT_METHOD,
    PACKED_TYPE,
    SERQEvaluationCheckpointConfig,
    serq_checkpoint_type,
)
from serq_ao.integrations.hf_quantizer import attach_quantizer
from serq_ao.integrations.verify import (
    CONFIG_RECORD_KEY,
    TENSOR_MANIFEST_KEY,
    CheckpointError,
    check_config_record,
    check_expected_keys,
    check_order,
    check_output_gather,
    config_record,
    tensor_manifest,
    verify_files,
    verify_tensors,
)
from serq_ao.quant.packing import is_packed_linear
from serq_ao.passes import OutputGather
from serq_ao.passes.transforms import replace_module
from serq_ao.quant.fake_quant import FakeQuantLinear

QUANTIZATION_FILE = "serq_config.json"
REPORT_FILE = "serq_report.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def is_packed_folder(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        quantization = json.loads(config.read_text()).get("quantization_config") or {}
    except ValueError:
        return False
    return serq_checkpoint_type(quantization) in (PACKED_TYPE, LEGACY_QUANT_METHOD)


def is_quantized_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / QUANTIZATION_FILE).is_file() or is_packed_folder(path)


def _structure(model: nn.Module) -> dict[str, dict]:
    structure = {}
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantLinear):
            structure[name] = {
                "kind": "fake_quant_linear",
                "in_features": module.in_features,
                "out_features": module.out_features,
                "rank": module.rank,
                "format": str(module.quant_format.name),
                "scale_mode": str(getattr(module.quant_format, "scale_mode", "floor")),
                "buffers": [b for b in ("bias", "input_scale_inv", "input_perm") if getattr(module, b) is not None],
                "lowrank": 0 if module.lowrank_b is None else module.lowrank_b.shape[0],
                "rotation": module.rotation,
            }
        elif isinstance(module, OutputGather):
            structure[name] = {"kind": "output_gather", **module.spec()}
    return structure


def save_quantized(model: nn.Module, tokenizer, out: str | os.PathLike | Output, config: SERQConfig,
                   extra: dict | None = None, *, overwrite: bool = False) -> Path:
    """Write the quantized ``model`` (packed or evaluation mode) and its tokenizer to ``out``,
    under the rules of :mod:`serq_ao.files`: a new or empty folder, or (with ``overwrite``) an
    earlier serq output holding nothing but what its manifest lists; replaced atomically.
    ``out`` may be an :class:`~serq_ao.files.Output` already claimed by the caller."""
    if isinstance(out, Output):
        with out.write(kind="quantized model") as tmp:
            write_quantized(model, tokenizer, tmp, config, extra)
        return out.path
    with claim_output(out, option="out", overwrite=overwrite) as output:
        return save_quantized(model, tokenizer, output, config, extra)


def write_quantized(model: nn.Module, tokenizer, folder: Path, config: SERQConfig, extra: dict | None = None) -> None:
    """Write the files of a quantized model into the (empty, temporary) ``folder``."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if any(is_packed_linear(m) for m in model.modules()):
        if getattr(model, "hf_quantizer", None) is None:
            attach_quantizer(model, config)
        model.save_pretrained(folder)
        (folder / REPORT_FILE).write_text(strict_json(extra or {}, indent=1))
        return
    config_json = copy.deepcopy(model.config)
    config_json.quantization_config = TorchAoConfig(SERQEvaluationCheckpointConfig())
    config_json.save_pretrained(folder)
    # tied duplicates dropped as transformers does, so the manifest names what is stored
    state = {k: v.contiguous() for k, v in remove_tied_weights_from_state_dict(model.state_dict(), model).items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", TENSOR_MANIFEST_KEY: tensor_manifest(state),
                                                           CONFIG_RECORD_KEY: config_record(config_json)})
    meta = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "structure": _structure(model),
        **(extra or {}),
    }
    (folder / QUANTIZATION_FILE).write_text(strict_json(meta, indent=1))


def read_report(path: str | os.PathLike) -> dict:
    """What ``save_quantized`` recorded next to the weights (its ``extra``: source, calibration,
    report, storage, diagnostics); {} where nothing was recorded."""
    path = Path(path)
    if is_packed_folder(path):
        report = path / REPORT_FILE
        return json.loads(report.read_text()) if report.is_file() else {}
    meta = json.loads((path / QUANTIZATION_FILE).read_text())
    return {k: v for k, v in meta.items() if k not in ("format_version", "config", "structure")}


def _placeholder(spec: dict, parent: nn.Module | None) -> nn.Module:
    if spec["kind"] == "fake_quant_linear":
        buffers = set(spec["buffers"])
        return FakeQuantLinear.placeholder(
            spec["in_features"], spec["out_features"], spec["rank"], get_format(spec["format"], spec["scale_mode"]),
            bias="bias" in buffers, pre_op=("input_scale_inv" in buffers, "input_perm" in buffers),
            lowrank=spec.get("lowrank", 0),
            rotation=check_rotation(spec.get("rotation", 0), f"{QUANTIZATION_FILE}'s rotation"),
        )
    if spec["kind"] == "output_gather":
        return OutputGather.from_spec(parent, spec)
    raise ValueError(f"unknown module kind {spec['kind']!r} in {QUANTIZATION_FILE}")


def load_quantized(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, *,
                   trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` saved by :func:`save_quantized`, in eval mode, in ``dtype``
    ("auto": the dtype the model was saved in); the tokenizer is None where the folder holds
    none (a model saved with ``save_pretrained`` alone)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    # every file against the manifest the save wrote; the weights are checked tensor by tensor,
    # so only their sizes here. First, so that a config.json edited past what transformers can
    # build is named as edited (serq's quantizer checks it again for any from_pretrained)
    verify_files(path, hash_weights=False)
    if is_packed_folder(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code).eval()
        return model, _tokenizer(path, trust_remote_code)
    meta = json.loads((path / QUANTIZATION_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} was written by an incompatible serq-ao (format {meta.get('format_version')})")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    config.__dict__.pop("quantization_config", None)  # the marker of this format, not a quantizer to run
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    unfuse_experts(model)  # MoE experts were quantized (and stored) one linear per projection
    for name, spec in meta["structure"].items():
        replace_module(model, name, _placeholder(spec, model.get_submodule(name)))
    check_config_record(path, [path / WEIGHTS_FILE])
    stored = verify_tensors([path / WEIGHTS_FILE])
    check_expected_keys(model, stored, {})
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=False)  # tied weights: via their source
    except RuntimeError as e:  # a shape that disagrees with config.json; torch lists them over many lines
        raise CheckpointError(f"{path / WEIGHTS_FILE}: its tensors do not fit the model config.json describes "
                              f"({' '.join(str(e).split())[:300]})") from None
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantLinear):
            check_order(name, module.input_perm, module.in_features)
        elif isinstance(module, OutputGather):
            check_output_gather(name, module)
    model.eval()
    model.serq_config = SERQConfig.from_dict(meta["config"])
    return model, _tokenizer(path, trust_remote_code)


def _tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
