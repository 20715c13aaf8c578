"""Quantize a checkpoint that is never wholly in memory.

:func:`quantize_checkpoint` builds the model from its config.json without weights
(accelerate's ``init_empty_weights``: parameters on the meta device, buffers such as rotary
frequencies real), reads the tensors outside the decoder layers (embeddings, final norm,
head) once, and then hands :func:`serq_ao.quant.pipeline.run_quantization` a
:class:`CheckpointLayers` that reads each decoder layer's tensors from the safetensors shards
when its turn comes. Each quantized layer is packed and written at once as a shard of its
own, then dropped; the tensors outside the layers go into the last shard. Peak memory is
about one float layer, the cached calibration activations
(:mod:`serq_ao.quant.activations`), and what is being written.

The folder written is the one ``save_pretrained`` writes for the same packed model
(config.json with the serq ``quantization_config``, ``model-XXXXX-of-YYYYY.safetensors``
shards with their index, tokenizer files): every tensor bitwise the same, in other shards.
Each shard's ``serq_tensors`` record lists the tensors it holds
(:mod:`serq_ao.integrations.verify`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from serq_ao.files import TOKENIZER_FILES, Output, claim_output, strict_json
from serq_ao.integrations.hf_quantizer import packed_folder_config
from serq_ao.integrations.verify import CONFIG_RECORD_KEY, TENSOR_MANIFEST_KEY, config_record, tensor_manifest
from serq_ao.models import ModelLoadError, load_model_config
from serq_ao.passes import OutputGather
from serq_ao.passes.trace import find_decoder_layers
from serq_ao.passes.transforms import replace_module
from serq_ao.quant.activations import ActivationCache
from serq_ao.quant.input_checks import NonFiniteError, check_finite_weights
from serq_ao.quant.config import SERQConfig
from serq_ao.quant.embeddings import quantized_embedding_names
from serq_ao.quant.experts import Selection, select_stored, stored_names
from serq_ao.quant.fake_quant import FakeQuantLinear
from serq_ao.quant.packing import StorageReport, folder_storage, is_packed_linear, pack_linear
from serq_ao.tensor_subclass.flatten import flatten_state_dict
from serq_ao.messages import one_line

if TYPE_CHECKING:
    from serq_ao.quant.report import QuantizationReport

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointReader:
    """Reads named tensors from a folder's safetensors files (one file, or shards with an
    index), opening each file only while reading from it, so that no mapping outlives its use."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ModelLoadError(f"{index}: not a safetensors index ({e})") from None
        elif (self.folder / SINGLE_FILE).is_file():
            weight_map = {key: SINGLE_FILE for key in self._header_keys(SINGLE_FILE)}
        else:
            raise ModelLoadError(f"{self.folder} has no {SINGLE_FILE} or {INDEX_FILE}: streaming reads safetensors "
                                 "checkpoints (load other formats whole, with --in-memory)")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index}: its weight_map is not a table of tensor names to files")
        self.weight_map: dict[str, str] = dict(weight_map)
        # every file's header now, so that a damaged shard is an error before hours of work, not at its layer
        for file in sorted(set(self.weight_map.values())):
            stored = self._header_keys(file)
            listed = sorted(k for k, f in self.weight_map.items() if f == file and k not in stored)
            if listed:
                raise ModelLoadError(f"{self.folder / file}: cannot load the model (it lacks {listed[0]!r}, which "
                                     f"{INDEX_FILE} places there)")

    def _header_keys(self, file: str) -> set[str]:
        path = self.folder / file
        if Path(file).name != file:
            raise ModelLoadError(f"{self.folder / INDEX_FILE}: names {file!r}, which is not a file of the folder")
        try:
            with safe_open(str(path), framework="pt") as handle:
                return set(handle.keys())
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path}: cannot load the model ({one_line(e)})") from None

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each a copy in memory (not a view of a mapped file)."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise ModelLoadError(f"{self.folder}: the checkpoint has no tensor {missing[0]!r}, which the model "
                                 "config.json describes expects (a checkpoint with other key names: load it whole, "
                                 "with --in-memory)")
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for file, keys in by_file.items():
            key = keys[0]
            try:
                with safe_open(str(self.folder / file), framework="pt") as handle:
                    for key in keys:
                        tensors[key] = handle.get_tensor(key)
            except (SafetensorError, OSError) as e:  # a shard that is missing, damaged, or lacks what the index says
                raise ModelLoadError(f"{self.folder / file}: cannot read tensor {key!r} "
                                     f"({one_line(e)})") from None
        return tensors


def _state_names(module: nn.Module) -> list[tuple[str, bool]]:
    """(name, is_parameter) of every tensor the module's state dict holds."""
    names = [(n, True) for n, _ in module.named_parameters(remove_duplicate=False)]
    persistent = set(module.state_dict().keys())
    names += [(n, False) for n, _ in module.named_buffers(remove_duplicate=False) if n in persistent]
    return names


def _assign(module: nn.Module, name: str, tensor: torch.Tensor, is_parameter: bool) -> None:
    owner_name, _, attribute = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if is_parameter:
        owner._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attribute] = tensor


def _stored(name: str, keys: set[str]) -> tuple[str, Selection]:
    """The checkpoint tensor (and part of it) that holds the model's ``name``: the name itself,
    or where transformers' MoE layouts keep an unfused expert's weight (:mod:`serq_ao.quant.experts`)."""
    return next(((key, part) for key, part in stored_names(name) if key in keys), (name, None))


def _load_into(module: nn.Module, prefix: str, reader: CheckpointReader, dtype: torch.dtype,
               device: torch.device) -> list[str]:
    """Read ``module``'s tensors (``prefix`` + name) into it, floats cast to ``dtype``."""
    names = _state_names(module)
    keys = reader.keys()
    sources = {prefix + n: _stored(prefix + n, keys) for n, _ in names}
    tensors = reader.read(sorted({key for key, _ in sources.values()}))
    for name, is_parameter in names:
        key, part = sources[prefix + name]
        tensor = select_stored(tensors[key], part)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        _assign(module, name, tensor.to(device), is_parameter)
    return [prefix + n for n, _ in names]


class CheckpointLayers:
    """:class:`~serq_ao.quant.layerwise.LayerWeights` that read each decoder layer from the
    checkpoint for its turn (its weights checked finite), and drop it afterwards."""

    def __init__(self, reader: CheckpointReader, layers_name: str, layers: nn.ModuleList, dtype: torch.dtype):
        self.reader, self.layers_name, self.layers, self.dtype = reader, layers_name, layers, dtype

    def onload(self, index, layer, device):
        prefix = f"{self.layers_name}.{index}."
        _load_into(layer, prefix, self.reader, self.dtype, device)
        check_finite_weights(layer, prefix)

    def offload(self, index, layer):
        self.layers[index] = _Written()


class _Written(nn.Module):
    """Stands in for a decoder layer once it is written to the output."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this decoder layer was quantized and written to disk; load the output folder")


def checkpoint_dtype(folder: Path, config) -> torch.dtype:
    """The dtype the checkpoint declares (config.json's ``dtype`` / ``torch_dtype``), else float32."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) and declared.is_floating_point else torch.float32


def copy_model_code(source: Path, destination: Path, config) -> None:
    """A model whose config.json maps its classes to code in the folder (``auto_map``, loaded
    with trust_remote_code) needs that code beside the output too: the source's ``*.py``."""
    if getattr(config, "auto_map", None):
        for code in sorted(source.glob("*.py")):
            shutil.copy2(code, destination / code.name)


def build_skeleton(folder: str | os.PathLike, dtype: torch.dtype | str = "auto", *,
                   trust_remote_code: bool = False) -> tuple[nn.Module, torch.dtype]:
    """The model config.json describes, in ``dtype`` ("auto": the checkpoint's), with its
    parameters on the meta device and its buffers real; eval mode. ``trust_remote_code``:
    the folder's own modeling code (its auto_map) may run."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_model_config(folder, trust_remote_code=trust_remote_code)
    dtype = checkpoint_dtype(Path(folder), config) if dtype == "auto" else dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.config.dtype = dtype
    return model.eval(), dtype


@dataclasses.dataclass
class ShardedOutput:
    """What :class:`PackedShardWriter` wrote: the pieces of config.json and the report."""

    output_gathers: dict[str, dict]
    packed_linears: list[str]
    storage: StorageReport


class PackedShardWriter:
    """Writes a packed model into ``folder`` one decoder layer at a time (shard i + 1 of
    layers + 1), and the rest (tensors outside the layers, config, index) last."""

    def __init__(self, folder: Path, layers_name: str, num_layers: int):
        self.folder, self.layers_name = folder, layers_name  # where the layer shards go
        self.shards = num_layers + 1
        # shard file -> size; the index and the report's figures are read back from these
        # files at the end (folder_storage), never summed here: a resumed run then reports
        # what it wrote, whatever the earlier process counted
        self.written: dict[str, int] = {}
        self.gathers: dict[str, dict] = {}
        self.linears: list[str] = []

    def _shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.shards:05d}.safetensors"

    def _write(self, number: int, state: dict[str, torch.Tensor], folder: Path, records: dict | None = None,
               metadata: dict[str, str] | None = None) -> None:
        """Shard ``number``: ``state`` flattened, with the tensor record of its own tensors
        and of ``records`` (other shards' entries), and ``metadata``."""
        tensors, packed = flatten_state_dict(state)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}  # a layer may sit on a GPU
        record = {**(records or {}), **json.loads(tensor_manifest(tensors))}
        metadata = {"format": "pt", **(metadata or {}), **packed,
                    TENSOR_MANIFEST_KEY: json.dumps(dict(sorted(record.items())))}
        name = self._shard_name(number)
        tmp = folder / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, folder / name)  # never a half-written shard under its name
        self.written[name] = (folder / name).stat().st_size

    @torch.no_grad()
    def write_layer(self, index: int, layer: nn.Module) -> None:
        """Pack ``layer``'s quantized linears and write its shard."""
        prefix = f"{self.layers_name}.{index}."
        for name in [n for n, m in layer.named_modules() if isinstance(m, FakeQuantLinear)]:
            replace_module(layer, name, pack_linear(layer.get_submodule(name)))
        for name, module in layer.named_modules():
            if isinstance(module, OutputGather):
                self.gathers[prefix + name] = module.spec()
            elif is_packed_linear(module):
                self.linears.append(prefix + name)
        self._write(index + 1, layer.state_dict(prefix=prefix), self.folder)

    def to_dict(self) -> dict:
        """The records of the layers written so far (JSON), for a resumed run: what
        config.json needs (the gathers, the packed linears in model order) and the shards."""
        return {"gathers": self.gathers, "linears": self.linears, "written": self.written}

    def restore(self, record: dict) -> None:
        """Take up the records of :meth:`to_dict`."""
        self.gathers, self.linears = dict(record["gathers"]), list(record["linears"])
        self.written = {k: int(v) for k, v in record["written"].items()}

    def _layer_records(self) -> dict[str, list]:
        """The tensor records of the shards written so far, from their headers."""
        records = {}
        for name in sorted(self.written):
            with safe_open(str(self.folder / name), framework="pt") as handle:
                records.update(json.loads(handle.metadata()[TENSOR_MANIFEST_KEY]))
        return records

    def _weight_map(self) -> dict[str, str]:
        """Tensor name -> shard, from the shards' headers."""
        weight_map = {}
        for name in sorted(self.written):
            with safe_open(str(self.folder / name), framework="pt") as handle:
                weight_map.update(dict.fromkeys(handle.keys(), name))
        return weight_map

    def finish(self, staging: Path, model: nn.Module, rest: dict[str, torch.Tensor], config: SERQConfig, tokenizer,
               describe: Callable[[StorageReport], dict]) -> ShardedOutput:
        """Into ``staging``: the layer shards (linked from the work folder, which stays
        whole until the output is committed), the last shard (``rest``: the tensors outside
        the layers, a quantized head packed, a quantized embedding table), config.json with the
        quantization_config, the index, generation config, tokenizer and serq_report.json."""
        if staging != self.folder:
            for name in self.written:
                os.link(self.folder / name, staging / name)
        self.folder = staging
        # a quantized head (SERQConfig.quantize_lm_head) is packed and written in place of
        # its float weight; the layers are placeholders by now, so it is the only one
        for name in [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]:
            replace_module(model, name, pack_linear(model.get_submodule(name)))
            self.linears.append(name)
            rest = {**{k: v for k, v in rest.items() if not k.startswith(name + ".")},
                    **model.get_submodule(name).state_dict(prefix=name + ".")}
        # a quantized embedding table (SERQConfig.embeddings) in place of the float one read
        tables = quantized_embedding_names(model)
        for name in tables:
            rest[f"{name}.weight"] = model.get_submodule(name).weight.detach()
        # the last shard records every tensor of the model, as each shard save_pretrained writes
        # does: a layer shard swapped in from another output of the same model (same size, its
        # own record consistent) then disagrees with it
        self._write(self.shards, rest, staging, records=self._layer_records(),
                    metadata={CONFIG_RECORD_KEY: config_record(model.config)})
        storage = folder_storage(staging, self.linears, files=sorted(self.written))
        model.config.quantization_config = packed_folder_config(config, self.gathers, self.linears, tables)
        model.config.save_pretrained(self.folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(self.folder)
        index = {"metadata": {"total_size": storage.model_bytes}, "weight_map": dict(sorted(self._weight_map().items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)
        from serq_ao.integrations.serialization import REPORT_FILE

        (self.folder / REPORT_FILE).write_text(strict_json(describe(storage), indent=1))
        return ShardedOutput(self.gathers, self.linears, storage)


def outside_layer_names(model: nn.Module, layers_name: str, reader: CheckpointReader) -> list[str]:
    """The checkpoint tensors that are not inside a decoder layer (embeddings, final norm,
    head: what the checkpoint stores, so a tied head is stored once, as in the source)."""
    prefix = layers_name + "."
    return sorted(k for k in reader.keys() if not k.startswith(prefix))


def load_outside_layers(model: nn.Module, layers_name: str, reader: CheckpointReader, dtype: torch.dtype
                        ) -> dict[str, torch.Tensor]:
    """Load every tensor outside the decoder layers into ``model`` (the capture runs the
    embeddings); returns them as read and cast, for the last shard."""
    prefix = layers_name + "."
    expected = {n: p for n, p in _state_names(model) if not n.startswith(prefix)}
    stored = outside_layer_names(model, layers_name, reader)
    unexpected = [k for k in stored if k not in expected]
    if unexpected:
        raise ModelLoadError(f"{reader.folder}: the checkpoint holds {unexpected[0]!r}, which the model config.json "
                             "describes does not have (load it whole, with --in-memory)")
    tensors = reader.read(stored)
    rest = {}
    for name in stored:
        tensor = tensors.pop(name)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        _assign(model, name, tensor, expected[name])
        rest[name] = tensor
    model.tie_weights()  # a head tied to the embedding follows its real weight
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                  if t.device.type == "meta" and not n.startswith(prefix)]
    if still_meta:
        raise ModelLoadError(f"{reader.folder}: the checkpoint has no tensor {still_meta[0]!r}")
    for name, tensor in rest.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteError(f"parameter {name} has NaN or inf values: a model with non-finite weights cannot "
                                 "be quantized")
    return rest


def quantize_checkpoint(
    folder: str | os.PathLike,
    config: SERQConfig,
    calibration,
    out: str | os.PathLike | Output,
    *,
    overwrite: bool = False,
    resume: bool = False,
    tokenizer=None,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "cpu",
    activations: ActivationCache | None = None,
    error_windows: int = 0,
    collect_statistics: bool = False,
    progress=None,
    describe: Callable[["QuantizationReport", StorageReport], dict] = lambda report, storage: {},
    trust_remote_code: bool = False,
):
    """Quantize the safetensors checkpoint in ``folder`` layer by layer into the packed
    folder ``out``, never holding more than one float decoder layer. Returns
    ``(QuantizationReport, ShardedOutput)``.

    ``calibration``: input ids (as :func:`~serq_ao.quant.pipeline.quantize_model` takes them), or
    None for RTN. ``out`` is written under the rules of
    :mod:`serq_ao.files` (new or empty, or an earlier serq output with ``overwrite``;
    replaced atomically at the end); it may be an :class:`~serq_ao.files.Output` the caller
    claimed. The run is resumable: its work is kept beside ``out`` after every layer
    (:mod:`serq_ao.resume`); ``resume`` continues an interrupted run of the same ``out``
    (or starts afresh where there is none), ``overwrite`` discards one, and otherwise an
    interrupted run there is an error. ``tokenizer``: saved beside the weights (default: the
    source folder's). ``dtype``: the model's dtype ("auto": the checkpoint's). ``device``:
    where each layer computes. ``describe(report, storage)`` gives what serq_report.json records."""
    if not isinstance(out, Output):
        with claim_output(out, option="out", overwrite=overwrite) as output:
            return quantize_checkpoint(folder, config, calibration, output, overwrite=overwrite, resume=resume,
                                       tokenizer=tokenizer, dtype=dtype, device=device, activations=activations,
                                       error_windows=error_windows, collect_statistics=collect_statistics,
                                       progress=progress, describe=describe,
                                       trust_remote_code=trust_remote_code)
    from serq_ao.quant.calibration_input import prepare_calibration
    from serq_ao.quant.pipeline import run_quantization
    from serq_ao.resume import PartialRun, ResumeError, run_key

    if not config.spec.packs:
        raise ValueError(f"method {config.method!r} has no packed format to stream into: quantize it in memory "
                         "(--in-memory)")
    partial = PartialRun(out.partial)
    record = partial.record()
    if record is not None and not resume and not overwrite:
        raise ResumeError(f"an interrupted run of {out.path} is waiting in {partial.folder} ({record['layers_done']} "
                          "layers done): pass --resume to continue it, or --overwrite to discard it and start over")
    reader = CheckpointReader(folder)
    if tokenizer is None and any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        # the output is a whole model folder, like the source
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model, dtype = build_skeleton(folder, dtype, trust_remote_code=trust_remote_code)
    layers_name, layers = find_decoder_layers(model)
    rest = load_outside_layers(model, layers_name, reader, dtype)
    calibration = prepare_calibration(calibration, model)
    key = run_key(Path(folder), config, calibration, dtype, torch.device(device), error_windows, collect_statistics)
    writer = PackedShardWriter(partial.folder, layers_name, len(layers))
    continue_from = None
    if record is not None and resume:
        record = partial.check(key)
        writer.restore(record["writer"])
        logger.info("resuming %s from layer %d of %d", out.path, record["layers_done"], len(layers))
        continue_from = lambda cache: partial.load(record, cache, config)  # noqa: E731
    else:
        partial.start()
    try:
        report = run_quantization(
            model, config, calibration, progress=progress, device=device, activations=activations,
            error_windows=error_windows, collect_statistics=collect_statistics,
            weights=CheckpointLayers(reader, layers_name, layers, dtype),
            on_layer_done=lambda index, layer, plans: writer.write_layer(index, layer),
            resume=continue_from,
            on_checkpoint=lambda state: partial.save(state, key, dict(writer.written), writer.to_dict()),
        )
        with out.write(kind="quantized model") as staging:
            written = writer.finish(staging, model, rest, config, tokenizer, lambda storage: describe(report, storage))
            copy_model_code(Path(folder), staging, model.config)
    except BaseException:
        saved = partial.record()
        if saved is None:
            partial.discard()  # nothing finished: nothing worth resuming
        else:
            logger.warning("%d of %d layers are saved in %s: the same command with --resume continues from there",
                           saved["layers_done"], len(layers), partial.folder)
        raise
    partial.discard()
    return report, written
