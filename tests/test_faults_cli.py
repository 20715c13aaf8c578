"""Issue 29, command-line faults: each ends in one line on stderr naming the file or option
(no traceback), run as a user runs it, in a fresh process; nothing half-written is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CALIB = ["--calib-windows", "2", "--calib-seqlen", "32"]


def serq(*argv, check_rc: int | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``serq ARGV`` in a fresh process, stderr to a pipe (not a terminal)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "serq_ao.cli.main", *map(str, argv)], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=600, **kwargs)
    if check_rc is not None:
        assert result.returncode == check_rc, result.stderr[-3000:]
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failed command printed (torch's and torchao's import noise apart)."""
    noise = ("Failed to load", "_pytree.py", "register_constant")
    lines = [line for line in result.stderr.splitlines() if line.strip() and not any(n in line for n in noise)]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("serq: error: "), result.stderr[-3000:]
    return lines[0]


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size, name)``: a fresh tmpfs of ``size`` (e.g. "200k") under tmp_path; all unmounted afterwards."""
    mounted = []

    def mount(size: str, name: str | None = None) -> Path:
        point = tmp_path / (name or f"fs-{uuid.uuid4().hex[:6]}")
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"a real full or read-only file system needs mount (root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def remount(point: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)


def fill(point: Path) -> None:
    """Fill a file system to the last byte."""
    with open(point / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


# ---- case 1: the disk of --out fills up --------------------------------------------------------------


def test_disk_full_while_writing_out_is_one_line_and_resume_finishes(tiny_model_dir, tmpfs):
    # 200 KiB holds the first layer's shard and saved state, not the whole output: the run fails
    # after a finished layer, which --resume continues once there is room
    disk = tmpfs("200k")
    out = disk / "q"
    line = error_line(serq("quantize", tiny_model_dir, "--out", out, "--rank", "32", *CALIB, "--quiet", check_rc=2))
    assert f"--out: no space left on the disk holding {disk}" in line, line
    assert "nothing was lost: 1 finished layer is saved" in line and "--resume" in line, line
    assert not out.exists()  # never a half-written output under its name
    remount(disk, "size=2m")
    resumed = serq("quantize", tiny_model_dir, "--out", out, "--rank", "32", *CALIB, "--quiet", "--resume", check_rc=0)
    assert (out / "serq-manifest.json").is_file()
    assert "layers" not in resumed.stderr and "reading" not in resumed.stderr  # --quiet: no progress lines
    assert sorted(p.name for p in disk.iterdir()) == ["q"]  # the work folder is gone once done


def test_disk_full_before_any_layer_says_nothing_was_written(tiny_model_dir, tmpfs):
    disk = tmpfs("100k")
    line = error_line(serq("quantize", tiny_model_dir, "--out", disk / "q", "--rank", "32", *CALIB, "--quiet",
                           check_rc=2))
    assert f"--out: no space left on the disk holding {disk}" in line and "nothing was written" in line, line
    assert list(disk.iterdir()) == []


def test_disk_full_in_memory_save_and_export(tiny_model_dir, quantized_tiny_dir, tmpfs):
    disk = tmpfs("100k")
    # --in-memory saves the whole model at the end, into a staging folder beside --out
    line = error_line(serq("quantize", tiny_model_dir, "--out", disk / "q", "--method", "rtn", "--in-memory", *CALIB,
                           "--quiet", check_rc=2))
    assert f"--out: no space left on the disk holding {disk} while writing {disk / 'q'}" in line, line
    assert list(disk.iterdir()) == []
    line = error_line(serq("export", quantized_tiny_dir, "--out", disk / "m.pt2", "--seqlen", "16", "--quiet",
                           check_rc=2))
    assert f"--out: no space left on the disk holding {disk} while writing {disk / 'm.pt2'}" in line, line
    assert list(disk.iterdir()) == []


# ---- case 2: --offload-folder ------------------------------------------------------------------------


def test_offload_folder_full_or_read_only_is_refused_before_work(tiny_model_dir, tmpfs, tmp_path):
    full = tmpfs("64k")
    fill(full)
    args = ["quantize", tiny_model_dir, "--rank", "32", *CALIB, "--quiet", "--activation-memory", "0"]
    line = error_line(serq(*args, "--out", tmp_path / "a", "--offload-folder", full, check_rc=2))
    assert f"--offload-folder: the disk holding {full} is full" in line, line
    read_only = tmpfs("1m")
    remount(read_only, "ro")
    line = error_line(serq(*args, "--out", tmp_path / "b", "--offload-folder", read_only, check_rc=2))
    assert line.endswith(f"--offload-folder: cannot write into {read_only} (read-only file system)"), line
    a_file = tmp_path / "file"
    a_file.write_text("x")
    line = error_line(serq(*args, "--out", tmp_path / "c", "--offload-folder", a_file, check_rc=2))
    assert f"--offload-folder: {a_file} is a file, not a folder" in line, line
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("fs-")) == ["file"]


def test_offload_folder_filling_up_during_the_run_names_it(tiny_model_dir, tmpfs, tmp_path):
    disk = tmpfs("20k")  # holds the probe, not the activations spilled past --activation-memory 0
    line = error_line(serq("quantize", tiny_model_dir, "--out", tmp_path / "q", "--rank", "32", *CALIB, "--quiet",
                           "--activation-memory", "0", "--offload-folder", disk, check_rc=2))
    assert f"--offload-folder: no space left on the disk holding {disk} while writing calibration activations" \
        in line, line
    assert list(disk.iterdir()) == [] and not (tmp_path / "q").exists()


# ---- cases 3 and 4: a pickled checkpoint, a broken or missing tokenizer ---------------------------------


def _pickled_checkpoint(folder: Path, ran: Path) -> None:
    """The model's weights as pytorch_model.bin, with one entry a pickle that would create ``ran``."""
    import torch
    from safetensors.torch import load_file

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {ran}",)

    state = load_file(folder / "model.safetensors")
    state["payload"] = Payload()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _break(kind: str, folder: Path, ran: Path) -> str:
    """Damage the model folder ``folder`` as ``kind`` says; returns what the one line must say."""
    if kind == "pickle":
        _pickled_checkpoint(folder, ran)
        return (f"{folder / 'pytorch_model.bin'}: holds pickled Python objects other than tensors (Trying to load "
                "unsupported GLOBAL posix.system whose module posix is blocked); it was not loaded, so nothing in it "
                "ran")
    tokenizer = folder / "tokenizer.json"
    if kind == "tokenizer not JSON":
        tokenizer.write_text(tokenizer.read_text()[:100])
        return f"{tokenizer}: not valid JSON ("
    if kind == "tokenizer not a tokenizer":  # valid JSON that the tokenizers library cannot parse
        record = json.loads(tokenizer.read_text())
        record["model"]["vocab"] = 5
        tokenizer.write_text(json.dumps(record))
        return f"{tokenizer}: not a tokenizer the tokenizers library can read (invalid type: integer `5`, expected a map"
    if kind == "config.json not JSON":
        (folder / "config.json").write_text('{"model_type": "llama",')
        return f"{folder / 'config.json'}: not valid JSON (Expecting property name"
    if kind == "config.json a list":
        (folder / "config.json").write_text("[1, 2]")
        return f"{folder / 'config.json'}: not a model config (a JSON list, not an object)"
    if kind == "tokenizer.json deleted":
        tokenizer.unlink()
        return (f"{folder} has tokenizer_config.json but no tokenizer.json or tokenizer.model, the files that define "
                "the vocabulary: save the tokenizer beside the model (tokenizer.save_pretrained)")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["pickle", "tokenizer not JSON", "tokenizer not a tokenizer", "tokenizer.json deleted",
                                  "config.json not JSON", "config.json a list"])
def test_damaged_model_folder_is_one_line_naming_the_file(kind, tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    ran = tmp_path / "payload-ran"
    expected = _break(kind, folder, ran)
    line = error_line(serq("quantize", folder, "--out", tmp_path / "q", *CALIB, "--quiet", check_rc=2))
    assert expected in line, line
    assert not ran.exists()  # the pickle was refused, never run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---- case 5: --overwrite over an earlier output whose shard shrank ----------------------------------


def test_overwrite_over_a_shrunk_shard_says_it_changed(tiny_model_dir, quantized_tiny_dir, tmp_path):
    import shutil

    out = tmp_path / "q"
    shutil.copytree(quantized_tiny_dir, out)
    shard = sorted(out.glob("*.safetensors"))[-1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 3)
    line = error_line(serq("quantize", tiny_model_dir, "--out", out, "--overwrite", "--rank", "32", *CALIB, "--quiet",
                           check_rc=2))
    assert (f"--out: {out} holds {shard.name}, which changed since the serq run that wrote it ({size // 3} bytes, "
            f"{size} written)") in line and "did not write" not in line, line
    assert shard.stat().st_size == size // 3  # refused: nothing of the old output was touched


# ---- case 6: progress where stderr is no terminal ---------------------------------------------------


def test_progress_lines_on_a_pipe(tiny_model_dir, tmp_path):
    result = serq("quantize", tiny_model_dir, "--out", tmp_path / "q", "--rank", "32", *CALIB, check_rc=0)
    lines = result.stderr.splitlines()
    assert f"reading {tiny_model_dir} ..." in lines, result.stderr
    assert "layers: started" in lines and "layers: done, 2/2 in" in result.stderr, result.stderr
    assert "\x1b" not in result.stderr  # plain text, no cursor movement


def test_plain_progress_rate():
    import io
    import time

    from rich.console import Console

    from serq_ao.cli.common import PlainProgress, progress_bar

    def lines(interval: float, pause: float = 0.0) -> list[str]:
        stream = io.StringIO()
        console = Console(file=stream, force_terminal=False, width=200)
        with PlainProgress(console, interval=interval) as progress:
            task = progress.add_task("layers", total=30)
            for done in range(1, 31):
                if done == 20 and pause:
                    time.sleep(pause)
                progress.update(task, completed=done)
            other = progress.add_task("perplexity", total=4)
            progress.advance(other, 1)
            progress.remove_task(other)
        return stream.getvalue().splitlines()

    # a long interval: the start and the end of each task only
    quiet = lines(3600)
    assert quiet[:2] == ["layers: started", "layers: done, 30/30 in 0s"], quiet
    assert quiet[2:] == ["perplexity: started", "perplexity: stopped at 1/4 after 0s"], quiet
    # one line per interval between them, with done/total
    between = [line for line in lines(0.2, pause=0.3) if not line.endswith("started") and "done" not in line]
    assert between[0].startswith("layers: 20/30 ("), between
    assert not isinstance(progress_bar(Console(file=io.StringIO(), force_terminal=True), False), PlainProgress)
    assert not isinstance(progress_bar(Console(file=io.StringIO(), force_terminal=False), True), PlainProgress)


# ---- case 7: --json lists only the options the method and format use ---------------------------------


OPTION_VALUES = {"rank": "32", "rank_allocation": "uniform", "flattening_strength": "0.5", "saliency_unit": "channel",
                 "residual_order": "per_group", "scale_mode": "floor", "weight_scales": "rule", "rotation": "32",
                 "gptq_order": "columns"}


@pytest.mark.parametrize("fmt", ["mxfp4", "w4a8", "w4a4"])
@pytest.mark.parametrize("method", ["rtn", "smoothquant", "lqer", "l2qer", "serq"])
def test_json_fields_are_the_options_the_command_line_accepts(method, fmt, tmp_path):
    from serq_ao.cli.common import UsageError, applied_fields, config_from_args
    from serq_ao.cli.main import build_parser

    base = ["quantize", "m", "--out", str(tmp_path / "o"), "--method", method, "--format", fmt]
    fields = applied_fields(config_from_args(build_parser().parse_args(base)))
    for option, value in OPTION_VALUES.items():
        try:
            config_from_args(build_parser().parse_args([*base, f"--{option.replace('_', '-')}", value]))
            accepted = True
        except UsageError:
            accepted = False
        assert (option in fields) == accepted, (option, fields)


def test_quantize_json_leaves_out_what_the_method_does_not_use(tiny_model_dir, tmp_path):
    result = serq("quantize", tiny_model_dir, "--out", tmp_path / "q", "--method", "rtn", "--format", "w4a8",
                  *CALIB, "--quiet", "--json", check_rc=0)
    record = json.loads(result.stdout)
    assert record["method"] == "rtn" and record["format"] == "w4a8" and "weight_scales" in record
    for unused in ("recipe", "rank", "rank_allocation", "flattening_strength", "saliency_unit", "residual_order",
                   "scale_mode", "gptq_order", "smoothquant_alpha", "lowrank_rank", "fold_into_linears"):
        assert unused not in record, unused


# ---- break-it: Ctrl-C while a streamed run writes ----------------------------------------------------


def test_ctrl_c_during_a_streamed_run_is_one_line_and_keeps_the_finished_layers(tmp_path):
    import signal
    import time

    from tests.conftest import make_byte_tokenizer, make_tiny_llama

    from transformers import LlamaForCausalLM

    config = make_tiny_llama().config
    config.num_hidden_layers = 16  # time to interrupt between two layers
    model = LlamaForCausalLM(config)
    source = tmp_path / "deep"
    model.save_pretrained(source)
    make_byte_tokenizer(bos=True).save_pretrained(source)
    out = tmp_path / "q"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "serq_ao.cli.main", "quantize", str(source), "--out", str(out),
                                "--rank", "32", *CALIB, "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT, env=env)
    committed = tmp_path / ".q.serq-partial" / "run.json"
    deadline = time.monotonic() + 300
    while not committed.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    assert process.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(("serq", "WARNING", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("serq: interrupted; "), stderr[-3000:]
    assert "finished layer" in lines[0] and "--resume continues" in lines[0], lines
    assert "Traceback" not in result.stderr and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.serq-partial", "deep"]


def test_bench_on_a_folder_with_a_damaged_report_names_it(quantized_tiny_dir, tmp_path):
    import shutil

    folder = tmp_path / "q"
    shutil.copytree(quantized_tiny_dir, folder)
    (folder / "serq_report.json").write_text("{")  # bench read the source model from it before any check
    line = error_line(serq("bench", folder, "--prefill", "8", "--decode", "1", "--repeats", "1", "--quiet",
                           check_rc=1))
    assert f"{folder / 'serq_report.json'}: has 1 bytes" in line, line


@pytest.mark.parametrize("command", [["quantize", "--rank", "32", *CALIB, "--out", "OUT"],
                                     ["quantize", "--rank", "32", *CALIB, "--out", "OUT", "--in-memory"],
                                     ["compare", "--rank", "32", *CALIB, "--windows", "1", "--seqlen", "32"],
                                     ["eval", "ppl", "--windows", "1", "--seqlen", "32"]])
def test_a_tokenizer_beyond_the_models_vocabulary_is_one_line(command, tmp_path):
    # a folder whose tokenizer is not its model's: calibration ended in a ValueError traceback,
    # compare and eval in an IndexError from inside the embedding
    from tests.conftest import make_byte_tokenizer, make_tiny_llama

    folder = tmp_path / "mismatched"
    make_tiny_llama(vocab_size=128).save_pretrained(folder)
    make_byte_tokenizer(bos=True).save_pretrained(folder)  # ids up to 256
    argv = [command[0], *command[1:2], folder, *command[2:]] if command[0] == "eval" else [command[0], folder,
                                                                                           *command[1:]]
    result = serq(*[str(tmp_path / "out") if a == "OUT" else a for a in argv], "--quiet")
    assert result.returncode == 2
    line = error_line(result)
    assert "outside the model's vocabulary [0, 128)" in line and "tokenizer does not belong" in line, line
    assert not (tmp_path / "out").exists()
