"""Issue 29: every figure a report prints is computed from what was written, whatever path
wrote it. A ``serq quantize`` killed mid-run and continued with ``--resume`` reports the bytes
of an uninterrupted run (once it counted the layers written before the kill as float), and
every path's ``model_bytes`` is the bytes of the tensors in the folder it wrote."""

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import LlamaForCausalLM

from tests.conftest import make_byte_tokenizer, make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
# `serq quantize ...` that SIGKILLs itself right after layer N's state is committed (argv[1] = N)
KILLED_AFTER_LAYER = """
import os, signal, sys
from serq_ao import resume
after = int(sys.argv.pop(1))
save = resume.PartialRun.save
def save_then_die(self, state, *args):
    save(self, state, *args)
    if state.next_layer == after + 1:
        os.kill(os.getpid(), signal.SIGKILL)
resume.PartialRun.save = save_then_die
from serq_ao.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def serq(*argv, killed_after_layer=None):
    prefix = ["-m", "serq_ao.cli.main"] if killed_after_layer is None else ["-c", KILLED_AFTER_LAYER,
                                                                             str(killed_after_layer)]
    return subprocess.run([sys.executable, *prefix, *map(str, argv)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def stored_bytes(folder: Path) -> tuple[int, int]:
    """(all, not packed) bytes of the tensors in the folder's safetensors files, read back."""
    total = plain = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            packed = {k for k, v in (handle.metadata() or {}).items() if "serq_packed" in v}
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                size = tensor.numel() * tensor.element_size()
                total += size
                if not any(key.startswith(f"{weight}_") for weight in packed):
                    plain += size
    return total, plain


@pytest.fixture(scope="module")
def five_layers(tmp_path_factory):
    """A tiny Llama of five decoder layers in several shards, and a calibration text."""
    root = tmp_path_factory.mktemp("five")
    model = make_tiny_llama(seed=random.randrange(1000))
    model.config.num_hidden_layers = 5
    LlamaForCausalLM(model.config).eval().save_pretrained(root / "source", max_shard_size="100KB")
    make_byte_tokenizer(bos=True).save_pretrained(root / "source")
    words = [''.join(random.choices("abcdefghij klmnop", k=random.randint(2, 9))) for _ in range(200)]
    (root / "calib.txt").write_text(" ".join(random.choices(words, k=2000)))
    return root


@pytest.mark.parametrize("recipe", [["--recipe", "paper"], []], ids=["paper", "rotated-gptq"])
def test_resumed_run_reports_the_bytes_it_wrote(five_layers, tmp_path, recipe):
    source = five_layers / "source"
    options = ["--calib-text", five_layers / "calib.txt", "--calib-windows", "3", "--calib-seqlen", "32",
               "--quiet", "--json", *recipe]
    whole = serq("quantize", source, "-o", tmp_path / "whole", *options)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = serq("quantize", source, "-o", tmp_path / "resumed", *options, killed_after_layer=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = serq("quantize", source, "-o", tmp_path / "resumed", *options, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    reports = [json.loads((tmp_path / f / "serq_report.json").read_text()) for f in ("whole", "resumed")]
    assert reports[1]["storage"] == reports[0]["storage"]
    assert reports[1]["report"]["linears"] == reports[0]["report"]["linears"]
    for folder, run in ((tmp_path / "whole", whole), (tmp_path / "resumed", resumed)):
        total, plain = stored_bytes(folder)
        summary = json.loads(run.stdout)
        storage = json.loads((folder / "serq_report.json").read_text())["storage"]
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert summary["model_bytes"] == storage["model_bytes"] == index["metadata"]["total_size"] == total
        assert storage["unquantized_bytes"] == plain

def test_in_memory_run_reports_the_bytes_it_wrote(five_layers, tmp_path):
    """The in-memory path counted the rotary frequencies, which a save never stores."""
    out = tmp_path / "out"
    run = serq("quantize", five_layers / "source", "-o", out, "--in-memory", "--method", "rtn", "--no-diagnostics",
               "--quiet", "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    total, plain = stored_bytes(out)
    storage = json.loads((out / "serq_report.json").read_text())["storage"]
    assert json.loads(run.stdout)["model_bytes"] == storage["model_bytes"] == total
    assert storage["unquantized_bytes"] == plain
