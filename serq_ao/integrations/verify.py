"""Loading never trusts a file: what a serq checkpoint must satisfy before its model is used.

Each check raises :class:`CheckpointError`, one line naming the first problem:

1. **Files** (:func:`verify_files`): a folder serq wrote carries ``serq-manifest.json``
   (:mod:`serq_ao.files`); every listed file must be there with its size and SHA-256, and no
   weight file may be unlisted.
2. **Tensors** (:func:`verify_tensors`): every packed checkpoint's safetensors header holds
   ``serq_tensors``, each stored tensor's shape, dtype and SHA-256 of its bytes (written by
   every ``save_pretrained`` of a packed model, not only serq's CLI). Every stored tensor must
   be listed and match, no listed one may be absent, and the model that config.json builds
   must expect exactly these (transformers would silently initialise a missing one at random
   and drop an unexpected one: a raised ``num_hidden_layers``, an emptied
   ``output_gathers``, a deleted norm).
3. **Values** (:func:`check_packed`, :func:`check_order`): the fields of each packed weight
   have the shapes its attributes imply, an order is a permutation of its channels (an
   out-of-range id would make a gather read out of bounds), scales are ones quantization can
   produce (finite and positive; no E8M0 NaN byte), and config and weights agree on format
   and rank.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from serq_ao.formats.hadamard import ROTATION_SIZES
from serq_ao.files import MANIFEST, folder_files, read_manifest, sha256_of
from serq_ao.messages import one_line

TENSOR_MANIFEST_KEY = "serq_tensors"
_E8M0_NAN = 255


class CheckpointError(ValueError):
    """A checkpoint that does not hold what it claims; the message names the first problem."""


def fail_checkpoint(where: str | os.PathLike, problem: str):
    """Raise the one-line :class:`CheckpointError` for ``problem`` found at ``where``."""
    raise CheckpointError(f"{where}: {problem}; the checkpoint is damaged or was edited: re-quantize, or restore it")


# ---- 1. files -------------------------------------------------------------------------------


def verify_files(folder: str | os.PathLike, *, hash_weights: bool = True) -> None:
    """Check ``folder`` against its serq manifest (nothing to check where there is none).
    ``hash_weights=False`` checks .safetensors files by size only, for callers that verify
    their tensors one by one (:func:`verify_tensors`)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        if (folder / MANIFEST).exists():
            fail_checkpoint(folder / MANIFEST, "is not a serq manifest")
        return
    listed = manifest["files"]
    present = folder_files(folder)
    for name, record in listed.items():
        path = folder / name
        if not path.is_file():  # follows links: a Hub snapshot's files are links to its blobs
            fail_checkpoint(folder, f"{name} is missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if not isinstance(record, dict) or size != record.get("size"):
            fail_checkpoint(path, f"has {size} bytes, {MANIFEST} says {record.get('size') if isinstance(record, dict) else '?'}")
        if (hash_weights or not name.endswith(".safetensors")) and sha256_of(folder / name) != record.get("sha256"):
            fail_checkpoint(folder / name, "its SHA-256 differs from the one recorded when it was written")
    extra = [n for n in present if n not in listed and (n.endswith(".safetensors") or n.endswith(".json"))]
    if extra:
        fail_checkpoint(folder / extra[0], f"is not listed in {MANIFEST}")


# ---- 1b. config.json against the weights ---------------------------------------------------

CONFIG_RECORD_KEY = "serq_model_config"
# keys save_pretrained sets after the weights' header is made (dtype, architectures, auto_map),
# the version that wrote the file, and quantization_config (checked against the weights itself)
_CONFIG_KEYS_NOT_RECORDED = {"transformers_version", "quantization_config", "architectures", "dtype", "torch_dtype",
                             "auto_map", "_name_or_path"}


def _recorded_part(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _CONFIG_KEYS_NOT_RECORDED}


def config_record(config) -> str:
    """The safetensors header entry that binds the weights to the config.json written with
    them: the model's fields as config.json states them (what ``save_pretrained`` writes)."""
    return json.dumps(_recorded_part(json.loads(config.to_json_string(use_diff=True))), sort_keys=True)


def check_config_record(folder: str | os.PathLike, files: list[str | os.PathLike]) -> None:
    """config.json of ``folder`` must state the model the weights' header records (where one
    does; folders written before the record existed carry none). It guards folders without a
    manifest too (a user's own save_pretrained): an edited rms_norm_eps loads as another model."""
    recorded = None
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                text = (handle.metadata() or {}).get(CONFIG_RECORD_KEY)
        except Exception:  # noqa: BLE001 - unreadable: verify_tensors names it
            continue
        if text is not None:
            recorded = text
            break
    if recorded is None:
        return
    config_path = Path(folder) / "config.json"
    try:
        current = _recorded_part(json.loads(config_path.read_text()))
        recorded = json.loads(recorded)
    except (OSError, ValueError, AttributeError):
        fail_checkpoint(config_path, "is not the JSON object of a model config")
    changed = sorted(k for k in set(current) | set(recorded) if current.get(k) != recorded.get(k))
    if changed:
        key = changed[0]
        fail_checkpoint(config_path, f"{key} is {current.get(key)!r}, the weights were saved with "
                                     f"{recorded.get(key)!r}")


# ---- 2. tensors -----------------------------------------------------------------------------


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (row-major, as safetensors stores them)."""
    data = tensor.detach().contiguous().cpu().reshape(-1)
    # hashed through the buffer protocol: no bytes copy of a tensor that may be gigabytes
    return hashlib.sha256(data.view(torch.uint8).numpy() if data.numel() else b"").hexdigest()


def tensor_manifest(tensors: dict[str, torch.Tensor], values: Callable[[str], torch.Tensor] | None = None) -> str:
    """The ``serq_tensors`` header entry for the plain tensors about to be written.
    ``values(name)``: where a tensor's bytes come from when they are not in ``tensors``
    (accelerate's offload: the tensor there is on the meta device), read one at a time."""
    def entry(name: str, tensor: torch.Tensor) -> list:
        data = values(name) if values is not None and tensor.device.type == "meta" else tensor
        return [list(tensor.shape), str(tensor.dtype).removeprefix("torch."), tensor_digest(data.to(tensor.dtype))]

    return json.dumps({name: entry(name, tensors[name]) for name in sorted(tensors)})


def verify_tensors(files: list[str | os.PathLike], on_tensor=None) -> dict[str, list]:
    """Check every tensor of the safetensors ``files`` against their ``serq_tensors`` entry;
    returns the union of the records (name -> [shape, dtype, sha256]). A shard's record lists
    at least its own tensors (``save_pretrained`` writes the whole model's into every shard,
    a streamed write each layer shard's own and the whole model's into its last shard);
    records that name one tensor must agree, and every tensor any record lists must be
    stored. ``on_tensor(name, tensor)`` sees each tensor once it has passed, for checks of
    its values."""
    manifest, found = None, set()
    origin: dict[str, str | os.PathLike] = {}  # tensor -> the file whose record named it first
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            fail_checkpoint(path, f"is not a readable safetensors file ({one_line(e)})")
        with handle:
            text = (handle.metadata() or {}).get(TENSOR_MANIFEST_KEY)
            if text is None:
                fail_checkpoint(path, f"has no {TENSOR_MANIFEST_KEY} record (written by an older serq-ao, or not by serq)")
            try:
                listed = json.loads(text)
            except ValueError:
                fail_checkpoint(path, f"its {TENSOR_MANIFEST_KEY} record is not JSON")
            if not isinstance(listed, dict):
                fail_checkpoint(path, f"its {TENSOR_MANIFEST_KEY} record is not a table of tensors")
            manifest = {} if manifest is None else manifest
            for key, record in listed.items():
                if manifest.setdefault(key, record) != record:
                    fail_checkpoint(path, f"its {TENSOR_MANIFEST_KEY} record of {key} differs from the one in "
                                          f"{Path(origin[key]).name} (shards of different checkpoints?)")
                origin.setdefault(key, path)
            for key in handle.keys():
                expected = listed.get(key)
                if expected is None:
                    fail_checkpoint(path, f"holds tensor {key}, which its {TENSOR_MANIFEST_KEY} record does not list")
                tensor = handle.get_tensor(key)
                got = [list(tensor.shape), str(tensor.dtype).removeprefix("torch.")]
                if got != expected[:2]:
                    fail_checkpoint(path, f"tensor {key} is {got[1]} {got[0]}, recorded as {expected[1]} {expected[0]}")
                if tensor_digest(tensor) != expected[2]:
                    fail_checkpoint(path, f"tensor {key} differs from the one written (SHA-256)")
                found.add(key)
                if on_tensor is not None:
                    on_tensor(key, tensor)
    missing = sorted(set(manifest or {}) - found)
    if missing:
        fail_checkpoint(Path(files[0]).parent, f"tensor {missing[0]} is missing ({len(missing)} in all)")
    return manifest or {}


def check_expected_keys(model: torch.nn.Module, stored: dict[str, list], packed: dict[str, dict]) -> None:
    """The model built from config.json must expect exactly the ``stored`` tensors (name ->
    [shape, dtype, ...]), with their shapes.

    ``packed``: packed weight name -> its description (stored fields, logical shape)."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    expected: dict[str, tuple | None] = {}
    for key, tensor in model.state_dict().items():
        if key in packed:
            logical = list(packed[key]["attributes"]["shape"])
            if logical != list(tensor.shape):
                fail_checkpoint("checkpoint", f"{key} is stored as a {logical} weight, the model config.json describes has "
                                    f"{list(tensor.shape)}: config.json and the weights disagree")
            expected |= {f"{key}_{field}": None for field in packed[key]["fields"]}
        elif key not in tied or key in stored:
            expected[key] = tuple(tensor.shape)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing:
        fail_checkpoint("checkpoint", f"the model config.json describes expects {missing[0]}, which is not stored "
                            f"({len(missing)} such tensors: config.json and the weights disagree)")
    if unexpected:
        fail_checkpoint("checkpoint", f"it stores {unexpected[0]}, which the model config.json describes has no place for "
                            f"({len(unexpected)} such tensors: config.json and the weights disagree)")
    for key, shape in expected.items():
        if shape is not None and tuple(stored[key][0]) != shape:
            fail_checkpoint("checkpoint", f"{key} is stored as {list(stored[key][0])}, the model config.json describes has "
                                f"{list(shape)}: config.json and the weights disagree")


def written_by_serq(folder: str | os.PathLike) -> bool:
    """True when a safetensors file of ``folder`` carries serq's tensor manifest or packed weights."""
    from serq_ao.tensor_subclass.flatten import METADATA_MARK

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception:  # unreadable: the loader will say so
            continue
        if TENSOR_MANIFEST_KEY in metadata or any(METADATA_MARK in str(v) for v in metadata.values()):
            return True
    return False


# ---- 3. values ------------------------------------------------------------------------------


def check_order(name: str, perm: torch.Tensor | None, width: int) -> None:
    """``perm`` must hold each of 0..width-1 exactly once."""
    if perm is None:
        return
    if perm.dim() != 1 or perm.numel() != width:
        fail_checkpoint(name, f"order has shape {tuple(perm.shape)}, expected ({width},)")
    if perm.is_floating_point() or perm.dtype == torch.bool:
        fail_checkpoint(name, f"order has dtype {perm.dtype}, expected an integer type")
    values = perm.long()
    if values.numel() and (values.min() < 0 or values.max() >= width):
        fail_checkpoint(name, f"order holds channel ids outside [0, {width})")
    if not torch.equal(values.sort().values, torch.arange(width, device=values.device)):
        fail_checkpoint(name, "order repeats a channel (it is not a permutation)")


def _check_scale_inv(name: str, scale_inv: torch.Tensor | None, width: int) -> None:
    if scale_inv is None:
        return
    if tuple(scale_inv.shape) != (width,):
        fail_checkpoint(name, f"input scale has shape {tuple(scale_inv.shape)}, expected ({width},)")
    if not bool(torch.isfinite(scale_inv).all()) or bool((scale_inv <= 0).any()):
        fail_checkpoint(name, "input scale has a non-finite or non-positive value")


def _check_shape(name: str, field: str, tensor: torch.Tensor | None, shape: tuple, dtype: torch.dtype) -> None:
    if tensor is None:
        fail_checkpoint(name, f"lacks its {field}")
    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        fail_checkpoint(name, f"{field} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, "
                    f"its attributes imply {str(dtype).removeprefix('torch.')} {list(shape)}")


def check_packed(name: str, weight) -> None:
    """The fields of a packed weight against its attributes and its format's rules."""
    from serq_ao.kernels.ops import padded_in_features
    from serq_ao.tensor_subclass.serq_int_tensor import SERQIntTensor
    from serq_ao.tensor_subclass.int8_rows_tensor import Int8RowsTensor
    from serq_ao.tensor_subclass.serq_mxfp4_tensor import SERQMXFP4Tensor

    rows, d_in = weight.shape
    if isinstance(weight, Int8RowsTensor):  # an embedding table: codes and row scales, no pre-op
        _check_shape(name, "qdata", weight.qdata, (rows, d_in), torch.int8)
        _check_shape(name, "scale", weight.scale, (rows,), torch.float32)
        if bool((weight.qdata == -128).any()):
            fail_checkpoint(name, "has the code -128, which quantization never writes (|q| <= 127)")
        if not bool(torch.isfinite(weight.scale).all()) or bool((weight.scale <= 0).any()):
            fail_checkpoint(name, "scale has a non-finite or non-positive value")
        return
    if type(weight.rotation) is not int or weight.rotation not in ROTATION_SIZES:  # 32.0 or "32" too
        fail_checkpoint(name, f"rotation {weight.rotation!r} is not one of {ROTATION_SIZES}")
    if isinstance(weight, SERQMXFP4Tensor):
        if not isinstance(weight.rank, int) or weight.rank < 0 or weight.rank % 32:
            fail_checkpoint(name, f"rank {weight.rank!r} is not a multiple of 32")
        if weight.scale_mode not in ("floor", "rceil"):
            fail_checkpoint(name, f"scale mode {weight.scale_mode!r} is not floor or rceil")
        columns = padded_in_features(d_in) + weight.rank
        _check_shape(name, "qdata", weight.qdata, (rows, columns // 2), torch.uint8)
        _check_shape(name, "scale", weight.scale, (rows, columns // 32), torch.uint8)
        if bool((weight.scale == _E8M0_NAN).any()):
            fail_checkpoint(name, "has an E8M0 NaN scale byte (255), which quantization never writes")
    elif isinstance(weight, SERQIntTensor):
        group = weight.group_size
        if not isinstance(group, int) or group <= 0 or group % 2 or weight.activation_bits not in (4, 8):
            fail_checkpoint(name, f"group size {group!r} or activation bits {weight.activation_bits!r} is not a valid INT format")
        groups = -(-d_in // group)
        _check_shape(name, "qdata", weight.qdata, (rows, groups * group // 2), torch.uint8)
        _check_shape(name, "scale", weight.scale, (rows, groups), torch.float32)
        if weight.correction_qdata is not None:
            rank = weight.correction_qdata.shape[-1] * 2
            _check_shape(name, "correction_qdata", weight.correction_qdata, (rows, rank // 2), torch.uint8)
            _check_shape(name, "correction_scale", weight.correction_scale, (rows, 1), torch.float32)
        for field in ("scale", "correction_scale"):
            value = getattr(weight, field)
            if value is not None and (not bool(torch.isfinite(value).all()) or bool((value <= 0).any())):
                fail_checkpoint(name, f"{field} has a non-finite or non-positive value")
    else:
        fail_checkpoint(name, f"is a {type(weight).__name__}, not a packed SERQ weight")
    _check_scale_inv(name, weight.input_scale_inv, d_in)
    check_order(name, weight.input_perm, d_in)


def check_output_gather(name: str, module) -> None:
    """A loaded OutputGather's order and scale against its width."""
    width = (module.perm if module.perm is not None else module.scale_inv).numel()
    check_order(name, module.perm, width)
    _check_scale_inv(name, module.scale_inv, width)


def check_config_agrees(name: str, weight, config) -> None:
    """Format, rank and rotation of a packed weight against the checkpoint's SERQConfig."""
    from serq_ao.formats import FormatName
    from serq_ao.quant.methods import RankAllocation
    from serq_ao.quant.rank_allocation import candidate_ranks
    from serq_ao.tensor_subclass.serq_mxfp4_tensor import SERQMXFP4Tensor

    fmt = FormatName.MXFP4 if isinstance(weight, SERQMXFP4Tensor) else {8: FormatName.W4A8, 4: FormatName.W4A4}[weight.activation_bits]
    if fmt != config.format:
        fail_checkpoint(name, f"is packed as {fmt}, the checkpoint's config says format {config.format}")
    if config.rank_allocation is RankAllocation.UNIFORM:
        if weight.rank != config.correction_rank:
            fail_checkpoint(name, f"has rank {weight.rank}, the checkpoint's config says {config.correction_rank}")
    elif weight.rank not in candidate_ranks(weight.shape[1], config.rank):
        allowed = candidate_ranks(weight.shape[1], config.rank)
        fail_checkpoint(name, f"has rank {weight.rank}; the checkpoint's config (rank_allocation "
                              f"{config.rank_allocation.value!r}, rank {config.rank}) allows "
                              f"{allowed[0]}..{allowed[-1]} in steps of 32")
    if weight.rotation != config.rotation:
        fail_checkpoint(name, f"has rotation {weight.rotation}, the checkpoint's config says {config.rotation}")
