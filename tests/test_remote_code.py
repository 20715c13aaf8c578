"""--trust-remote-code: a model folder whose config.json maps its classes to code it ships
(auto_map). Refused without the flag, as transformers refuses it; with it, quantized
(streamed and in memory), the output carries the code, and it loads and evaluates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONFIGURATION = '''
from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny-remote"
'''

MODELING = '''
from transformers import LlamaForCausalLM

from .configuration_tiny import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory):
    from tests.conftest import make_byte_tokenizer, make_tiny_llama

    folder = tmp_path_factory.mktemp("remote")
    make_tiny_llama(seed=8).save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny-remote", architectures=["TinyRemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyRemoteConfig",
                            "AutoModelForCausalLM": "modeling_tiny.TinyRemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_tiny.py").write_text(CONFIGURATION)
    (folder / "modeling_tiny.py").write_text(MODELING)
    return folder


def serq(tmp_path, *argv):
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "serq_ao.cli.main", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("argv", [["eval", "ppl", "{m}", "--windows", "1", "--seqlen", "16"],
                                  ["quantize", "{m}", "-o", "{tmp}/q", "--calib-samples", "2", "--calib-seqlen", "32"]],
                         ids=["load", "streamed"])
def test_refused_without_the_flag(remote_dir, tmp_path, argv):
    argv = [a.replace("{m}", str(remote_dir)).replace("{tmp}", str(tmp_path)) for a in argv]
    result = serq(tmp_path, *argv, "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ships its own modeling code" in result.stderr and "--trust-remote-code" in result.stderr
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("path", [[], ["--in-memory"]], ids=["streamed", "in-memory"])
def test_quantized_with_the_flag(remote_dir, tmp_path, path):
    out = tmp_path / "q"
    result = serq(tmp_path, "quantize", remote_dir, "-o", out, "--rank", "32", "--calib-samples", "2",
                  "--calib-seqlen", "32", "--no-diagnostics", "--quiet", "--json", "--trust-remote-code", *path)
    assert result.returncode == 0, result.stderr
    assert (out / "modeling_tiny.py").is_file() and (out / "configuration_tiny.py").is_file()
    result = serq(tmp_path, "eval", "ppl", out, "--windows", "1", "--seqlen", "16", "--quiet", "--json",
                  "--trust-remote-code")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ppl"] > 1
