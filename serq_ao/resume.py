"""Resuming an interrupted streamed quantization (``serq quantize --resume``).

A streamed run (:mod:`serq_ao.streaming`) works in a folder beside its output,
``.<out>.serq-partial``: each finished layer's shard, and after every layer the state the
next layer needs (:class:`~serq_ao.quant.layerwise.LayerwiseState`: the activations at its
input, the statistics, the plans and reports so far) with the shard writer's records.

``run.json`` is the commit point. It is replaced atomically (and flushed to disk) after the
state it names is complete, so a layer counts as done only once it names it: a kill at any
moment leaves the previous state or the new one, never half of one. It also records what the
run depends on (the source checkpoint's files by size and modification time, the config, the
SHA-256 of the calibration ids, dtype, device, the versions); a partial run whose record
differs is refused, naming the field. Only JSON and safetensors are read back, never pickles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from serq_ao.files import _version
from serq_ao.passes import (
    ActivationProducer,
    AttentionProducer,
    FoldRecord,
    GatedProducer,
    LinearGroup,
    NormProducer,
    RowRange,
    UnknownProducer,
)
from serq_ao.quant.activations import ActivationCache, ActivationStream
from serq_ao.quant.calibration import StatisticsObserver
from serq_ao.quant.config import SERQConfig
from serq_ao.quant.layerwise import LayerwiseState
from serq_ao.quant.linear_plan import LinearPlan
from serq_ao.quant.report import LinearReport
from serq_ao.messages import one_line

RUN_FILE = "run.json"
FORMAT = 1
PRODUCERS = {cls.kind: cls for cls in (NormProducer, GatedProducer, ActivationProducer, AttentionProducer,
                                       UnknownProducer)}


class ResumeError(ValueError):
    """A partial run that cannot be continued; the message says why and what to do."""


# ---- what a run depends on ------------------------------------------------------------------


def run_key(source: Path, config: SERQConfig, calibration: list[torch.Tensor] | None, dtype: torch.dtype,
            device: torch.device, error_windows: int, collect_statistics: bool) -> dict:
    """Everything that decides a run's output, as JSON."""
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(source).iterdir())
             if p.is_file() and p.suffix in (".safetensors", ".json")}
    ids = None
    if calibration is not None:  # the windows' lengths, and one digest of all their ids
        digest = hashlib.sha256()
        for window in calibration:
            digest.update(window.detach().to(torch.int64).contiguous().cpu().view(-1).numpy().tobytes())
        ids = [[w.shape[-1] for w in calibration], digest.hexdigest()]
    return {
        "source": str(Path(source).resolve()),
        "source_files": files,
        "config": config.to_dict(),
        "calibration": ids,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.device(device).type,
        "error_windows": error_windows,
        "collect_statistics": collect_statistics,
        "versions": {"serq_ao": _version(), "torch": torch.__version__, "transformers": transformers.__version__},
    }


def _first_difference(recorded, current, path: str = "") -> str | None:
    if isinstance(recorded, dict) and isinstance(current, dict):
        for key in sorted(set(recorded) | set(current)):
            found = _first_difference(recorded.get(key), current.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if recorded == current else path


# ---- the plan records -----------------------------------------------------------------------


def group_to_dict(group: LinearGroup) -> dict:
    return dataclasses.asdict(group)


def group_from_dict(data: dict) -> LinearGroup:
    producer = dict(data["producer"])
    cls = PRODUCERS.get(producer.get("kind"))
    if cls is None:
        raise ResumeError(f"unknown producer kind {producer.get('kind')!r} in the saved plan")
    for field in dataclasses.fields(cls):
        value = producer.get(field.name)
        if isinstance(value, dict):
            producer[field.name] = RowRange(**value)
        elif isinstance(value, list):
            producer[field.name] = tuple(value)
    return LinearGroup(tuple(data["linears"]), int(data["in_features"]), cls(**producer))


def _plan_to_dict(plan: LinearPlan) -> dict:
    fold = None if plan.fold is None else {"scale": plan.fold.scale, "order": plan.fold.order}
    return {"group": group_to_dict(plan.group), "fold": fold, "rank": plan.rank,
            "scale_inv": plan.input_scale_inv is not None, "perm": plan.input_perm is not None}


def _plan_from_dict(name: str, data: dict, tables: dict[str, torch.Tensor], config: SERQConfig) -> LinearPlan:
    scale_inv = tables[f"plan.{name}.input_scale_inv"] if data["scale_inv"] else None
    perm = tables[f"plan.{name}.input_perm"] if data["perm"] else None
    fold = None if data["fold"] is None else FoldRecord(data["fold"]["scale"], data["fold"]["order"], scale_inv, perm)
    return LinearPlan(name, group_from_dict(data["group"]), fold, scale_inv, perm, int(data["rank"]),
                      config.quant_format, config.rotation)


# ---- the partial run ------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _save_stream(stream: ActivationStream | None, folder: Path, name: str) -> int:
    if stream is None:
        return -1
    for index, tensor in enumerate(stream):
        save_file({"x": tensor.contiguous()}, str(folder / f"{name}-{index:06d}.safetensors"))
    return len(stream)


def _load_stream(cache: ActivationCache, folder: Path, name: str, count: int) -> ActivationStream | None:
    if count < 0:
        return None
    stream = cache.stream()
    for index in range(count):
        stream.append(load_file(str(folder / f"{name}-{index:06d}.safetensors"))["x"])
    return stream


class PartialRun:
    """The work folder of one streamed run (see the module doc)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def record(self) -> dict | None:
        """run.json, or None where no layer was ever committed."""
        try:
            record = json.loads((self.folder / RUN_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ResumeError(f"{self.folder / RUN_FILE} is not readable ({e}): start over with --overwrite") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ResumeError(f"{self.folder / RUN_FILE} is not a serq partial run: start over with --overwrite")
        return record

    def start(self) -> None:
        """A fresh work folder (whatever was there is discarded)."""
        self.discard()
        self.folder.mkdir(parents=True)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def check(self, key: dict) -> dict:
        """The committed record, after checking it was made by a run with this ``key``."""
        record = self.record()
        if record is None:
            raise ResumeError(f"{self.folder} holds no finished layer")
        field = _first_difference(record.get("key"), key)
        if field is not None:
            raise ResumeError(f"the interrupted run in {self.folder} was made with another {field} "
                              "(source, config, calibration, dtype, device or versions must all match): "
                              "start over with --overwrite")
        for name, size in record["shards"].items():
            path = self.folder / name
            if not path.is_file() or path.stat().st_size != size:
                raise ResumeError(f"{path} is missing or changed since it was written: start over with --overwrite")
        return record

    def save(self, state: LayerwiseState, key: dict, shards: dict[str, int], writer: dict) -> None:
        """Commit ``state`` (after layer ``state.next_layer - 1``), the shards written so far
        (file -> size) and the writer's records."""
        name = f"state-{state.next_layer:05d}"
        staging = self.folder / f"{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        counts = {label: _save_stream(stream, staging, label) for label, stream in
                  (("analysis", state.analysis), ("floats", state.floats), ("quantized", state.quantized))}
        tables: dict[str, torch.Tensor] = {}
        observer = None
        if state.observer is not None:
            observer = {"groups": sorted(state.observer.amax), "count": dict(state.observer.count)}
            for group in observer["groups"]:
                tables[f"amax.{group}"] = state.observer.amax[group]
                tables[f"abs_sum.{group}"] = state.observer.abs_sum[group]
        for linear, plan in state.plans.items():  # copies: the linears of a pre-op group share one
            if plan.input_scale_inv is not None:
                tables[f"plan.{linear}.input_scale_inv"] = plan.input_scale_inv.clone()
            if plan.input_perm is not None:
                tables[f"plan.{linear}.input_perm"] = plan.input_perm.clone()
        save_file(tables, str(staging / "tables.safetensors"))
        record = {
            "streams": counts,
            "observer": observer,
            "analysed": {signature: [group_to_dict(g) for g in groups] for signature, groups in state.analysed.items()},
            "plans": {linear: _plan_to_dict(plan) for linear, plan in state.plans.items()},
            "linears": [None if r is None else dataclasses.asdict(r) for r in state.linears],  # None: ignored
            # float.hex keeps every bit (and NaN / inf) of the error sums
            "squared": {linear: [float(v).hex() for v in sums] for linear, sums in state.squared.items()},
            "seconds": state.seconds,
        }
        (staging / "state.json").write_text(json.dumps(record))
        for item in staging.iterdir():
            _fsync(item)
        os.replace(staging, self.folder / name)
        run = {"format": FORMAT, "key": key, "layers_done": state.next_layer, "state": name, "shards": shards,
               "writer": writer}
        tmp = self.folder / f"{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(run, indent=1))
        _fsync(tmp)
        os.replace(tmp, self.folder / RUN_FILE)  # the commit
        _fsync(self.folder)
        for item in self.folder.iterdir():
            if item.is_dir() and item.name.startswith("state-") and item.name != name:
                shutil.rmtree(item, ignore_errors=True)

    def load(self, record: dict, cache: ActivationCache, config: SERQConfig) -> LayerwiseState:
        """The committed state, its activations in ``cache``."""
        folder = self.folder / record["state"]
        try:
            saved = json.loads((folder / "state.json").read_text())
            tables = load_file(str(folder / "tables.safetensors"))
            counts = saved["streams"]
            observer = None
            if saved["observer"] is not None:
                observer = StatisticsObserver()
                for group in saved["observer"]["groups"]:
                    observer.amax[group] = tables[f"amax.{group}"]
                    observer.abs_sum[group] = tables[f"abs_sum.{group}"]
                observer.count.update({g: int(n) for g, n in saved["observer"].get("count", {}).items()})
            state = LayerwiseState(
                int(record["layers_done"]),
                _load_stream(cache, folder, "analysis", counts["analysis"]),
                _load_stream(cache, folder, "floats", counts["floats"]),
                _load_stream(cache, folder, "quantized", counts["quantized"]),
                observer,
                {signature: tuple(group_from_dict(g) for g in groups) for signature, groups in saved["analysed"].items()},
                {linear: _plan_from_dict(linear, data, tables, config) for linear, data in saved["plans"].items()},
                [None if r is None else LinearReport(**r) for r in saved["linears"]],
                {linear: [float.fromhex(v) for v in sums] for linear, sums in saved["squared"].items()},
                {stage: float(v) for stage, v in saved.get("seconds", {}).items()},
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ResumeError(f"the saved state in {folder} is damaged ({type(e).__name__}: "
                              f"{one_line(e)}): start over with --overwrite") from None
        return state
