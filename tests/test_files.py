"""What serq may write and delete (serq_ao/files.py): refusals before any work, atomic
replacement under interrupts and kills at every step, one writer at a time, stale
temporaries cleaned."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from serq_ao.files import MANIFEST, OutputError, claim_output, read_manifest

WRITER = Path(__file__).with_name("files_fault_writer.py")


def write_output(dest, files: dict[str, bytes], overwrite=False):
    with claim_output(dest, overwrite=overwrite) as output, output.write() as folder:
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_new_folder_gets_a_manifest_of_every_file(tmp_path):
    write_output(tmp_path / "a" / "out", {"x.bin": b"12345", "sub/y.txt": b"hello"})
    manifest = read_manifest(tmp_path / "a" / "out")
    assert set(manifest["files"]) == {"x.bin", "sub/y.txt"}
    assert manifest["files"]["x.bin"]["size"] == 5
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["out"]  # no lock, no temporary left


def test_earlier_output_is_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    write_output(out, {"x.bin": b"old"})
    with pytest.raises(OutputError, match="--out: .* holds an earlier serq output; pass --overwrite"):
        write_output(out, {"x.bin": b"new"})
    assert tree(out)["x.bin"] == b"old"
    write_output(out, {"y.bin": b"new"}, overwrite=True)
    assert set(tree(out)) == {"y.bin", MANIFEST}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("intruder", ["thesis.tex", "NOTES.md", "sub/notes.txt"])
def test_a_file_serq_did_not_write_is_never_deleted(tmp_path, intruder):
    out = tmp_path / "out"
    write_output(out, {"x.bin": b"old"})
    (out / intruder).parent.mkdir(parents=True, exist_ok=True)
    (out / intruder).write_text("years of work")
    with pytest.raises(OutputError, match=f"holds {intruder}, which the serq run that wrote it did not write"):
        write_output(out, {"x.bin": b"new"}, overwrite=True)
    assert (out / intruder).read_text() == "years of work" and tree(out)["x.bin"] == b"old"


def test_an_edited_file_counts_as_the_users(tmp_path):
    out = tmp_path / "out"
    write_output(out, {"README.md": b"model card"})
    (out / "README.md").write_text("model card, with my notes")
    with pytest.raises(OutputError, match="holds README.md"):
        write_output(out, {"x.bin": b"new"}, overwrite=True)


@pytest.mark.parametrize("marker", [
    {"serq_config.json": "{}"},
    {"config.json": json.dumps({"quantization_config": {"quant_method": "serq"}})},
    {MANIFEST: "{}"},  # a manifest that is not one
    {MANIFEST: json.dumps({"format": "something else", "files": {}})},
])
def test_serq_markers_without_a_manifest_do_not_make_a_folder_ours(tmp_path, marker):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for name, text in marker.items():
        (out / name).write_text(text)
    with pytest.raises(OutputError, match="holds files that no serq run wrote"):
        write_output(out, {"x.bin": b"new"}, overwrite=True)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_empty_folder_is_used_and_missing_parents_are_made(tmp_path):
    (tmp_path / "empty").mkdir()
    write_output(tmp_path / "empty", {"x.bin": b"1"})
    write_output(tmp_path / "p" / "q" / "out", {"x.bin": b"1"})
    assert tree(tmp_path / "empty")["x.bin"] == b"1" and tree(tmp_path / "p" / "q" / "out")["x.bin"] == b"1"


def test_destinations_refused_before_any_work(tmp_path, monkeypatch):
    inside = tmp_path / "earlier"
    write_output(inside, {"x.bin": b"old"})
    monkeypatch.chdir(inside)
    for bad in (".", "", "  ", str(inside), str(tmp_path)):
        with pytest.raises(OutputError, match="--out"):
            with claim_output(bad, overwrite=True):
                pytest.fail("claimed")
    assert tree(inside)["x.bin"] == b"old"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        with claim_output(tmp_path / "file"):
            pass
    (tmp_path / "link").symlink_to(inside)
    with pytest.raises(OutputError, match="is a symbolic link"):
        with claim_output(tmp_path / "link", overwrite=True):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    with pytest.raises(OutputError, match="cannot write"):
        with claim_output(parent / "out"):
            pass


def test_read_only_filesystem_is_refused(tmp_path):
    # root may write anywhere a mode allows; a read-only mount stops it too: /proc stands in
    with pytest.raises(OutputError, match="--out: cannot"):
        with claim_output("/proc/serq-out"):
            pass


def test_a_second_concurrent_writer_is_refused(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('f', {str(WRITER.parent.parent / 'serq_ao' / 'files.py')!r})\n"
        "f = importlib.util.module_from_spec(spec); spec.loader.exec_module(f)\n"
        f"with f.claim_output({str(out)!r}):\n"
        "    print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"another serq process \(pid {holder.pid}\) is writing"):
            with claim_output(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with claim_output(out):  # the kernel released the dead holder's lock
        pass


def test_file_outputs(tmp_path):
    from serq_ao.files import atomic_path

    target = tmp_path / "m.pt2"
    with claim_output(target, folder=False) as output, output.write() as tmp:
        tmp.write_bytes(b"first")
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        with claim_output(target, folder=False):
            pass
    with pytest.raises(OutputError, match="is a folder, not a file"):
        with claim_output(tmp_path, folder=False, overwrite=True):
            pass
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path):
    out = tmp_path / "out"
    write_output(out, {"x.bin": b"old"})
    stale = [tmp_path / ".out.serq-new-0123abcd", tmp_path / ".out.serq-old-89abcdef", tmp_path / ".out.k2j4_x9z.tmp"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".other.serq-new-0123abcd").mkdir()  # another destination's: not ours to touch
    (tmp_path / ".out.notes").write_text("keep")  # not a name serq makes
    write_output(out, {"x.bin": b"new"}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.serq-new-0123abcd", ".out.notes", "out"]


def _run_writer(dest: Path, tag: str, signal_name: str, step: int, swap: str = "exchange") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WRITER), str(dest), tag, signal_name, str(step), swap],
                          capture_output=True, text=True, timeout=60)


def _whole_output(dest: Path) -> str:
    """The tag of the complete output at ``dest``; fails on anything else."""
    files = tree(dest)
    manifest = read_manifest(dest)
    assert manifest is not None and set(files) == set(manifest["files"]) | {MANIFEST}, files.keys()
    tags = {data.split(b":")[0].decode() for name, data in files.items() if name != MANIFEST}
    assert len(tags) == 1 and set(files) == {"a.bin", "b.bin", "sub/c.bin", MANIFEST}, (tags, files.keys())
    return tags.pop()


@pytest.mark.parametrize("swap", ["exchange", "rename"])
@pytest.mark.parametrize("signal_name", ["KILL", "INT"])
def test_interrupt_or_kill_at_every_step_leaves_the_old_or_the_new_output(tmp_path, signal_name, swap):
    """The interrupt suite: over an existing output, stop the writer before each of its
    file-system steps; the destination always holds one complete output, the user's file
    beside it is untouched, and the next run leaves no temporary behind.

    ``rename``: without an atomic exchange the swap is two renames; Ctrl-C is held back
    between them, but a kill there leaves the complete old output under its temporary name,
    which the next claim of the destination puts back before anything else."""
    seed = tmp_path / "seed"
    assert _run_writer(seed / "out", "old", signal_name, 0, swap).returncode == 0
    total = int(_run_writer(seed / "out", "new", signal_name, 0, swap).stdout)
    assert total >= 10
    outcomes = {}
    for step in range(1, total + 1):
        case = tmp_path / f"step{step}"
        case.mkdir()
        (case / "thesis.tex").write_text("years of work")
        assert _run_writer(case / "out", "old", signal_name, 0, swap).returncode == 0
        done = _run_writer(case / "out", "new", signal_name, step, swap)
        expected = -signal.SIGKILL if signal_name == "KILL" else 130
        assert done.returncode in (expected, 0), (step, done.returncode, done.stderr)
        if not (case / "out").exists() and swap == "rename" and signal_name == "KILL":
            with claim_output(case / "out", overwrite=True):  # restores it
                outcomes[step] = "restored " + _whole_output(case / "out")
        else:
            outcomes[step] = _whole_output(case / "out") if (case / "out").exists() else "missing"
        assert (case / "thesis.tex").read_text() == "years of work"
        # the next run cleans up
        assert _run_writer(case / "out", "next", signal_name, 0, swap).returncode == 0
        assert _whole_output(case / "out") == "next"
        assert sorted(p.name for p in case.iterdir()) == ["out", "thesis.tex"], (step, list(case.iterdir()))
    assert "missing" not in outcomes.values() and "restored new" not in outcomes.values(), outcomes
    assert {"old", "new"} <= set(outcomes.values()), outcomes  # both sides of the swap were hit
    if swap == "rename" and signal_name == "KILL":
        assert "restored old" in outcomes.values()


def test_benchmark_results_replace_only_earlier_results(tmp_path):
    from serq_ao.bench import write_json

    result = tmp_path / "r.json"
    write_json(result, {"a": 1})
    write_json(result, {"a": 2})  # an earlier result: replaced
    assert json.loads(result.read_text()) == {"a": 2}
    notes = tmp_path / "notes.txt"
    notes.write_text("years of work")
    with pytest.raises(OutputError, match="exists and is not a JSON result"):
        write_json(notes, {"a": 1})
    assert notes.read_text() == "years of work"


def test_a_changed_file_is_named_as_changed_not_as_foreign(tmp_path):
    out = tmp_path / "out"
    write_output(out, {"x.bin": b"old bytes"})
    (out / "x.bin").write_bytes(b"old")  # shrunk: serq wrote it, it changed since
    with pytest.raises(OutputError, match=r"holds x.bin, which changed since the serq run that wrote it \(3 bytes, 9 written\)"):
        write_output(out, {"x.bin": b"new"}, overwrite=True)
    assert tree(out)["x.bin"] == b"old"


def test_a_file_in_the_way_of_the_parent_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=f"--out: {tmp_path / 'afile'} is a file, so .*m.pt2 cannot be made inside it"):
        with claim_output(tmp_path / "afile" / "sub" / "m.pt2", folder=False):
            pass


def test_machine_info_names_the_cpu_and_its_instruction_sets():
    from serq_ao.bench import CPU_FEATURES, machine_info
    from serq_ao.kernels import cpu_native

    info = machine_info()
    assert info["cpu_model"] and set(info["cpu_features"]) <= set(CPU_FEATURES)
    best = cpu_native.cpu_best()  # the kernels' own run-time detection agrees with the record
    assert ("avx512_vnni" in info["cpu_features"]) == (best == "avx512_vnni")
    assert ("avx2" in info["cpu_features"]) == (best != "portable")
