"""The checks every loader of a packed serq folder runs before it reads a weight into a model.

One sequence, shared by transformers' loader (:mod:`serq_ao.integrations.hf_quantizer`) and
vLLM's (:mod:`serq_ao.integrations.vllm`), so that a damaged folder is refused the same way,
with the same one line, wherever it is loaded: the files against the folder's manifest,
config.json against the record in the weights' headers, every tensor against its SHA-256, and
every packed weight's fields against its attributes (:mod:`serq_ao.integrations.verify`).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from serq_ao.integrations.verify import (
    check_config_record,
    check_packed,
    fail_checkpoint,
    verify_files,
    verify_tensors,
)
from serq_ao.messages import one_line
from serq_ao.tensor_subclass import TABLE_TENSOR_CLASSES
from serq_ao.tensor_subclass.flatten import METADATA_MARK, build_packed

TABLE_CLASS_NAMES = {cls.__name__ for cls in TABLE_TENSOR_CLASSES}


def read_packed_descriptions(files: list[str]) -> dict[str, dict]:
    """``<linear>.weight`` -> its packed-weight description (class, attributes, fields), read
    from the safetensors headers of ``files``."""
    descriptions: dict[str, dict] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
            descriptions.update({k: json.loads(t)[METADATA_MARK] for k, t in metadata.items() if METADATA_MARK in t})
        except Exception as e:  # noqa: BLE001 - safetensors and json raise their own types
            fail_checkpoint(path, f"not a readable serq safetensors file ({one_line(e)})")
    return descriptions


def packed_value_checker(descriptions: dict[str, dict], on_weight=None):
    """``on_tensor`` for :func:`verify_tensors`: gathers each packed weight's fields as they
    are read and checks the weight once it is whole (fields are adjacent in key order), then
    hands it to ``on_weight(name, packed)`` where given."""
    pending: dict[str, dict] = {}
    prefixes = {f"{key}_{field}": (key, field) for key, d in descriptions.items() for field in d["fields"]}

    def on_tensor(name, tensor):
        if name not in prefixes:
            return
        key, field = prefixes[name]
        fields = pending.setdefault(key, {})
        fields[field] = tensor
        if len(fields) == len(descriptions[key]["fields"]):
            try:
                packed = build_packed(descriptions[key], pending.pop(key))
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                fail_checkpoint(key, f"its packed-weight metadata cannot describe a weight ({e})")
            check_packed(key, packed)
            if on_weight is not None and not isinstance(packed, TABLE_TENSOR_CLASSES):
                on_weight(key, packed)

    return on_tensor


def verify_packed_folder(files: list[str], packed_linears: list[str], on_weight=None, *,
                         packed_embeddings: list[str] = ()) -> tuple[dict, dict]:
    """Run every check on the safetensors ``files`` of a packed folder whose config.json
    declares ``packed_linears`` and ``packed_embeddings``; returns (the tensor records, name -> [shape, dtype, sha256];
    the packed descriptions, ``<linear>.weight`` -> description). ``on_weight(name, packed)``
    sees each packed linear's weight once its fields have passed."""
    files = [str(p) for p in files if str(p).endswith(".safetensors")]
    if not files:
        fail_checkpoint("checkpoint", "a packed serq checkpoint is stored as .safetensors files; found none")
    # the folder's files against its serq manifest (config.json, the index, the tokenizer:
    # an edited rms_norm_eps would load silently as another model); the weights by size here,
    # tensor by tensor below. A folder that save_pretrained wrote has no manifest: its
    # tensors are still checked
    for folder in sorted({Path(p).parent for p in files}):
        verify_files(folder, hash_weights=False)
        check_config_record(folder, [p for p in files if Path(p).parent == folder])
    descriptions = read_packed_descriptions(files)
    stored = verify_tensors(files, on_tensor=packed_value_checker(descriptions, on_weight))
    described = set(descriptions)
    declared = {f"{name}.weight" for name in [*packed_linears, *packed_embeddings]}
    if described != declared:
        odd = sorted(described ^ declared)[0]
        fail_checkpoint("checkpoint", f"{odd} is {'described as packed' if odd in described else 'declared packed'} "
                                      "in only one of the weights' metadata and config.json's packed_linears "
                                      "and packed_embeddings")
    tables = {f"{name}.weight" for name in packed_embeddings}
    for key in sorted(described):
        if (descriptions[key]["class"] in TABLE_CLASS_NAMES) != (key in tables):
            fail_checkpoint(key, f"is stored as a {descriptions[key]['class']}, which config.json does not declare "
                                 f"it as ({'an embedding' if key in tables else 'a linear'})")
    return stored, descriptions
