"""transformers integration: ``save_pretrained`` / ``from_pretrained`` of packed SERQ models.

Importing serq_ao registers the quantization method ``"serq"``: a config
(:class:`SERQHfConfig`, written to config.json as ``quantization_config``) and an
:class:`SERQHfQuantizer`. Saving writes every packed weight as plain tensors
(``<linear>.weight_qdata``, ``<linear>.weight_scale``, ...) with its class and attributes in
the safetensors metadata (:mod:`serq_ao.tensor_subclass.flatten`). Loading first re-creates
the output wrappers that hold folded orders (:class:`OutputGather`), then a weight converter
gathers each linear's fields back into its packed weight.

transformers only knows "serq" once serq_ao has been imported: without the import it warns
"Unknown quantization type" and loads random weights, so import serq_ao first.
"""

from __future__ import annotations

import json
import logging

from safetensors import safe_open
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.integrations.accelerate import load_offloaded_parameter
from transformers.modeling_utils import remove_tied_weights_from_state_dict
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from serq_ao.quant.config import SERQConfig
from serq_ao.passes import OutputGather
from serq_ao.passes.transforms import replace_module
from serq_ao.tensor_subclass import PACKED_TENSOR_CLASSES
from serq_ao.tensor_subclass.common import field_names
from serq_ao.tensor_subclass.flatten import METADATA_MARK, build_packed, flatten_state_dict
from serq_ao.integrations.verify import (
    TENSOR_MANIFEST_KEY,
    check_config_agrees,
    check_expected_keys,
    check_output_gather,
    check_packed,
    fail_checkpoint,
    tensor_manifest,
    verify_tensors,
)

logger = logging.getLogger(__name__)

QUANT_METHOD = "serq"
# 1: the evaluation-mode folders of serq_ao.integrations.serialization; 2: packed, without the
# tensor manifest (refused: nothing in it can be verified)
FORMAT_VERSION = 3
# every field a packed weight may store, as "weight_<field>" in the checkpoint
SERIALIZED_FIELDS = sorted({f for cls in PACKED_TENSOR_CLASSES for f in field_names(cls)})


class SERQHfConfig(QuantizationConfigMixin):
    """``quantization_config`` of a packed SERQ model.

    - ``serq_config``: the :class:`SERQConfig` it was quantized with, as a dict.
    - ``output_gathers``: module name -> ``{"width": int, "buffers": [...]}`` for every norm
      (or other producer) wrapped in an :class:`OutputGather` holding a folded order.
    - ``packed_linears``: names of the linears whose weights are packed.
    """

    def __init__(self, serq_config: dict | None = None, output_gathers: dict | None = None,
                 packed_linears: list | None = None, format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        if format_version != FORMAT_VERSION:
            raise ValueError(f"this serq-ao reads quantization format {FORMAT_VERSION}, the checkpoint has format "
                             f"{format_version!r}" + (" (an older serq-ao, whose weights cannot be verified): re-quantize it"
                                                      if format_version in (1, 2) else ""))
        self.format_version = format_version
        self.serq_config = SERQConfig.from_dict(serq_config or {}).to_dict()  # validates
        self.output_gathers = dict(output_gathers or {})
        self.packed_linears = list(packed_linears or [])

    @classmethod
    def from_model(cls, model: nn.Module, config: SERQConfig) -> "SERQHfConfig":
        gathers, linears = {}, []
        for name, module in model.named_modules():
            if isinstance(module, OutputGather):
                gathers[name] = module.spec()
            elif isinstance(module, nn.Linear) and isinstance(module.weight, PACKED_TENSOR_CLASSES):
                linears.append(name)
        return cls(config.to_dict(), gathers, linears)


class SERQDeserialize(ConversionOps):
    """``{"weight_qdata": [t], "weight_scale": [t], ...}`` -> ``{"<linear>.weight": packed}``."""

    def __init__(self, hf_quantizer: "SERQHfQuantizer"):
        # the attribute name matters: transformers then leaves the float fields' dtype alone
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, source_patterns=None, model=None, full_layer_name=None, **kwargs):
        param = full_layer_name.rsplit(".", 1)[1]
        description = self.hf_quantizer.packed_descriptions.get(full_layer_name)
        if description is None:
            raise ValueError(f"the checkpoint has no packed-weight metadata for {full_layer_name}")
        fields = {key.removeprefix(f"{param}_"): tensors[0] for key, tensors in input_dict.items()}
        if self.hf_quantizer.load_dtype is not None:  # the logical dtype follows from_pretrained(dtype=...)
            description = {**description, "attributes": {**description["attributes"],
                                                         "dtype": str(self.hf_quantizer.load_dtype).removeprefix("torch.")}}
        return {full_layer_name: build_packed(description, fields)}  # checked before loading


class SERQHfQuantizer(HfQuantizer):
    """Loads and saves packed SERQ models (quantize with :func:`serq_ao.quantize_`)."""

    requires_calibration = True  # from_pretrained cannot quantize a float checkpoint by itself
    serialized_names = {"weight": [f"weight_{f}" for f in SERIALIZED_FIELDS]}

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.load_dtype = None
        self.packed_descriptions: dict[str, dict] = {}

    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("serq models cannot be offloaded to disk (device_map with 'disk')")

    def update_dtype(self, dtype):
        self.load_dtype = dtype  # not passed to the later hooks, so keep it
        return dtype

    def get_load_operations(self):
        return {"deserialize": SERQDeserialize}

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        # config.json's quantization_config must name modules of the model config.json builds
        modules = dict(model.named_modules())
        for what, names in (("output_gathers", self.quantization_config.output_gathers),
                            ("packed_linears", self.quantization_config.packed_linears)):
            unknown = [n for n in names if not isinstance(modules.get(n), nn.Module)]
            if unknown:
                fail_checkpoint("config.json", f"quantization_config.{what} names {unknown[0]}, which the model "
                                               "it describes does not have")
        # the model is still on the meta device: re-create the wrappers so that their keys exist
        for name, spec in self.quantization_config.output_gathers.items():
            replace_module(model, name, OutputGather.from_spec(model.get_submodule(name), spec))
        files = [str(p) for p in checkpoint_files or [] if str(p).endswith(".safetensors")]
        if not files:
            fail_checkpoint("checkpoint", "a packed serq checkpoint is stored as .safetensors files; found none")
        for path in files:
            try:
                with safe_open(path, framework="pt") as handle:
                    metadata = handle.metadata() or {}
                descriptions = {k: json.loads(t)[METADATA_MARK] for k, t in metadata.items() if METADATA_MARK in t}
            except Exception as e:  # noqa: BLE001 - safetensors and json raise their own types
                fail_checkpoint(path, f"not a readable serq safetensors file ({' '.join(str(e).split())[:160]})")
            self.packed_descriptions.update(descriptions)
        # before any weight is read into the model: every stored tensor is the one written,
        # and the model config.json builds expects exactly these
        stored = verify_tensors(files, on_tensor=self._packed_value_checker())
        described = set(self.packed_descriptions)
        declared = {f"{name}.weight" for name in self.quantization_config.packed_linears}
        if described != declared:
            odd = sorted(described ^ declared)[0]
            fail_checkpoint("checkpoint", f"{odd} is {'described as packed' if odd in described else 'declared packed'} "
                                          "in only one of the weights' metadata and config.json's packed_linears")
        check_expected_keys(model, stored, self.packed_descriptions)

    def _packed_value_checker(self):
        """``on_tensor`` for :func:`verify_tensors`: gathers each packed weight's fields as they
        are read and checks the weight once it is whole (fields are adjacent in key order)."""
        pending: dict[str, dict] = {}
        prefixes = {f"{key}_{field}": (key, field) for key, d in self.packed_descriptions.items() for field in d["fields"]}

        def on_tensor(name, tensor):
            if name not in prefixes:
                return
            key, field = prefixes[name]
            fields = pending.setdefault(key, {})
            fields[field] = tensor
            if len(fields) == len(self.packed_descriptions[key]["fields"]):
                try:
                    packed = build_packed(self.packed_descriptions[key], pending.pop(key))
                except (ValueError, TypeError, KeyError, AttributeError) as e:
                    fail_checkpoint(key, f"its packed-weight metadata cannot describe a weight ({e})")
                check_packed(key, packed)

        return on_tensor

    def _process_model_after_weight_loading(self, model, **kwargs):
        # save_pretrained would try to reverse our converters; get_state_dict_and_metadata
        # writes the flat format itself
        model._weight_conversions = [
            c for c in getattr(model, "_weight_conversions", [])
            if not any(isinstance(op, SERQDeserialize) for op in getattr(c, "operations", []))
        ]
        missing = [n for n in self.quantization_config.packed_linears
                   if not isinstance(model.get_submodule(n).weight, PACKED_TENSOR_CLASSES)]
        if missing:
            raise ValueError(f"the checkpoint did not provide packed weights for {missing[:3]} ({len(missing)} linears)")
        config = SERQConfig.from_dict(self.quantization_config.serq_config)
        for name in self.quantization_config.packed_linears:
            # transformers makes every floating parameter trainable; packed weights are not
            # (and AOTInductor refuses to lift their uint8 parts if they claim to be)
            weight = model.get_submodule(name).weight
            weight.requires_grad_(False)
            check_config_agrees(f"{name}.weight", weight, config)
        for name, module in model.named_modules():
            if isinstance(module, OutputGather):
                check_output_gather(name, module)
        model.serq_config = config
        return model

    def param_needs_quantization(self, model, param_name, **kwargs):
        module, _, param = param_name.rpartition(".")
        return param == "weight" and module in self.quantization_config.packed_linears

    def get_state_dict_and_metadata(self, model):
        tensors, metadata = flatten_state_dict(model.state_dict())
        # the tensors as they will be stored: transformers drops tied duplicates before writing
        # (save_pretrained reads the offloaded ones itself, shard by shard)
        metadata[TENSOR_MANIFEST_KEY] = tensor_manifest(remove_tied_weights_from_state_dict(dict(tensors), model),
                                                        values=lambda name: load_offloaded_parameter(model, name))
        return tensors, metadata

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False


def attach_quantizer(model: nn.Module, config: SERQConfig) -> None:
    """Make a model packed by :func:`serq_ao.quantize_` saveable with ``save_pretrained``,
    as if ``from_pretrained`` had loaded it."""
    hf_config = SERQHfConfig.from_model(model, config)
    model.config.quantization_config = hf_config
    model.hf_quantizer = SERQHfQuantizer(hf_config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def register() -> None:
    """Register "serq" with transformers (once; registering twice would raise)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SERQHfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SERQHfQuantizer)
