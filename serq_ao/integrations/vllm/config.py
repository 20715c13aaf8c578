"""vLLM's quantization config "serq": which layers are packed, and the folder's checks.

A packed folder's config.json names torchao's method with serq's checkpoint type
(:mod:`serq_ao.integrations.checkpoint_config`); :meth:`SERQVllmConfig.override_quantization_method`
claims such folders for "serq" before vLLM's own torchao method sees them (vLLM asks plugin
methods first).

What the packed transformers model computes, vLLM computes:

- packed linears: :class:`~serq_ao.integrations.vllm.linear.SERQLinearMethod`, one per vLLM
  layer (merged projections included); a merged layer of packed and float projections is
  refused;
- norms wrapped in an ``OutputGather`` (their folded saliency order): the order goes to the
  layer that reads the norm (:data:`NORM_READERS`, Llama-style decoder layers), whose
  projections have no pre-op of their own; the norm's weight loads as vLLM's norm weight.
  A norm whose reader vLLM's model code does not name the same way is refused at load;
- lm_head (``quantize_lm_head``): packed like any linear (serq unties it from the
  embeddings, and config.json says so);
- an int8 embedding table (``embeddings="int8"``, config.json's ``packed_embeddings``):
  :class:`~serq_ao.integrations.vllm.embedding.SERQEmbeddingMethod`, for the embedding and for
  a head tied to it;
- MoE experts: refused, in one line naming the layer.

Before the model is built, :meth:`maybe_update_config` runs the checks serq's own loader
runs (:func:`~serq_ao.integrations.packed_folder.verify_packed_folder`): a damaged or edited
folder is refused with the same line.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

from serq_ao.integrations.checkpoint_config import (
    EVALUATION_TYPE,
    FORMAT_VERSION,
    LEGACY_FORMAT_VERSION,
    LEGACY_QUANT_METHOD,
    PACKED_TYPE,
    check_format_version,
    checkpoint_fields,
    serq_checkpoint_type,
)
from serq_ao.integrations.packed_folder import verify_packed_folder
from serq_ao.integrations.verify import check_config_agrees
from serq_ao.integrations.vllm.embedding import SERQEmbeddingMethod
from serq_ao.integrations.vllm.linear import GATHER_FIELDS, GATHER_PARAMETER, SERQLinearMethod
from serq_ao.quant.config import SERQConfig

logger = logging.getLogger(__name__)

METHOD = "serq"
# a norm's last name -> the vLLM layer (relative to the norm's parent) that reads its output
NORM_READERS = {"input_layernorm": "self_attn.qkv_proj", "post_attention_layernorm": "mlp.gate_up_proj"}


class PluginError(ValueError):
    """What the plugin cannot serve; the message names the layer and why."""


class SERQVllmConfig(QuantizationConfig):
    """The "serq" method: a packed serq folder's ``quantization_config``, read by vLLM."""

    def __init__(self, serq_config: dict, output_gathers: dict, packed_linears: list,
                 packed_embeddings: list | None = None):
        super().__init__()
        self.packed_embeddings = list(packed_embeddings or [])
        self.tied_head = False  # config.json's tie_word_embeddings, read in maybe_update_config
        self.serq_config = SERQConfig.from_dict(serq_config)  # validates
        self.output_gathers = dict(output_gathers)
        self.packed_linears = list(packed_linears)
        self.descriptions: dict[str, dict] = {}  # "<linear>.weight" -> packed description, from the headers
        self.readers = {name: norm_reader(name) for name in self.output_gathers}  # norm -> vLLM layer

    def __repr__(self) -> str:
        return (f"SERQVllmConfig(format={self.serq_config.format.value}, rank={self.serq_config.rank}, "
                f"packed_linears={len(self.packed_linears)})")

    @classmethod
    def get_name(cls) -> str:
        return METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the Triton kernels' tensor-core paths; CPUs report no capability

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SERQVllmConfig":
        kind = serq_checkpoint_type(config)
        if kind not in (PACKED_TYPE, LEGACY_QUANT_METHOD):
            raise PluginError(refusal(config))
        fields = checkpoint_fields(config)
        check_format_version(fields.get("format_version"),
                             LEGACY_FORMAT_VERSION if kind == LEGACY_QUANT_METHOD else FORMAT_VERSION)
        return cls(fields.get("serq_config") or {}, fields.get("output_gathers") or {},
                   fields.get("packed_linears") or [], fields.get("packed_embeddings") or [])

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        kind = serq_checkpoint_type(hf_quant_cfg)
        if kind == EVALUATION_TYPE:
            raise PluginError(refusal(hf_quant_cfg))
        if kind is None or user_quant not in (None, METHOD):
            return None
        return METHOD

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        folder = resolve_folder(model_name, revision)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({str(folder / f) for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(str(p) for p in folder.glob("*.safetensors"))
        _, self.descriptions = verify_packed_folder(
            files, self.packed_linears, on_weight=lambda name, weight: check_config_agrees(name, weight, self.serq_config),
            packed_embeddings=self.packed_embeddings)
        text_config = hf_config.get_text_config() if hf_config is not None else None
        self.tied_head = bool(getattr(text_config, "tie_word_embeddings", False))

    def get_checkpoint_weight_mapper(self):
        """The wrapped norms' tensors to where vLLM's model has them: ``<norm>.inner.weight``
        -> ``<norm>.weight``; ``<norm>.perm`` / ``.scale_inv`` -> parameters of its reader."""
        from vllm.model_executor.models.utils import WeightsMapper

        regex = {}
        for norm, reader in self.readers.items():
            regex[re.compile(rf"^{re.escape(norm)}\.inner\.")] = f"{norm}."
            for field in GATHER_FIELDS:
                regex[re.compile(rf"^{re.escape(norm)}\.{field}$")] = f"{reader}.{GATHER_PARAMETER.format(field)}"
        return super().get_checkpoint_weight_mapper() | WeightsMapper(orig_to_new_regex=regex)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.fused_moe import RoutedExperts

        if isinstance(layer, RoutedExperts):
            # serq stores experts one linear per projection under transformers' names, which
            # vLLM's fused expert layers do not share: any packed expert refuses the model
            experts = [name for name in self.packed_linears if ".experts." in name]
            if experts:
                raise PluginError(f"serq: {prefix} is a mixture-of-experts layer and the folder packs its experts "
                                  f"({experts[0]} and {len(experts) - 1} more), which the vLLM plugin does not serve "
                                  "yet (serve the model with serq_ao and transformers)")
            return None
        if isinstance(layer, VocabParallelEmbedding) and not isinstance(layer, ParallelLMHead):
            # vLLM's models build their token embedding without a prefix (Llama: ""), so an
            # unnamed one is the folder's one table; a second unnamed table would fail to load
            # (its float weight is not stored), never serve wrong
            named = prefix in self.packed_embeddings or (not prefix and len(self.packed_embeddings) == 1)
            return SERQEmbeddingMethod() if named else None
        if isinstance(layer, ParallelLMHead) and prefix not in self.packed_linears and self.packed_embeddings:
            if not self.tied_head:
                return None  # a head of its own, in floating point
            if len(self.packed_embeddings) != 1:
                raise PluginError(f"serq: {prefix} is tied to the input embeddings, and the folder quantizes "
                                  f"{len(self.packed_embeddings)} embedding tables; the plugin serves one")
            return SERQEmbeddingMethod()  # reads the embedding's int8 table (tie_weights)
        if not isinstance(layer, (LinearBase, ParallelLMHead)):
            return None
        linears = self._checkpoint_linears(layer, prefix)
        packed = [name in self.packed_linears for _, name in linears]
        gather = self._gather_read_by(prefix)
        if not any(packed):
            if gather is not None:
                raise PluginError(f"serq: {prefix} reads a norm with a folded order but is not packed; the vLLM plugin "
                                  "serves such orders inside packed layers only")
            return UnquantizedLinearMethod() if isinstance(layer, LinearBase) else None
        if not all(packed):
            raise PluginError(f"serq: {prefix} merges packed and float projections "
                              f"({', '.join(n for (_, n), p in zip(linears, packed) if not p)} not packed), which "
                              "vLLM's merged layer cannot hold")
        described = [(shard_id, name, self._description(name)) for shard_id, name in linears]
        self._check_parallel(layer, prefix, described, gather)
        return SERQLinearMethod(prefix, described, gather)

    def _checkpoint_linears(self, layer, prefix: str) -> list[tuple]:
        """(shard id, checkpoint linear) of a vLLM layer, in its output order."""
        parent, _, name = prefix.rpartition(".")
        parts = (self.packed_modules_mapping or {}).get(name)
        if not parts or not isinstance(layer, (QKVParallelLinear, MergedColumnParallelLinear)):
            return [(None, prefix)]
        names = [f"{parent}.{part}" if parent else part for part in parts]
        ids = ["q", "k", "v"] if isinstance(layer, QKVParallelLinear) else list(range(len(parts)))
        return list(zip(ids, names))

    def _description(self, name: str) -> dict:
        description = self.descriptions.get(f"{name}.weight")
        if description is None:  # maybe_update_config read every header
            raise PluginError(f"serq: the checkpoint has no packed-weight metadata for {name}")
        return description

    def _gather_read_by(self, prefix: str) -> dict | None:
        norms = [norm for norm, reader in self.readers.items() if reader == prefix]
        return self.output_gathers[norms[0]] if norms else None

    def _check_parallel(self, layer, prefix: str, described: list, gather) -> None:
        """What a tensor-parallel split of this layer cannot do, refused before loading."""
        if getattr(layer, "tp_size", 1) == 1:
            return
        if isinstance(layer, ParallelLMHead):
            raise PluginError(f"serq: {prefix} is packed; the vLLM plugin serves a packed lm_head with "
                              "tensor_parallel_size 1 only")
        if isinstance(layer, RowParallelLinear) and gather is not None:
            raise PluginError(f"serq: {prefix} is row-parallel and reads a norm with a folded order, which the vLLM "
                              "plugin does not split; serve with tensor_parallel_size 1")


def norm_reader(norm: str) -> str:
    """The vLLM layer that reads the output of the wrapped norm ``norm``."""
    parent, _, name = norm.rpartition(".")
    if name not in NORM_READERS:
        raise PluginError(f"serq: {norm} holds a folded order for the layers that read it, and the vLLM plugin knows "
                          f"the readers of {', '.join(sorted(NORM_READERS))} only")
    return f"{parent}.{NORM_READERS[name]}" if parent else NORM_READERS[name]


def refusal(quantization_config) -> str:
    """Why a ``quantization_config`` that is not a packed serq folder's is refused."""
    if serq_checkpoint_type(quantization_config) == EVALUATION_TYPE:
        return ("serq: this is an evaluation-mode serq folder (dequantized weights, for methods without a packed "
                "format such as lqer and l2qer); vLLM serves packed folders: quantize with --method serq, rtn or "
                "smoothquant")
    return "serq: not the quantization_config of a packed serq folder"


def resolve_folder(model: str, revision: str | None) -> Path:
    """The local folder of ``model`` (a path, or a Hub id already in the local cache)."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, revision=revision, local_files_only=True))
