"""serq quantize and serq compare."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from serq_ao.cli.common import (
    StageProgress,
    UsageError,
    applied_fields,
    calibration_from_args,
    calibration_record,
    check_error_windows,
    check_not_quantized,
    check_positions,
    check_token_ids,
    checked_plan,
    config_from_args,
    progress_bar,
    recipe_name,
    status,
)
from serq_ao.files import strict_json
from serq_ao.options import EmbeddingFormat
from serq_ao.quant.config import METHODS
from serq_ao.quant.methods import TransformKind

logger = logging.getLogger(__name__)


def cmd_quantize(args: argparse.Namespace, err: Console) -> int:
    from serq_ao.files import check_writable_folder, claim_output, is_disk_full

    config = config_from_args(args)
    if args.diagnostics:
        check_error_windows(args)
    # the destination is checked and locked before any work; it is written only at the end
    with claim_output(args.out, option="--out", overwrite=args.overwrite) as output:
        if args.offload_folder is not None:  # a read-only or full one would fail only once activations spill
            check_writable_folder(args.offload_folder, option="--offload-folder")
        streaming_logger = logging.getLogger("serq_ao.streaming")
        said_in_the_error = _SaidInTheError()
        streaming_logger.addFilter(said_in_the_error)
        try:
            return _quantize_into(output, config, args, err)
        except Exception as e:
            if is_disk_full(e):
                raise _out_of_space(e, output) from e
            raise
        except KeyboardInterrupt:
            saved = _saved_layers(output)
            if saved is None:
                raise
            raise KeyboardInterrupt(f"{saved} finished layer{'s are' if saved != 1 else ' is'} saved in "
                                    f"{output.partial}: the same command with --resume continues from there") from None
        finally:
            streaming_logger.removeFilter(said_in_the_error)


class _SaidInTheError(logging.Filter):
    """Drops the library's "N layers are saved, --resume continues" warning while a disk-full
    error or an interrupt is in flight (it is logged from inside the handler): the CLI's one
    line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from serq_ao.files import is_disk_full

        in_flight = sys.exc_info()[1]
        return not (record.levelno == logging.WARNING
                    and (isinstance(in_flight, KeyboardInterrupt) or is_disk_full(in_flight)))


def _saved_layers(output) -> int | None:
    """How many finished layers a streamed run of ``output`` kept for --resume (None: none)."""
    from serq_ao.resume import PartialRun, ResumeError

    try:
        saved = PartialRun(output.partial).record()
    except ResumeError:
        return None
    return None if saved is None else int(saved["layers_done"])


def _out_of_space(error: Exception, output):
    """The one line for a run that ran out of disk space: where, and what survived (a streamed
    run keeps every finished layer beside --out, so --resume continues it)."""
    from serq_ao.files import DiskFullError, disk_full_error

    if not isinstance(error, DiskFullError):  # the run's work folder: finished layers' shards, saved state
        written = getattr(error, "filename", None) or f"the run's work in {output.partial}"
        error = disk_full_error("--out", output.path.parent, written)
    done = _saved_layers(output)
    if done is None:
        return type(error)(f"{error}; nothing was written: free some space and run the command again")
    return type(error)(f"{error}; nothing was lost: {done} finished layer{'s are' if done != 1 else ' is'} saved in "
                       f"{output.partial}: free some space and run the same command with --resume to continue")


def _quantize_into(output, config, args: argparse.Namespace, err: Console) -> int:
    from serq_ao.memory import fix_mmap_threshold
    from serq_ao.models import resolve_model_folder

    fix_mmap_threshold()  # this process frees layer-sized tensors all run long (serq_ao/memory.py)
    folder = resolve_model_folder(args.model)
    streamed = _streams(folder, config, args)
    if args.resume and not streamed:
        raise UsageError("--resume continues a streamed run; this one loads the whole model (--in-memory, a method "
                         "without a packed format, residual order global or rank allocation error), which has nothing "
                         "to resume")
    if streamed:
        report, storage, extra = _quantize_streamed(folder, output, config, args, err)
    else:
        report, storage, extra = _quantize_in_memory(output, config, args, err)
    summary = {
        "out": str(args.out),
        **({"recipe": recipe_name(args, config)} if recipe_name(args, config) else {}),  # serq's only
        **applied_fields(config),  # only what the method and format use
        "effective_bits": report.to_dict()["effective_bits"],
        "linears": len(report.linears),
        "packed": bool(storage.linears),
        "streamed": streamed,
        "model_bytes": storage.model_bytes,
        "seconds": report.seconds,
    }
    if args.json:
        print(strict_json(summary))
        return 0
    table = Table(title=f"Quantized {args.model} -> {args.out}")
    table.add_column("method")
    table.add_column("format")
    table.add_column("rank", justify="right")
    table.add_column("bits/weight", justify="right")
    table.add_column("linears", justify="right")
    table.add_column("stored as")
    table.add_column("seconds", justify="right")
    stored = f"packed, {storage.model_bytes / 2**20:.1f} MiB" if storage.linears else "evaluation mode"
    rank = str(config.correction_rank)
    if config.correction_rank and config.rank_allocation != "uniform":
        rank = f"{min(r.rank for r in report.linears)}-{max(r.rank for r in report.linears)} (budget {rank})"
    recipe = recipe_name(args, config)
    table.add_row(f"{config.method} (recipe {recipe})" if recipe else config.method, config.format, rank, f"{report.effective_bits:.2f}",
                  str(len(report.linears)), stored, f"{report.seconds['total']:.1f}")
    Console().print(table)
    return 0


def _streams(folder, config, args: argparse.Namespace) -> bool:
    """Quantize layer by layer straight from the checkpoint's shards? Where the output is
    packed, the order is per group and the weights are safetensors; else load it whole."""
    from serq_ao.integrations.serialization import is_quantized_folder
    from serq_ao.quant.methods import RankAllocation, ResidualOrder
    from serq_ao.streaming import INDEX_FILE, SINGLE_FILE

    if args.in_memory or is_quantized_folder(folder):  # the in-memory path refuses a quantized one
        return False
    if not config.spec.packs:
        logger.info("method %s has no packed format: loading the whole model", config.method)
        return False
    if config.spec.input_transform is TransformKind.FLATTEN and config.residual_order is ResidualOrder.GLOBAL:
        logger.info("residual order global permutes every layer at once: loading the whole model")
        return False
    if config.rank_allocation is not RankAllocation.UNIFORM:
        logger.info("rank allocation %s measures every layer before quantizing any: loading the whole model",
                    config.rank_allocation)
        return False
    return (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()


def _activation_cache(args: argparse.Namespace):
    from serq_ao.files import disk_full_error, is_disk_full
    from serq_ao.quant.activations import GiB, ActivationCache, ActivationStream

    folder = args.offload_folder or Path(args.out).absolute().parent
    option = "--offload-folder" if args.offload_folder is not None else "--out (activations spill beside it unless --offload-folder says elsewhere)"

    class OffloadStream(ActivationStream):
        """A stream whose spill, on a full disk, names the option that chose its folder."""

        def append(self, tensor) -> None:
            try:
                super().append(tensor)
            except Exception as e:
                if is_disk_full(e):
                    raise disk_full_error(option, folder, "calibration activations past --activation-memory") from e
                raise

    class OffloadCache(ActivationCache):
        def stream(self) -> OffloadStream:
            return OffloadStream(self)

    memory = None if args.activation_memory is None else int(args.activation_memory * GiB)
    return OffloadCache(memory, folder)


def _describe(args: argparse.Namespace, report, storage, diagnostics) -> dict:
    """What serq_report.json records beside the weights."""
    return {
        "source": str(args.model),
        "calibration": calibration_record(args),
        "report": report.to_dict(),
        "storage": storage.to_dict(),
        "diagnostics": None if diagnostics is None else diagnostics.to_dict(),
    }


def _quantize_streamed(folder, output, config, args: argparse.Namespace, err: Console):
    from serq_ao.models import load_float_tokenizer, load_model_config, resolve_dtype
    from serq_ao.quant.diagnostics import diagnostics_of
    from serq_ao.quant.methods import ResidualOrder
    from serq_ao.streaming import CheckpointReader, quantize_checkpoint

    if config.spec.input_transform is TransformKind.FLATTEN and config.residual_order is ResidualOrder.AUTO:
        logger.warning("residual order: per group (streamed layers cannot share one order; pass --in-memory for auto)")
    with status(err, f"reading {args.model}", args.quiet):
        tokenizer = load_float_tokenizer(folder, trust_remote_code=args.trust_remote_code)
        CheckpointReader(folder)  # every shard's header, before calibration data is prepared
        needs_batches = config.needs_statistics or config.needs_input_ids or args.diagnostics
        batches = calibration_from_args(tokenizer, args, load_model_config(
            folder, trust_remote_code=args.trust_remote_code)) if needs_batches else None
    result = {}

    def describe(report, storage):
        diagnostics = diagnostics_of(report) if args.diagnostics else None
        result["extra"] = _describe(args, report, storage, diagnostics)
        return result["extra"]

    with _activation_cache(args) as cache, progress_bar(err, args.quiet) as progress:
        report, written = quantize_checkpoint(
            folder, config, batches, output, overwrite=args.overwrite, resume=args.resume, tokenizer=tokenizer, dtype=resolve_dtype(args.dtype),
            device=args.device, activations=cache, error_windows=args.error_windows if args.diagnostics else 0,
            collect_statistics=args.diagnostics, progress=StageProgress(progress), describe=describe,
            trust_remote_code=args.trust_remote_code,
        )
    return report, written.storage, result["extra"]


def _quantize_in_memory(output, config, args: argparse.Namespace, err: Console):
    from serq_ao.quant.diagnostics import quantize_with_diagnostics
    from serq_ao.models import load_model
    from serq_ao.quant.packing import storage_report
    from serq_ao.quant.pipeline import quantize_, quantize_model
    from serq_ao.integrations.serialization import save_quantized

    with status(err, f"loading {args.model}", args.quiet):
        # the layers visit --device one at a time; the model itself stays on the CPU
        model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu", trust_remote_code=args.trust_remote_code)
        check_not_quantized(model, args.model)
        plan = checked_plan(model, config)
        needs_batches = config.needs_statistics or config.needs_input_ids or args.diagnostics
        batches = calibration_from_args(tokenizer, args, model) if needs_batches else None
    # packed weights where the method has a packed format; LQER / L2QER stay in evaluation mode
    quantize = quantize_ if config.spec.packs else quantize_model
    diagnostics = None
    with _activation_cache(args) as cache, progress_bar(err, args.quiet) as progress:
        options = {"plan": plan, "progress": StageProgress(progress), "device": args.device, "activations": cache}
        if args.diagnostics:
            report, diagnostics = quantize_with_diagnostics(model, config, batches, quantize=quantize,
                                                            error_windows=args.error_windows, **options)
        else:
            report = quantize(model, config, batches, **options)
    storage = storage_report(model)
    extra = _describe(args, report, storage, diagnostics)
    with status(err, f"saving {args.out}", args.quiet):
        save_quantized(model, tokenizer, output, config, extra)
    return report, storage, extra


def cmd_compare(args: argparse.Namespace, err: Console) -> int:
    """Quantize the same model with several methods and put their perplexities side by side."""
    from serq_ao.quant.calibration import calibrate
    from serq_ao.data import evaluation_windows
    from serq_ao.formats import get_format
    from serq_ao.eval import perplexity
    from serq_ao.models import load_model
    from serq_ao.quant.pipeline import quantize_model

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    allowed = ("fp", *METHODS)
    bad = [m for m in methods if m not in allowed]
    if bad or not methods:
        raise UsageError(f"--methods must be a comma-separated list of {allowed}, got {args.methods!r}")
    quantized = [m for m in methods if m != "fp"]
    configs = {m: config_from_args(args, m, quantized) for m in quantized}
    if not quantized and (args.rank is not None or args.scale_mode is not None or args.residual_order is not None
                          or args.gptq or args.quantize_lm_head or args.embeddings != EmbeddingFormat.FLOAT.value):
        raise UsageError("--methods fp quantizes nothing: drop --rank, --scale-mode, --residual-order, --gptq, "
                         "--quantize-lm-head and --embeddings")
    first = next(iter(configs.values()), None)
    rows, stats = [], None
    with progress_bar(err, args.quiet) as progress:
        for method in methods:
            loading = progress.add_task(f"{method}: load {args.model}", total=None)
            model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device,
                                              trust_remote_code=args.trust_remote_code)
            check_not_quantized(model, args.model)
            windows = evaluation_windows(tokenizer, args.corpus, args.windows, args.seqlen)
            check_positions(model, "--seqlen", windows.shape[1])
            check_token_ids(windows, model)
            progress.remove_task(loading)
            bits, quant_seconds = 32.0, 0.0
            if method != "fp":
                config = configs[method]
                plan = checked_plan(model, config)
                if config.needs_input_ids:  # GPTQ and the rank allocation run the layers on the ids
                    calibration = calibration_from_args(tokenizer, args, model)
                elif config.needs_statistics:
                    if stats is None:
                        batches = calibration_from_args(tokenizer, args, model)
                        task = progress.add_task(f"{method}: calibrate", total=batches.shape[0])
                        stats = calibrate(model, plan, batches, on_batch=lambda k: progress.advance(task, k))
                    calibration = stats
                else:
                    calibration = None
                started = time.perf_counter()
                report = quantize_model(model, config, calibration, plan=plan,
                                        progress=StageProgress(progress, prefix=f"{method}: "))
                bits, quant_seconds = report.to_dict()["effective_bits"], time.perf_counter() - started
            task = progress.add_task(f"{method}: perplexity", total=windows.shape[0])
            result = perplexity(model, windows, on_batch=lambda k: progress.advance(task, k))
            rows.append({"method": method, "recipe": recipe_name(args, configs[method]) if method != "fp" else None,
                         "config": applied_fields(configs[method]) if method != "fp" else None, "bits": bits,
                         "ppl": result.ppl, "quantize_seconds": quant_seconds, "eval_seconds": result.seconds})
    record = {
        "model": str(args.model),
        "format": args.format,
        "rank": configs["serq"].rank if "serq" in configs else None,
        "rank_allocation": str(configs["serq"].rank_allocation) if "serq" in configs else None,
        "scale_mode": None if first is None or args.format != "mxfp4" else str(first.scale_mode),
        "gptq": {m: c.gptq for m, c in configs.items()},
        "corpus": args.corpus,
        "windows": int(windows.shape[0]),
        "calibration": calibration_record(args),
        "results": rows,
    }
    if args.json:
        print(strict_json(record))
        return 0
    label = get_format(args.format, record["scale_mode"] or "floor").label
    table = Table(title=f"{args.model}, {label}: perplexity on {args.corpus} ({record['windows']} windows)")
    for column in ("method", "bits/weight", "perplexity", "quantize s (calibration apart)"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        allocated = ", ranks by error" if record["rank_allocation"] == "error" else ""
        name = (f"serq (r={record['rank']}{allocated}, recipe {row['recipe']})" if row["method"] == "serq"
                else row["method"])
        table.add_row(name, f"{row['bits']:.2f}", f"{row['ppl']:.2f}", f"{row['quantize_seconds']:.1f}")
    Console().print(table)
    return 0
