"""The corruption suite: each damage applied to a saved tiny model must raise a clear error on
load, or load bitwise-correct; never a silent change.

Two kinds of damage:
- *plain*: a file changed and nothing else, as a disk, a copy or a careless edit leaves it;
- *forged*: the same change with every checksum recomputed to match (the folder manifest, the
  safetensors tensor record), as a tool that rewrites files or a hostile sender would. What
  then remains to catch it are the structural checks: missing and unexpected tensors, config
  against tensors, permutations, scale bytes.

A forged change of code values inside their valid range yields a different valid model and
cannot be detected by any check; the suite forges only structure and out-of-range values.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from serq_ao.files import MANIFEST, write_manifest
from serq_ao.integrations.verify import TENSOR_MANIFEST_KEY, tensor_manifest
from serq_ao.models import load_model

WEIGHTS = "model.safetensors"
CAUGHT: list[str] = []  # names of the corruptions that raised, for the README's count


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory):
    from serq_ao.cli.main import main

    root = tmp_path_factory.mktemp("corruption")
    common = ["--calib-windows", "2", "--calib-seqlen", "32", "--quiet"]
    # in memory: one model.safetensors, as save_pretrained writes it (the streamed, sharded
    # output has its own cases below)
    common += ["--in-memory"]
    assert main(["quantize", str(tiny_model_dir), "--rank", "32", "--out", str(root / "packed"), *common]) == 0
    assert main(["quantize", str(tiny_model_dir), "--method", "lqer", "--out", str(root / "lqer"), *common]) == 0
    assert main(["quantize", str(tiny_model_dir), "--format", "w4a8", "--rank", "32", "--out", str(root / "int"), *common]) == 0
    return root


def logits(model):
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---- editing helpers ----------------------------------------------------------------------


def read_weights(folder: Path):
    with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())


def write_weights(folder: Path, tensors: dict, metadata: dict, forge: bool) -> None:
    if forge:
        metadata = {**metadata, TENSOR_MANIFEST_KEY: tensor_manifest(tensors)}
    save_file(tensors, str(folder / WEIGHTS), metadata=metadata)


def edit_tensors(change):
    def apply(folder: Path, forge: bool):
        tensors, metadata = read_weights(folder)
        change(tensors, metadata)
        write_weights(folder, tensors, metadata, forge)

    return apply


def edit_json(name: str, change):
    def apply(folder: Path, forge: bool):
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))

    return apply


def key_with(tensors, fragment):
    keys = [k for k in sorted(tensors) if fragment in k]
    if not keys:
        raise KeyError(fragment)
    return keys[0]


def delete(fragment):
    return edit_tensors(lambda t, m: t.pop(key_with(t, fragment)))


def flip_byte(fragment, offset=0):
    def change(tensors, metadata):
        key = key_with(tensors, fragment)
        raw = tensors[key].contiguous().view(torch.uint8).reshape(-1).clone()
        raw[offset % raw.numel()] ^= 0x10
        tensors[key] = raw.view(tensors[key].dtype).reshape(tensors[key].shape)

    return edit_tensors(change)


def set_values(fragment, make):
    def change(tensors, metadata):
        key = key_with(tensors, fragment)
        tensors[key] = make(tensors[key].clone())

    return edit_tensors(change)


def duplicate_perm(t):
    t[1] = t[0]
    return t


def out_of_range_perm(t):
    t[0] = t.numel() + 5
    return t


def nan_scale_byte(t):
    t.view(-1)[0] = 255
    return t


def negative(t):
    t.view(-1)[0] = -t.view(-1)[0].abs()
    return t


def truncate(folder: Path, forge: bool):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def remove_file(name):
    return lambda folder, forge: (folder / name).unlink()


def shuffle_descriptions(folder: Path, forge: bool):
    tensors, metadata = read_weights(folder)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"
    metadata[q], metadata[k] = metadata[k], metadata[q]
    write_weights(folder, tensors, metadata, forge)


def edit_description(change):
    def apply(folder: Path, forge: bool):
        tensors, metadata = read_weights(folder)
        key = "model.layers.0.self_attn.o_proj.weight"
        description = json.loads(metadata[key])
        change(description["serq_packed"])
        metadata[key] = json.dumps(description)
        write_weights(folder, tensors, metadata, forge)

    return apply


def quantization(change):
    """An edit of the serq fields of config.json's quantization_config."""
    return edit_json("config.json", lambda c: change(c["quantization_config"]["quant_type"]["default"]["_data"]))


PACKED = {
    "truncated weights": truncate,
    "deleted packed codes": delete("q_proj.weight_qdata"),
    "deleted packed scales": delete("down_proj.weight_scale"),
    "deleted pre-op order": delete("o_proj.weight_input_perm"),
    "deleted pre-op scale": delete("o_proj.weight_input_scale_inv"),
    "deleted norm weight": delete("layers.1.post_attention_layernorm.inner.weight"),
    "deleted norm gather": delete("layers.0.input_layernorm.perm"),
    "deleted final norm": delete("model.norm.weight"),
    "deleted embedding": delete("embed_tokens"),
    "flipped code bit": flip_byte("q_proj.weight_qdata", 17),
    "flipped scale bit": flip_byte("up_proj.weight_scale", 3),
    "flipped norm bit": flip_byte("input_layernorm.inner.weight", 5),
    "flipped embedding bit": flip_byte("embed_tokens", 1001),
    "duplicated permutation entry": set_values("o_proj.weight_input_perm", duplicate_perm),
    "out-of-range channel id": set_values("o_proj.weight_input_perm", out_of_range_perm),
    "duplicated norm gather entry": set_values("layers.1.input_layernorm.perm", duplicate_perm),
    "out-of-range norm gather id": set_values("layers.1.input_layernorm.perm", out_of_range_perm),
    "NaN E8M0 scale byte": set_values("v_proj.weight_scale", nan_scale_byte),
    "negative pre-op scale": set_values("o_proj.weight_input_scale_inv", negative),
    "extra tensor": edit_tensors(lambda t, m: t.__setitem__("model.layers.0.extra", torch.zeros(3))),
    "tensor shape changed": set_values("k_proj.weight_scale", lambda t: t[:, :-1].contiguous()),
    "tensor dtype changed": set_values("model.norm.weight", lambda t: t.double()),
    "shuffled packed descriptions": shuffle_descriptions,
    "description shape [1e6, 1e6]": edit_description(lambda d: d["attributes"].__setitem__("shape", [10**6, 10**6])),
    "description rank changed": edit_description(lambda d: d["attributes"].__setitem__("rank", 64)),
    "description dropped a field": edit_description(lambda d: d["fields"].pop("input_perm")),
    "unknown packed class": edit_description(lambda d: d.__setitem__("class", "os.system")),
    "header tensor record removed": edit_tensors(lambda t, m: m.pop(TENSOR_MANIFEST_KEY)),
    "config: quantization_config removed": edit_json("config.json", lambda c: c.pop("quantization_config")),
    "config: num_hidden_layers raised": edit_json("config.json", lambda c: c.__setitem__("num_hidden_layers", 3)),
    "config: num_hidden_layers lowered": edit_json("config.json", lambda c: c.__setitem__("num_hidden_layers", 1)),
    "config: hidden_size changed": edit_json("config.json", lambda c: c.__setitem__("hidden_size", 96)),
    "config: vocab_size changed": edit_json("config.json", lambda c: c.__setitem__("vocab_size", 300)),
    "config: output_gathers emptied": quantization(lambda q: q.__setitem__("output_gathers", {})),
    "config: packed_linears emptied": quantization(lambda q: q.__setitem__("packed_linears", [])),
    "config: a packed linear dropped": quantization(lambda q: q["packed_linears"].pop(0)),
    "config: rank changed": quantization(lambda q: q["serq_config"].__setitem__("rank", 64)),
    "config: format changed": quantization(lambda q: q["serq_config"].__setitem__("format", "w4a8")),
    "config: old format version": quantization(lambda q: q.__setitem__("format_version", 2)),
    "config: quant_method renamed": edit_json("config.json", lambda c: c["quantization_config"].__setitem__(
        "quant_method", "serq")),
    "config: quant_type class changed": edit_json("config.json", lambda c: c["quantization_config"]["quant_type"][
        "default"].__setitem__("_type", "Int4WeightOnlyConfig")),
    "config: quant_type emptied": edit_json("config.json", lambda c: c["quantization_config"].__setitem__(
        "quant_type", {})),
    "config.json deleted": remove_file("config.json"),
    "weights deleted": remove_file(WEIGHTS),
    "tokenizer edited": edit_json("tokenizer_config.json", lambda t: t.__setitem__("model_max_length", 7)),
}

INT = {
    "negative INT scale": set_values("q_proj.weight_scale", negative),
    "INT correction scale NaN": set_values("q_proj.weight_correction_scale", lambda t: t.fill_(float("nan"))),
    "INT description group size odd": edit_description(lambda d: d["attributes"].__setitem__("group_size", 127)),
    "config: INT format changed": quantization(lambda q: q["serq_config"].__setitem__("format", "mxfp4")),
}

LQER = {
    "serq_config.json deleted": remove_file("serq_config.json"),
    "truncated weights": truncate,
    "deleted low-rank factor": delete("lowrank_b"),
    "flipped main weight bit": flip_byte("q_proj.weight", 11),
    "extra tensor": edit_tensors(lambda t, m: t.__setitem__("model.layers.0.extra", torch.zeros(3))),
    "header tensor record removed": edit_tensors(lambda t, m: m.pop(TENSOR_MANIFEST_KEY)),
    "config: num_hidden_layers raised": edit_json("config.json", lambda c: c.__setitem__("num_hidden_layers", 3)),
    "structure: a module dropped": edit_json("serq_config.json", lambda s: s["structure"].pop(sorted(s["structure"])[0])),
}

# in-range value changes: forged, they are a different valid model (see the module doc)
# (forging the removed header record puts it back)
PLAIN_ONLY = {"flipped code bit", "flipped scale bit", "flipped norm bit", "flipped embedding bit",
              "flipped main weight bit", "header tensor record removed"}
# forged, these change nothing the model computes (a float32 norm stored as float64 comes back
# exactly): they must load bitwise-correct
HARMLESS_WHEN_FORGED = {"tokenizer edited", "tensor dtype changed"}
CASES = [(kind, name, change, forge) for kind, table in (("packed", PACKED), ("int", INT), ("lqer", LQER))
         for name, change in table.items() for forge in (False, True) if not (forge and name in PLAIN_ONLY)]


@pytest.mark.parametrize("kind, name, change, forge", CASES,
                         ids=[f"{k}: {n} ({'forged' if f else 'plain'})" for k, n, _, f in CASES])
def test_corruption_raises_a_clear_error_or_loads_bitwise_correct(folders, tmp_path, kind, name, change, forge):
    original = folders / kind
    reference = logits(load_model(original)[0])
    folder = tmp_path / kind
    shutil.copytree(original, folder)
    try:
        change(folder, forge)
    except KeyError:
        pytest.skip(f"{kind} folders have no such part")
    if forge and (folder / MANIFEST).exists():
        write_manifest(folder)  # every file's checksum recomputed to match
    try:
        model, _ = load_model(folder)
    except Exception as error:  # noqa: BLE001 - which exception is the point of the assertions
        message = str(error)
        assert message and "\n" not in message.strip(), f"{name}: not one line: {message!r}"
        assert type(error).__name__ not in ("KeyError", "IndexError", "AttributeError", "TypeError"), (name, repr(error))
        CAUGHT.append(f"{kind}/{name}/{forge}")
        return
    # it loaded: then it must be the very model that was saved
    assert torch.equal(logits(model), reference), f"{name}: loaded a different model without a word"
    assert forge and name in HARMLESS_WHEN_FORGED, f"{name}: loaded although damaged"


def test_sharded_checkpoint_verifies_across_shards(folders, tmp_path):
    """A packed model saved in shards (as every large model is) reloads bit-identical, and
    damage to one shard is caught: each shard's header carries the whole tensor record."""
    from transformers import AutoModelForCausalLM

    model, _ = load_model(folders / "packed")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")), logits(model))
    with safe_open(str(shards[-1]), framework="pt") as handle:
        tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())
    key = sorted(tensors)[0]
    raw = tensors[key].contiguous().view(torch.uint8).reshape(-1).clone()
    raw[0] ^= 0x01
    tensors[key] = raw.view(tensors[key].dtype).reshape(tensors[key].shape)
    save_file(tensors, str(shards[-1]), metadata=metadata)
    with pytest.raises(ValueError, match=f"tensor {key} differs from the one written"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")


@pytest.fixture(scope="module")
def streamed(tiny_model_dir, tmp_path_factory):
    from serq_ao.cli.main import main

    root = tmp_path_factory.mktemp("streamed")
    # the paper's channel order: the damage below targets a norm's gather, which the block order
    # of the default recipe need not create on a 64-wide model (two blocks, maybe in order)
    common = ["--calib-windows", "2", "--calib-seqlen", "32", "--quiet", "--recipe", "paper"]
    assert main(["quantize", str(tiny_model_dir), "--rank", "32", "--out", str(root / "packed"), *common]) == 0
    assert not (root / "packed" / WEIGHTS).exists()  # one shard per decoder layer, and one for the rest
    return root / "packed"


def _shard_of(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]


def _flip_byte(folder: Path, key: str, forge: bool) -> None:
    shard = _shard_of(folder, key)
    with safe_open(str(shard), framework="pt") as handle:
        tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())
    raw = tensors[key].contiguous().view(torch.uint8).reshape(-1).clone()
    raw[0] ^= 0x01
    tensors[key] = raw.view(tensors[key].dtype).reshape(tensors[key].shape)
    if forge:
        metadata[TENSOR_MANIFEST_KEY] = tensor_manifest(tensors)
    save_file(tensors, str(shard), metadata=metadata)


def _drop_from_index(folder: Path, key: str) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


LAYER_KEY = "model.layers.1.self_attn.q_proj.weight_qdata"
# name -> (damage, must it raise?). Damage the verification cannot see by design (an index
# entry dropped while the shard still holds the tensor, with a manifest rewritten to match)
# may load, but then only as the very model that was saved.
STREAMED_DAMAGE = {
    "layer shard byte flipped": (lambda f: _flip_byte(f, LAYER_KEY, forge=False), True),
    "norm shard byte flipped": (lambda f: _flip_byte(f, "model.layers.0.input_layernorm.inner.weight", forge=False), True),
    "layer shard deleted": (lambda f: _shard_of(f, LAYER_KEY).unlink(), True),
    "layer shard truncated": (lambda f: _shard_of(f, LAYER_KEY).write_bytes(_shard_of(f, LAYER_KEY).read_bytes()[:200]),
                              True),
    "tensor dropped from the index": (lambda f: _drop_from_index(f, LAYER_KEY), False),
    "norm dropped from the index": (lambda f: _drop_from_index(f, "model.layers.0.input_layernorm.inner.weight"), False),
}


@pytest.mark.parametrize("manifest", ["kept", "rewritten"])
@pytest.mark.parametrize("damage", sorted(STREAMED_DAMAGE))
def test_streamed_sharded_output_damage_is_caught(streamed, tmp_path, damage, manifest):
    """The streamed writer's folder (a shard per layer, each with its own tensor record) is
    as well guarded: damage to one shard, or to the index, is one clear error (or, where
    the damage is invisible by design, the very model that was saved), even when the file
    manifest is rewritten to match."""
    folder = tmp_path / "copy"
    shutil.copytree(streamed, folder)
    reference = logits(load_model(streamed)[0])
    apply, must_raise = STREAMED_DAMAGE[damage]
    apply(folder)
    if manifest == "rewritten":
        (folder / MANIFEST).unlink()
        write_manifest(folder)
    try:
        model, _ = load_model(folder)
    except (ValueError, OSError) as error:
        message = str(error)
        assert message and "\n" not in message.strip(), message
        assert type(error).__name__ not in ("KeyError", "IndexError", "AttributeError", "TypeError"), repr(error)
        return
    assert torch.equal(logits(model), reference), f"{damage}: loaded a different model without a word"
    assert not must_raise, f"{damage}: loaded although damaged"
