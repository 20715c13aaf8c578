"""What every serq command promises: --json --quiet prints one JSON object and nothing else
(checked on the real console script, in a process of its own), and Ctrl-C leaves no
half-written output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serq_ao.cli.main import main

SERQ = str(Path(sys.executable).parent / "serq")


@pytest.mark.parametrize("command", [
    ["eval", "ppl", "{model}", "--windows", "1", "--seqlen", "32"],
    ["eval", "tasks", "{model}", "--tasks", "piqa,winogrande", "--limit", "2"],
    ["quantize", "{model}", "--rank", "32", "--out", "{tmp}/q", "--calib-windows", "2", "--calib-seqlen", "32"],
])
def test_json_quiet_prints_one_json_line_and_nothing_on_stderr(command, tiny_model_dir, tmp_path):
    argv = [a.format(model=tiny_model_dir, tmp=tmp_path) for a in command]
    done = subprocess.run([SERQ, *argv, "--json", "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress, no library warnings, no bars
    assert len(done.stdout.splitlines()) == 1
    assert isinstance(json.loads(done.stdout), dict)


def test_usage_error_is_one_line_without_traceback_in_a_real_process(tmp_path):
    done = subprocess.run([SERQ, "eval", "tasks", str(tmp_path), "--tasks", "nope"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("serq: error: --tasks: unknown 'nope'") and len(done.stderr.splitlines()) == 1


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_interrupted_quantize_leaves_no_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import transformers

    original = transformers.PreTrainedModel.save_pretrained

    def save_half_then_interrupt(self, folder, *args, **kwargs):
        original(self, folder, *args, **kwargs)  # the weights are on disk, the report is not
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_half_then_interrupt)
    out = tmp_path / "out" / "q"
    argv = ["quantize", str(tiny_model_dir), "--rank", "32", "--out", str(out), "--calib-windows", "2",
            "--calib-seqlen", "32", "--quiet", "--in-memory"]
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []  # neither the folder nor its temporary twin


def test_interrupted_streamed_quantize_leaves_only_its_resumable_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from serq_ao.streaming import PackedShardWriter

    original = PackedShardWriter.finish

    def finish_then_interrupt(self, *args, **kwargs):
        original(self, *args, **kwargs)  # every file is in the staging folder, none committed
        raise KeyboardInterrupt

    monkeypatch.setattr(PackedShardWriter, "finish", finish_then_interrupt)
    out = tmp_path / "out" / "q"
    argv = ["quantize", str(tiny_model_dir), "--rank", "32", "--out", str(out), "--calib-windows", "2",
            "--calib-seqlen", "32", "--quiet"]
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    # no folder, no temporary twin: only the work a --resume continues from (layer 0 of 2)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".q.serq-partial"]
    assert main(argv) == 2
    assert "--resume to continue it" in capsys.readouterr().err
    monkeypatch.setattr(PackedShardWriter, "finish", original)
    assert main([*argv, "--resume"]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["q"]


def test_interrupted_export_leaves_no_file(quantized_tiny_dir, tmp_path, monkeypatch):
    import torch

    def save_half_then_interrupt(program, f, *args, **kwargs):
        if hasattr(f, "write"):  # serq's export saves through memory, then writes the file
            f.write(b"partial")
        else:
            Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.export, "save", save_half_then_interrupt)
    assert main(["export", str(quantized_tiny_dir), "--out", str(tmp_path / "m.pt2"), "--seqlen", "8", "--quiet"]) == 130
    assert list(tmp_path.iterdir()) == []


def test_interrupted_plot_leaves_no_png(quantized_tiny_dir, tmp_path, monkeypatch):
    import matplotlib.figure

    def save_half_then_interrupt(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", save_half_then_interrupt)
    plots = tmp_path / "plots"
    assert main(["inspect", str(quantized_tiny_dir), "--plot", str(plots), "--quiet"]) == 130
    assert list(plots.iterdir()) == []


def test_outputs_get_the_usual_permissions(quantized_tiny_dir, tiny_model_dir, tmp_path):
    # written through mkstemp / mkdtemp (0600 / 0700) and renamed: they must end up as a plain
    # open() / mkdir() would have made them, readable by others under the usual umask
    import os
    import stat

    plots, program, folder = tmp_path / "plots", tmp_path / "m.pt2", tmp_path / "q"
    umask = os.umask(0o022)
    try:
        assert main(["inspect", str(quantized_tiny_dir), "--plot", str(plots), "--quiet"]) == 0
        assert main(["export", str(quantized_tiny_dir), "--out", str(program), "--seqlen", "8", "--quiet"]) == 0
        assert main(["quantize", str(tiny_model_dir), "--method", "rtn", "--no-diagnostics", "--out", str(folder),
                     "--quiet"]) == 0
    finally:
        os.umask(umask)
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert {mode(p) for p in plots.iterdir()} == {0o644} and mode(program) == 0o644
    assert mode(folder) == 0o755 and {mode(p) for p in folder.iterdir()} == {0o644}
