"""Issue 29's break-it suite for resuming and loading: each fault a user can make is refused
in one line, or (where harmless by design) gives the very model that was saved.

Decisions, and why:
- resume after the calibration file, the dtype or the source checkpoint changed: refused (the
  layers done and the layers to do would come from two different runs);
- a layer shard swapped in from another serq output of the same model (same size): refused
  (the model would be a mix of two quantizations);
- generation_config.json, a tokenizer file or serq_report.json edited, serq-manifest.json
  damaged: refused by every route, as any file the manifest lists (the tokenizer decides the
  ids the model sees; generation_config.json what generate() does; the report's figures are
  read by ``serq inspect``). Restore the file, or re-quantize.
"""

import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serq_ao.files import MANIFEST
from serq_ao.integrations.serialization import load_quantized
from serq_ao.integrations.verify import CheckpointError
from tests.test_faults_report_figures import KILLED_AFTER_LAYER, ROOT, five_layers  # noqa: F401 (fixture)


def serq(*argv, killed_after_layer=None):
    prefix = ["-m", "serq_ao.cli.main"] if killed_after_layer is None else ["-c", KILLED_AFTER_LAYER,
                                                                             str(killed_after_layer)]
    return subprocess.run([sys.executable, *prefix, *map(str, argv)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def one_error_line(run: subprocess.CompletedProcess) -> str:
    errors = [line for line in run.stderr.splitlines() if line.startswith("serq: error: ")]
    assert run.returncode in (1, 2) and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    return errors[0]


# ---- resume -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted(five_layers, tmp_path_factory):  # noqa: F811
    """A run of a copy of the five-layer source killed after layer 1, and its options."""
    root = tmp_path_factory.mktemp("interrupted")
    source = root / "source"
    shutil.copytree(five_layers / "source", source)
    calibration = root / "calib.txt"
    shutil.copy(five_layers / "calib.txt", calibration)
    options = ["--calib-text", calibration, "--calib-windows", "3", "--calib-seqlen", "32", "--quiet", "--recipe",
               "paper"]
    killed = serq("quantize", source, "-o", root / "out", *options, killed_after_layer=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (root / ".out.serq-partial" / "run.json").is_file()
    return root, source, calibration, options


def test_resume_after_the_calibration_file_changed_is_refused(interrupted):
    root, source, calibration, options = interrupted
    original = calibration.read_text()
    try:
        calibration.write_text(original[::-1])
        line = one_error_line(serq("quantize", source, "-o", root / "out", *options, "--resume"))
    finally:
        calibration.write_text(original)
    assert "another calibration" in line and "--overwrite" in line


def test_resume_with_another_dtype_is_refused(interrupted):
    root, source, _, options = interrupted
    line = one_error_line(serq("quantize", source, "-o", root / "out", *options, "--resume", "--dtype", "bfloat16"))
    assert "another dtype" in line


def test_resume_after_the_source_changed_is_refused(interrupted):
    root, source, _, options = interrupted
    config = source / "config.json"
    original, stat = config.read_bytes(), config.stat()
    try:
        edited = json.loads(original)
        edited["rms_norm_eps"] = edited["rms_norm_eps"] * random.choice([2, 10])
        config.write_text(json.dumps(edited))
        line = one_error_line(serq("quantize", source, "-o", root / "out", *options, "--resume"))
    finally:
        config.write_bytes(original)
    assert "another source_files" in line
    # the refusals left the interrupted run as it was: it still continues
    import os
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    resumed = serq("quantize", source, "-o", root / "out", *options, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]


# ---- loading ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_outputs(five_layers, tmp_path_factory):  # noqa: F811
    """Two streamed serq outputs of the same model, calibrated on different samples."""
    root = tmp_path_factory.mktemp("two")
    for seed in (1, 2):
        run = serq("quantize", five_layers / "source", "-o", root / f"seed{seed}", "--calib-text",
                   five_layers / "calib.txt", "--calib-windows", "3", "--calib-seqlen", "32", "--seed", seed,
                   "--quiet", "--recipe", "paper")
        assert run.returncode == 0, run.stderr[-2000:]
    return root / "seed1", root / "seed2"


def test_a_shard_swapped_between_two_outputs_of_one_model_is_refused(two_outputs, tmp_path):
    first, second = two_outputs
    shard = "model-00003-of-00006.safetensors"
    assert (first / shard).stat().st_size == (second / shard).stat().st_size  # the manifest's size check passes
    mixed = tmp_path / "mixed"
    shutil.copytree(first, mixed)
    shutil.copy(second / shard, mixed / shard)
    with pytest.raises(CheckpointError, match="differs from the one in model-00003-of-00006"):
        load_quantized(mixed)
    from transformers import AutoModelForCausalLM

    with pytest.raises(CheckpointError, match="differs from the one in"):
        AutoModelForCausalLM.from_pretrained(mixed)


def _edit_json(name, change):
    def edit(folder: Path):
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))
    return edit


EDITS = {
    "generation_config.json": _edit_json("generation_config.json", lambda g: g.__setitem__("eos_token_id", 7)),
    "tokenizer.json": _edit_json("tokenizer.json", lambda t: t["model"]["vocab"].__setitem__(
        next(iter(t["model"]["vocab"])), 250)),
    "serq_report.json": _edit_json("serq_report.json", lambda r: r["storage"].__setitem__("model_bytes", 1)),
    "serq-manifest.json truncated": lambda f: (f / MANIFEST).write_text((f / MANIFEST).read_text()[:-20]),
    "serq-manifest.json: a hash changed": _edit_json(MANIFEST, lambda m: m["files"]["config.json"].__setitem__(
        "sha256", "0" * 64)),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_listed_file_is_refused_by_every_route(two_outputs, tmp_path, edit):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "edited"
    shutil.copytree(two_outputs[0], folder)
    if "tokenizer.json" in edit and not (folder / "tokenizer.json").is_file():
        pytest.skip("no tokenizer.json")
    EDITS[edit](folder)
    with pytest.raises(CheckpointError) as by_load_quantized:
        load_quantized(folder)
    with pytest.raises(CheckpointError) as by_from_pretrained:
        AutoModelForCausalLM.from_pretrained(folder)
    for error in (by_load_quantized.value, by_from_pretrained.value):
        assert "\n" not in str(error) and str(folder) in str(error)


def test_the_untouched_outputs_load_by_both_routes(two_outputs):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_quantized(two_outputs[0])[0](ids).logits,
                           AutoModelForCausalLM.from_pretrained(two_outputs[0])(ids).logits)
