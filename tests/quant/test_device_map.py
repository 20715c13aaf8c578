"""Models placed by accelerate (``from_pretrained(..., device_map=..., offload_folder=...)``):
quantized one layer at a time with the offloaded weights read from accelerate's offload,
bitwise the same model as quantizing it in memory."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM

import serq_ao
from serq_ao.integrations.serialization import load_quantized, save_quantized
from serq_ao.passes.residual import ResidualOrderError
from tests.conftest import make_byte_tokenizer, make_tiny_llama

CPU = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
       "model.rotary_emb": "cpu", "lm_head": "cpu"}
# a decoder layer on disk; the embeddings (tied to the head) and the first layer on disk
LAYER_ON_DISK = {**CPU, "model.layers.1": "disk"}
OUTSIDE_ON_DISK = {**CPU, "model.embed_tokens": "disk", "model.layers.0": "disk", "lm_head": "disk"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-dm")
    make_tiny_llama(seed=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(11))


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _load(folder, dtype, device_map=None, offload=None):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map, offload_folder=offload)
    return model.eval()


@pytest.mark.parametrize(("device_map", "fields", "dtype"), [
    (LAYER_ON_DISK, {"rank": 32}, torch.float32),
    (LAYER_ON_DISK, {"rank": 32, "gptq": True}, torch.float32),
    (OUTSIDE_ON_DISK, {"method": "rtn", "rank": 0}, torch.float32),
    (OUTSIDE_ON_DISK, {"rank": 32}, torch.bfloat16),
], ids=["serq-layer-on-disk", "gptq-layer-on-disk", "rtn-outside-on-disk", "serq-bf16-outside-on-disk"])
def test_disk_offloaded_model_quantizes_as_in_memory(checkpoint, ids, tmp_path, device_map, fields, dtype):
    config = serq_ao.SERQConfig(**fields)
    reference = _load(checkpoint, dtype)
    serq_ao.quantize_model(reference, config, ids)
    before = _digests(checkpoint) | _digests(tmp_path)
    model = _load(checkpoint, dtype, device_map, tmp_path)
    assert any(t.device.type == "meta" for t in model.parameters())  # offloaded, as the test means
    serq_ao.quantize_model(model, config, ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    # the offload was read, never written; the quantized layers now live in CPU memory
    assert _digests(checkpoint) | _digests(tmp_path) == before
    assert model.hf_device_map["model.layers.0"] == model.hf_device_map["model.layers.1"] == "cpu"
    assert all(t.device.type == "cpu" for t in model.model.layers.parameters())


def test_disk_offloaded_quantized_model_saves_and_reloads(checkpoint, ids, tmp_path):
    config = serq_ao.SERQConfig(rank=32)
    saved = []
    for name, device_map in (("in-memory", None), ("offloaded", OUTSIDE_ON_DISK)):
        model = _load(checkpoint, torch.float32, device_map, tmp_path / f"offload-{name}")
        serq_ao.quantize_model(model, config, ids)
        serq_ao.pack_model(model)
        saved.append(save_quantized(model, make_byte_tokenizer(), tmp_path / name, config))
    first, second = (load_quantized(folder)[0] for folder in saved)
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)


def test_global_residual_order_refused_with_a_device_map(checkpoint, ids, tmp_path):
    model = _load(checkpoint, torch.float32, LAYER_ON_DISK, tmp_path)
    with pytest.raises(ResidualOrderError, match="per_group"):
        serq_ao.quantize_model(model, serq_ao.SERQConfig(rank=32, residual_order="global"), ids)


def test_rank_allocation_refused_with_a_device_map(checkpoint, ids, tmp_path):
    model = _load(checkpoint, torch.float32, LAYER_ON_DISK, tmp_path)
    with pytest.raises(ValueError, match="rank_allocation='error' .* needs the whole model in memory"):
        serq_ao.quantize_model(model, serq_ao.SERQConfig(rank=32, rank_allocation="error"), ids)


def test_offloaded_non_finite_weight_is_named(checkpoint, ids, tmp_path):
    """A NaN in an offloaded layer is found when the layer is read, and named."""
    broken = tmp_path / "broken"
    model = _load(checkpoint, torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(broken)
    offloaded = _load(broken, torch.float32, LAYER_ON_DISK, tmp_path / "offload")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has 1 NaN"):
        serq_ao.quantize_model(offloaded, serq_ao.SERQConfig(rank=32), ids)


def test_quantize_and_save_pretrained_of_an_offloaded_model(checkpoint, ids, tmp_path):
    """The torchao-style route: ``quantize_`` packs in place, ``save_pretrained`` reads the
    offloaded embeddings and head from accelerate's offload, the reload equals in-memory."""
    config = serq_ao.SERQConfig(rank=32)
    reference = _load(checkpoint, torch.float32)
    serq_ao.quantize_(reference, config, ids)
    model = _load(checkpoint, torch.float32, OUTSIDE_ON_DISK, tmp_path / "offload")
    serq_ao.quantize_(model, config, ids)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, reference(ids).logits)
