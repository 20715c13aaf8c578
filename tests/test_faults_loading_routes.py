"""Issue 29: every route that loads a serq folder runs the same verification. A serq output's
config.json with an edited ``rms_norm_eps`` or ``rope_theta`` (every tensor still fits: only
the folder's manifest can tell) was refused by ``serq`` and ``load_quantized`` but loaded
silently, as another model, by ``AutoModelForCausalLM.from_pretrained`` after ``import serq_ao``.

Routes: from_pretrained in a fresh process, load_quantized, the CLI (``serq inspect``); the
folders: a serq output, the same as a Hub snapshot (its files links to blobs), a folder the
user's own ``save_pretrained`` wrote (no manifest: it must still load, and an edit of its
config.json is caught by the config record in the weights' header), and a serq output whose
manifest was deleted (the same record catches the edit)."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serq_ao.files import MANIFEST
from serq_ao.integrations.serialization import load_quantized
from serq_ao.integrations.verify import CheckpointError

ROOT = Path(__file__).resolve().parents[1]

# from_pretrained as a user of transformers calls it, after import serq_ao: one JSON line,
# per folder the logits or the error
FROM_PRETRAINED = """
import json, sys, torch
import serq_ao
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
results = []
for folder in sys.argv[2:]:
    try:
        with torch.no_grad():
            results.append({"logits": AutoModelForCausalLM.from_pretrained(folder)(ids).logits.flatten().tolist()})
    except Exception as e:
        results.append({"error": type(e).__name__ + ": " + str(e)})
print("RESULT " + json.dumps(results))
"""


def from_pretrained_in_fresh_process(ids: torch.Tensor, *folders: Path) -> list[dict]:
    process = subprocess.run([sys.executable, "-c", FROM_PRETRAINED, json.dumps(ids.tolist()), *map(str, folders)],
                             capture_output=True, text=True, cwd=ROOT, timeout=600,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, process.stdout[-2000:] + process.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def serq_inspect(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serq_ao.cli.main", "inspect", str(folder)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def as_hub_snapshot(folder: Path, root: Path) -> Path:
    """``folder`` laid out as huggingface_hub's cache holds a repository: the snapshot's files
    are symbolic links to blobs."""
    blobs, snapshot = root / "blobs", root / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        blob = blobs / f"blob-{path.name}"
        shutil.copy2(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


EDITS = {
    "rms_norm_eps": lambda c: c.__setitem__("rms_norm_eps", c["rms_norm_eps"] * random.choice([10, 100, 1000])),
    "rope_theta": lambda c: c["rope_parameters"].__setitem__("rope_theta", random.choice([500.0, 2000.0, 1e6])),
}


@pytest.fixture(scope="module")
def folders(quantized_tiny_dir, tmp_path_factory):
    """The serq output untouched, each edit of its config.json, the user's save_pretrained of
    the loaded model, and a Hub snapshot of the output untouched and with an edit."""
    root = tmp_path_factory.mktemp("routes")
    made = {"untouched": quantized_tiny_dir}
    for name, change in EDITS.items():
        made[name] = root / name
        shutil.copytree(quantized_tiny_dir, made[name])
        edit_config(made[name], change)
    model, tokenizer = load_quantized(quantized_tiny_dir)
    made["save_pretrained"] = root / "save_pretrained"
    model.save_pretrained(made["save_pretrained"])
    tokenizer.save_pretrained(made["save_pretrained"])
    made["hub"] = as_hub_snapshot(quantized_tiny_dir, root / "hub")
    made["hub, rms_norm_eps"] = as_hub_snapshot(made["rms_norm_eps"], root / "hub-edited")
    made["save_pretrained, rms_norm_eps"] = root / "save_pretrained-edited"
    shutil.copytree(made["save_pretrained"], made["save_pretrained, rms_norm_eps"])
    edit_config(made["save_pretrained, rms_norm_eps"], EDITS["rms_norm_eps"])
    made["no manifest, rope_theta"] = root / "no-manifest-edited"
    shutil.copytree(made["rope_theta"], made["no manifest, rope_theta"])
    (made["no manifest, rope_theta"] / MANIFEST).unlink()
    return made


LOADS = ["untouched", "save_pretrained", "hub"]
REFUSED = [*EDITS, "hub, rms_norm_eps", "save_pretrained, rms_norm_eps", "no manifest, rope_theta"]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1, random.randint(8, 24)))


@pytest.fixture(scope="module")
def reference(folders, ids):
    with torch.no_grad():
        return load_quantized(folders["untouched"])[0](ids).logits


def test_the_edits_change_the_model(folders, ids, reference):
    """Each edited config.json, given to the untouched weights, is another model: the checks
    are all that stands between the edit and a silently different model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in EDITS:
        config = AutoConfig.from_pretrained(folders[name])
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(folders["untouched"], config=config)(ids).logits
        assert not torch.allclose(logits, reference), name


def test_from_pretrained_in_a_fresh_process_verifies_as_load_quantized_does(folders, ids, reference):
    results = dict(zip(LOADS + REFUSED, from_pretrained_in_fresh_process(ids, *(folders[n] for n in LOADS + REFUSED))))
    for name in LOADS:
        assert "logits" in results[name], f"{name}: {results[name].get('error')}"
        assert torch.equal(torch.tensor(results[name]["logits"]), reference.flatten()), name
    for name in REFUSED:
        assert results[name].get("error", "").startswith("CheckpointError: "), f"{name}: loaded without a word"
        assert "config.json" in results[name]["error"] and "\n" not in results[name]["error"]


@pytest.mark.parametrize("name", ["save_pretrained", "hub", *REFUSED])
def test_load_quantized_verifies_every_folder_kind(folders, reference, ids, name):
    if name in ("save_pretrained", "hub"):
        with torch.no_grad():
            assert torch.equal(load_quantized(folders[name])[0](ids).logits, reference)
    else:
        with pytest.raises(CheckpointError, match="config.json"):
            load_quantized(folders[name])


def test_the_cli_refuses_an_edited_config_in_one_line(folders):
    run = serq_inspect(folders["rope_theta"])
    assert run.returncode == 1, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("serq: error: ")]
    assert len(errors) == 1 and "config.json" in errors[0] and "Traceback" not in run.stderr, run.stderr
