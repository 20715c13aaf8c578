"""transformers integration: ``save_pretrained`` / ``from_pretrained`` of packed SERQ models.

A packed folder's config.json holds ``TorchAoConfig(SERQCheckpointConfig(...))`` (why torchao's
method: :mod:`serq_ao.integrations.checkpoint_config`); importing serq_ao lets
:mod:`serq_ao.integrations.torchao_route` hand such configs to :class:`SERQHfQuantizer`.
Folders of format 3 (quant_method "serq", :class:`SERQHfConfig`) still load.

Saving writes every packed weight as plain tensors (``<linear>.weight_qdata``,
``<linear>.weight_scale``, ...) with its class and attributes in the safetensors metadata
(:mod:`serq_ao.tensor_subclass.flatten`). Loading first re-creates the output wrappers that
hold folded orders (:class:`OutputGather`), then a weight converter gathers each linear's
fields back into its packed weight.
"""

from __future__ import annotations

import logging

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
from transformers.utils.quantization_config import QuantizationConfigMixin, TorchAoConfig

from serq_ao.quant.config import SERQConfig
from serq_ao.quant.embeddings import quantized_embedding_names
from serq_ao.quant.experts import has_unfused_experts, merges_experts, unfuse_experts
from serq_ao.passes import OutputGather
from serq_ao.passes.transforms import replace_module
from serq_ao.tensor_subclass import PACKED_TENSOR_CLASSES, TABLE_TENSOR_CLASSES
from serq_ao.tensor_subclass.common import field_names
from serq_ao.tensor_subclass.flatten import build_packed, flatten_state_dict
from serq_ao.integrations.checkpoint_config import (
    LEGACY_FORMAT_VERSION,
    LEGACY_QUANT_METHOD,
    SERQCheckpointConfig,
    check_format_version,
)
from serq_ao.integrations.packed_folder import verify_packed_folder
from serq_ao.integrations.verify import (
    CONFIG_RECORD_KEY,
    TENSOR_MANIFEST_KEY,
    check_config_agrees,
    check_expected_keys,
    check_output_gather,
    config_record,
    fail_checkpoint,
    tensor_manifest,
)

logger = logging.getLogger(__name__)

# every field a packed weight may store, as "weight_<field>" in the checkpoint
SERIALIZED_FIELDS = sorted({f for cls in PACKED_TENSOR_CLASSES for f in field_names(cls)})


class SERQHfConfig(QuantizationConfigMixin):
    """``quantization_config`` of a packed folder of format 3 (quant_method "serq"), read so
    that those folders still load; new folders are written with :class:`SERQCheckpointConfig`
    (same fields)."""

    def __init__(self, serq_config: dict | None = None, output_gathers: dict | None = None,
                 packed_linears: list | None = None, format_version: int = LEGACY_FORMAT_VERSION, **kwargs):
        self.quant_method = LEGACY_QUANT_METHOD
        check_format_version(format_version, LEGACY_FORMAT_VERSION)
        self.format_version = format_version
        self.serq_config = SERQConfig.from_dict(serq_config or {}).to_dict()  # validates
        self.output_gathers = dict(output_gathers or {})
        self.packed_linears = list(packed_linears or [])
        self.packed_embeddings = []  # format 3 predates quantized tables


def checkpoint_config(model: nn.Module, config: SERQConfig) -> TorchAoConfig:
    """The ``quantization_config`` that describes ``model`` packed with ``config``."""
    gathers, linears = {}, []
    for name, module in model.named_modules():
        if isinstance(module, OutputGather):
            gathers[name] = module.spec()
        elif isinstance(module, nn.Linear) and isinstance(module.weight, PACKED_TENSOR_CLASSES):
            linears.append(name)
    return packed_folder_config(config, gathers, linears, quantized_embedding_names(model))


def packed_folder_config(config: SERQConfig, output_gathers: dict, packed_linears: list,
                         packed_embeddings: list) -> TorchAoConfig:
    """config.json's ``quantization_config`` of a packed folder."""
    return TorchAoConfig(SERQCheckpointConfig(config.to_dict(), dict(output_gathers), list(packed_linears),
                                              packed_embeddings=list(packed_embeddings)))


def store_under_model_names(model: nn.Module) -> None:
    """A packed folder stores every tensor under the model's own name (what its serq_tensors
    manifest lists and the streamed writer writes), so save_pretrained must not revert
    transformers' load-time renames and merges (Mixtral's mlp -> block_sparse_moe, experts
    fused on load) nor our converters: it gets nothing to revert."""
    model._weight_conversions = []


def without_tied_tables(model: nn.Module, state: dict) -> dict:
    """``state`` without the tied names of a quantized table (a tied head's ``lm_head.weight``):
    the table is stored and described once, under the embedding, as transformers stores a tied
    float weight (which it finds by storage pointer, and a tensor subclass has none)."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    held = model.state_dict(keep_vars=True)
    kept = {id(t) for name, t in held.items() if isinstance(t, TABLE_TENSOR_CLASSES) and name not in tied}
    return {k: v for k, v in state.items()
            if not (k in tied and isinstance(held.get(k), TABLE_TENSOR_CLASSES) and id(held[k]) in kept)}


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

    def __init__(self, quantization_config: TorchAoConfig | SERQHfConfig, **kwargs):
        if not kwargs.get("pre_quantized", True):
            raise ValueError("a serq checkpoint config describes a folder serq-ao wrote; it cannot quantize a float "
                             "model: quantize on load with TorchAoConfig(SERQLinearConfig(...)), or with serq_ao.quantize_")
        super().__init__(quantization_config, **kwargs)
        self.load_dtype = None
        self.packed_descriptions: dict[str, dict] = {}

    @property
    def checkpoint(self) -> SERQCheckpointConfig | SERQHfConfig:
        """The serq fields (serq_config, output_gathers, packed_linears, packed_embeddings) of either config."""
        if isinstance(self.quantization_config, TorchAoConfig):
            return self.quantization_config.quant_type
        return self.quantization_config

    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("serq models cannot be offloaded to disk (device_map with 'disk')")

    def update_dtype(self, dtype):
        self.load_dtype = dtype  # not passed to the later hooks, so keep it
        return dtype

    def get_load_operations(self):
        return {"deserialize": SERQDeserialize}

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        unfuse_experts(model)  # serq stores MoE experts one linear per projection, as it quantized them
        # config.json's quantization_config must name modules of the model config.json builds
        modules = dict(model.named_modules())
        for what, names, kind in (("output_gathers", self.checkpoint.output_gathers, nn.Module),
                                  ("packed_linears", self.checkpoint.packed_linears, nn.Module),
                                  ("packed_embeddings", self.checkpoint.packed_embeddings, nn.Embedding)):
            unknown = [n for n in names if not isinstance(modules.get(n), kind)]
            if unknown:
                fail_checkpoint("config.json", f"quantization_config.{what} names {unknown[0]}, which the model "
                                               f"it describes does not have (as an {kind.__name__})")
        # the model is still on the meta device: re-create the wrappers so that their keys exist
        for name, spec in self.checkpoint.output_gathers.items():
            replace_module(model, name, OutputGather.from_spec(model.get_submodule(name), spec))
        # before any weight is read into the model: every stored tensor is the one written,
        # and the model config.json builds expects exactly these
        stored, self.packed_descriptions = verify_packed_folder(checkpoint_files or [], self.checkpoint.packed_linears,
                                                                packed_embeddings=self.checkpoint.packed_embeddings)
        check_expected_keys(model, stored, self.packed_descriptions)

    def update_weight_conversions(self, weight_conversions, model):
        # transformers merges per-expert checkpoint tensors into the fused 3-D parameters;
        # this model keeps them per expert (unfused above), under their stored names
        if has_unfused_experts(model):
            weight_conversions = [c for c in weight_conversions if not merges_experts(c)]
        return super().update_weight_conversions(weight_conversions, model)

    def _process_model_after_weight_loading(self, model, **kwargs):
        store_under_model_names(model)
        missing = [n for n in self.checkpoint.packed_linears
                   if not isinstance(model.get_submodule(n).weight, PACKED_TENSOR_CLASSES)]
        missing += [n for n in self.checkpoint.packed_embeddings
                    if not isinstance(model.get_submodule(n).weight, TABLE_TENSOR_CLASSES)]
        if missing:
            raise ValueError(f"the checkpoint did not provide packed weights for {missing[:3]} ({len(missing)} modules)")
        config = SERQConfig.from_dict(self.checkpoint.serq_config)
        for name in self.checkpoint.packed_embeddings:
            model.get_submodule(name).weight.requires_grad_(False)
        for name in self.checkpoint.packed_linears:
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
        return param == "weight" and (module in self.checkpoint.packed_linears
                                      or module in self.checkpoint.packed_embeddings)

    def get_state_dict_and_metadata(self, model):
        tensors, metadata = flatten_state_dict(without_tied_tables(model, model.state_dict()))
        # the tensors as they will be stored: transformers drops tied duplicates before writing
        # (save_pretrained reads the offloaded ones itself, shard by shard)
        metadata[TENSOR_MANIFEST_KEY] = tensor_manifest(remove_tied_weights_from_state_dict(dict(tensors), model),
                                                        values=lambda name: load_offloaded_parameter(model, name))
        metadata[CONFIG_RECORD_KEY] = config_record(model.config)
        return tensors, metadata

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False


def attach_quantizer(model: nn.Module, config: SERQConfig) -> None:
    """Make a model packed by :func:`serq_ao.quantize_` saveable with ``save_pretrained``,
    as if ``from_pretrained`` had loaded it."""
    hf_config = checkpoint_config(model, config)
    model.config.quantization_config = hf_config
    model.hf_quantizer = SERQHfQuantizer(hf_config, pre_quantized=True)
    store_under_model_names(model)
    model.is_quantized = True
    model.quantization_method = hf_config.quant_method
    model.serq_config = config


def register_legacy() -> None:
    """Register "serq" (format 3 folders) with transformers (once; twice would raise)."""
    if LEGACY_QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(LEGACY_QUANT_METHOD)(SERQHfConfig)
    if LEGACY_QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(LEGACY_QUANT_METHOD)(SERQHfQuantizer)
