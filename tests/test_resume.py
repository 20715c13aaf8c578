"""An interrupted streamed quantization continues with --resume and gives the folder an
uninterrupted run gives: every stored tensor bit for bit, the same logits."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serq_ao.integrations.serialization import load_quantized
from serq_ao.quant.config import SERQConfig
from serq_ao.resume import ResumeError
from serq_ao.streaming import quantize_checkpoint
from tests.conftest import make_byte_tokenizer
from tests.test_faults_report_figures import stored_bytes
from tests.passes.architectures import build
from tests.test_streaming import assert_same_tensors

WRITER = str(Path(__file__).with_name("resume_fault_writer.py"))
IDS = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(1))
CONFIG = json.dumps({"rank": 32, "gptq": True})


def run_writer(source, out, signal_name="NONE", where="boundary", layer=0, resume=False):
    argv = [sys.executable, WRITER, str(source), str(out), CONFIG, signal_name, where, str(layer)]
    return subprocess.run(argv + (["resume"] if resume else []), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def source_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = build("llama")
    model.config.num_hidden_layers = 4
    model = type(model)(model.config).eval()  # four layers: interrupts before, between and after others
    model.save_pretrained(root / "source", max_shard_size="60KB")
    make_byte_tokenizer().save_pretrained(root / "source")
    finished = run_writer(root / "source", root / "reference")
    assert finished.returncode == 0, finished.stderr
    return root / "source", root / "reference"


def logits(folder):
    model, _ = load_quantized(folder)
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("signal_name, where, layer", [
    ("KILL", "shard", 1),  # killed with layer 1 written but not committed: redone
    # each a real process killed and one resumed: the rest of the matrix runs with -m slow
    pytest.param("KILL", "boundary", 0, marks=pytest.mark.slow),  # right after layer 0 is committed
    pytest.param("INT", "compute", 2, marks=pytest.mark.slow),  # Ctrl-C while layer 2's linears are quantized
    pytest.param("KILL", "compute", 0, marks=pytest.mark.slow),  # before any layer is committed: nothing to resume
])
def test_killed_then_resumed_equals_uninterrupted(source_and_reference, tmp_path, signal_name, where, layer):
    source, reference = source_and_reference
    out = tmp_path / "out"
    killed = run_writer(source, out, signal_name, where, layer)
    assert killed.returncode == (-signal.SIGKILL if signal_name == "KILL" else 1), killed.stderr[-2000:]
    assert not out.exists()
    partial = tmp_path / ".out.serq-partial"
    committed = where == "boundary" or (where in ("shard", "compute") and layer > 0)
    if signal_name == "INT":
        assert "--resume continues" in killed.stderr
    assert (partial / "run.json").is_file() == committed
    resumed = run_writer(source, out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not partial.exists()
    assert_same_tensors(out, reference)
    assert torch.equal(logits(out), logits(reference))
    report, expected = (json.loads((f / "serq_report.json").read_text()) for f in (out, reference))
    assert report["storage"] == expected["storage"]  # the layers done before the kill counted as packed
    assert report["storage"]["model_bytes"] == stored_bytes(out)[0]


def test_an_interrupted_run_is_not_silently_replaced_or_mixed(source_and_reference, tmp_path):
    source, _ = source_and_reference
    out = tmp_path / "out"
    assert run_writer(source, out, "KILL", "boundary", 1).returncode == -signal.SIGKILL
    with pytest.raises(ResumeError, match="--resume to continue it, or --overwrite"):
        quantize_checkpoint(source, SERQConfig(rank=32, gptq=True), torch.zeros(3, 40, dtype=torch.long), out)
    other_ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ResumeError, match="another calibration"):
        quantize_checkpoint(source, SERQConfig(rank=32, gptq=True), other_ids, out, resume=True,
                            error_windows=2, collect_statistics=True)
    same_ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ResumeError, match="another config.rank"):
        quantize_checkpoint(source, SERQConfig(rank=64, gptq=True), same_ids, out, resume=True,
                            error_windows=2, collect_statistics=True)
    run = json.loads((tmp_path / ".out.serq-partial" / "run.json").read_text())
    shard = tmp_path / ".out.serq-partial" / sorted(run["shards"])[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(ResumeError, match="missing or changed"):
        quantize_checkpoint(source, SERQConfig(rank=32, gptq=True), same_ids, out, resume=True,
                            error_windows=2, collect_statistics=True)
    # --overwrite discards it and starts over
    quantize_checkpoint(source, SERQConfig(method="rtn"), None, out, overwrite=True)
    assert out.is_dir() and not (tmp_path / ".out.serq-partial").exists()
