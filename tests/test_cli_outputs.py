"""The output rules through the commands that write: quantize --out, export --out and
inspect --plot refuse a bad destination before any work, replace only with --overwrite, and
a real `serq quantize` interrupted or killed over an earlier output leaves it or the new one."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serq_ao.cli.main import main
from serq_ao.files import MANIFEST, read_manifest

SERQ = str(Path(sys.executable).parent / "serq")
QUICK = ["--method", "rtn", "--no-diagnostics", "--quiet"]


def quantize(model, out, *extra):
    return main(["quantize", str(model), "--out", str(out), *QUICK, *extra])


def test_quantize_out_rules(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    assert quantize(tiny_model_dir, out) == 0
    manifest = read_manifest(out)
    assert "model.safetensors.index.json" in manifest["files"] and "config.json" in manifest["files"]
    assert quantize(tiny_model_dir, out) == 2
    assert "--out: " in capsys.readouterr().err
    assert quantize(tiny_model_dir, out, "--overwrite") == 0
    (out / "NOTES.md").write_text("mine")
    assert quantize(tiny_model_dir, out, "--overwrite") == 2
    assert "holds NOTES.md" in capsys.readouterr().err and (out / "NOTES.md").read_text() == "mine"
    monkeypatch.chdir(out)  # the first report: `--out .` inside an earlier output emptied it
    before = sorted(p.name for p in out.iterdir())
    assert quantize(tiny_model_dir, ".", "--overwrite") == 2
    assert "is the current folder" in capsys.readouterr().err
    assert quantize(tiny_model_dir, "", "--overwrite") == 2
    assert sorted(p.name for p in out.iterdir()) == before


def test_bad_destination_is_refused_before_the_model_is_loaded(tmp_path, capsys):
    # the model does not exist: the error must be about --out, so the check came first
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "thesis.tex").write_text("years of work")
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    for out, message in [(tmp_path / "folder", "holds files that no serq run wrote (such as thesis.tex)"),
                         (tmp_path / "link", "is a symbolic link")]:
        assert main(["quantize", "no-such-model", "--out", str(out), "--overwrite", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and "model must be" not in err
    assert (tmp_path / "folder" / "thesis.tex").read_text() == "years of work"


def test_export_and_plot_replace_only_with_overwrite(quantized_tiny_dir, tmp_path, capsys):
    program = tmp_path / "m.pt2"
    program.write_bytes(b"someone's program")
    export = ["export", str(quantized_tiny_dir), "--out", str(program), "--seqlen", "8", "--quiet"]
    assert main(export) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and program.read_bytes() == b"someone's program"
    assert main([*export, "--overwrite"]) == 0 and program.stat().st_size > 1000
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "saliency.png").write_bytes(b"my figure")
    (plots / "notes.txt").write_text("mine")
    inspect = ["inspect", str(quantized_tiny_dir), "--plot", str(plots), "--quiet"]
    assert main(inspect) == 2
    assert "--plot: " in capsys.readouterr().err and (plots / "saliency.png").read_bytes() == b"my figure"
    assert main([*inspect, "--overwrite"]) == 0
    assert (plots / "saliency.png").read_bytes()[:4] == b"\x89PNG" and (plots / "notes.txt").read_text() == "mine"


def _complete(out: Path) -> bool:
    manifest = read_manifest(out)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    return manifest is not None and files == set(manifest["files"]) | {MANIFEST}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_real_quantize_stopped_at_many_points_over_an_earlier_output(tiny_model_dir, tmp_path, sig):
    """A real `serq quantize --overwrite` process over an earlier output, stopped at delays
    spread over its work (from the moment it holds the destination): the folder is always
    one complete output, the user's file beside it is untouched, and the next run finishes
    with no temporary left. (Ctrl-C during `import serq_ao` itself still prints a traceback:
    the import is issue 15's.)"""
    argv = [SERQ, "quantize", str(tiny_model_dir), "--rank", "32", "--calib-windows", "2", "--calib-seqlen", "32",
            "--quiet", "--overwrite"]
    out = tmp_path / "q"
    (tmp_path / "thesis.tex").write_text("years of work")
    assert subprocess.run([*argv, "--out", str(out)], timeout=300).returncode == 0
    first = read_manifest(out)
    lock = tmp_path / ".q.serq-lock"

    def start():
        """The process, once it holds the destination (imports done, the work begins)."""
        process = subprocess.Popen([*argv, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while not lock.exists() and process.poll() is None:
            time.sleep(0.01)
        return process, time.perf_counter()

    process, started = start()
    assert process.wait(timeout=300) == 0
    duration = time.perf_counter() - started
    outcomes = []
    for fraction in (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.0):
        previous = read_manifest(out)
        process, started = start()
        time.sleep(max(0.0, started + duration * fraction - time.perf_counter()))
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=300)
        # -SIGINT: the signal came while the interpreter was shutting down, after the output was done
        assert process.returncode in (0, 130, -signal.SIGINT, -signal.SIGKILL), stderr
        if process.returncode == -signal.SIGINT:
            assert read_manifest(out) != previous
        if sig == signal.SIGINT and process.returncode == 130:
            assert b"interrupted" in stderr
        assert _complete(out)
        outcomes.append("old" if read_manifest(out) == previous else "new")
        assert (tmp_path / "thesis.tex").read_text() == "years of work"
    assert subprocess.run([*argv, "--out", str(out)], timeout=300).returncode == 0
    assert _complete(out) and read_manifest(out) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "thesis.tex"], outcomes
