"""MoE experts (transformers 5's fused 3-D expert tensors) are quantized with SERQ, one
linear per projection per expert, each with statistics of the tokens routed to it: tiny
Mixtral and Qwen3-MoE (with a dense layer among the MoE ones)."""

import copy
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import serq_ao
from serq_ao.quant.experts import SERQExperts, fused_experts, unfuse_experts
from serq_ao.streaming import quantize_checkpoint
from tests.conftest import make_byte_tokenizer
from tests.test_streaming import assert_same_tensors, in_memory, tensors

IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
CALIBRATION = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(2))


def tiny_mixtral(seed: int = 0):
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256)
    return MixtralForCausalLM(config).eval()


def tiny_qwen3_moe(seed: int = 0):
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=257, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=8, num_experts_per_tok=2, max_position_embeddings=256, mlp_only_layers=[1])
    return Qwen3MoeForCausalLM(config).eval()


MODELS = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe}


def experts_of(model):
    return [m for m in model.modules() if isinstance(m, SERQExperts)]


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfused_experts_compute_what_the_fused_module_does(arch, dtype):
    fused = MODELS[arch]().to(dtype)
    fused.set_experts_implementation("eager")  # transformers' own loop over experts
    names = fused_experts(fused)
    assert names and all(".mlp.experts" in n for n in names)
    unfused = copy.deepcopy(fused)
    assert unfuse_experts(unfused) == names and not fused_experts(unfused)
    experts = experts_of(unfused)[0]
    source = fused.get_submodule(names[0])
    assert experts.num_experts == source.gate_up_proj.shape[0]
    intermediate = source.down_proj.shape[-1]
    assert torch.equal(experts.expert(1).up_proj.weight, source.gate_up_proj[1, intermediate:])
    assert torch.equal(experts.expert(1).down_proj.weight, source.down_proj[1])
    with torch.no_grad():
        expected, got = fused(IDS).logits.float(), unfused(IDS).logits.float()
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    assert (expected - got).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.parametrize("arch", MODELS)
def test_the_traceable_form_equals_the_loop(arch):
    """Under torch.export every expert runs on all tokens, unrouted ones zeroed and weighted 0."""
    model = MODELS[arch]()
    unfuse_experts(model)
    experts = experts_of(model)[0]
    hidden = torch.randn(24, model.config.hidden_size)
    top_k_index = torch.stack([torch.randperm(experts.num_experts)[:2] for _ in range(24)])
    top_k_weights = torch.rand(24, 2)
    with torch.no_grad():
        loop = experts(hidden, top_k_index, top_k_weights)
        dense = experts._dense_forward(hidden, top_k_index, top_k_weights)
        program = torch.export.export(experts, (hidden, top_k_index, top_k_weights))
        exported = program.module()(hidden, top_k_index, top_k_weights)
    torch.testing.assert_close(dense, loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exported, loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("residual_order", ["per_group", "auto"])
def test_transforms_are_exact_on_moe_layers(arch, residual_order):
    model = MODELS[arch]()
    with torch.no_grad():
        expected = model(IDS).logits
    plans = serq_ao.transform_model(model, serq_ao.SERQConfig(rank=32, residual_order=residual_order), CALIBRATION)
    assert any(".experts.3.down_proj" in name for name in plans)
    with torch.no_grad():
        got = model(IDS).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def routed_statistics(model, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """max |x| and mean |x| over the tokens the float model routes to ``expert`` in ``layer``:
    the input of the experts module and the router's choice, recorded from the fused model,
    in float64."""
    seen = []
    experts = model.model.layers[layer].mlp.experts

    def record(module, args):
        hidden, top_k_index = args[0], args[1]
        seen.append(hidden[(top_k_index == expert).any(dim=-1)].double().abs())

    handle = experts.register_forward_pre_hook(record)
    with torch.no_grad():
        for window in CALIBRATION:
            model(window[None], use_cache=False)
    handle.remove()
    routed = torch.cat(seen)
    return routed.amax(dim=0), routed.mean(dim=0)


@pytest.mark.parametrize("arch", MODELS)
def test_every_expert_is_quantized_with_statistics_of_its_own_tokens(arch, caplog):
    model = MODELS[arch]()
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING):
        report = serq_ao.quantize_model(model, serq_ao.SERQConfig(rank=32), CALIBRATION)
    assert "no calibration token" not in caplog.text
    layer = 0
    experts = model.model.layers[layer].mlp.experts
    names = {r.name for r in report.linears}
    for index in range(experts.num_experts):
        for projection in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{layer}.mlp.experts.{index}.{projection}" in names
    # only the router stays in float: it is a bare parameter, not an nn.Linear
    assert set(report.unquantized) == {"model.layers.*.mlp.gate.weight"}
    for index in (0, experts.num_experts - 1):
        group = report.plans[f"model.layers.{layer}.mlp.experts.{index}.gate_proj"].group
        assert group.linears == (f"model.layers.{layer}.mlp.experts.{index}.gate_proj",
                                 f"model.layers.{layer}.mlp.experts.{index}.up_proj")
        amax, abs_mean = routed_statistics(reference, layer, index)
        torch.testing.assert_close(report.statistics.amax[group.name].double(), amax, rtol=1e-6, atol=0)
        torch.testing.assert_close(report.statistics.abs_mean[group.name].double(), abs_mean, rtol=1e-5, atol=0)
    with torch.no_grad():
        expected, got = reference(IDS).logits, model(IDS).logits
    assert torch.isfinite(got).all() and (got - expected).norm() < 0.5 * expected.norm()


@pytest.mark.parametrize("gptq", [False, True])
def test_an_expert_no_token_reached_gets_the_stated_fallback(gptq, caplog):
    model = tiny_mixtral()
    one_token = CALIBRATION[:1, :1]  # top-2 of 4 experts: two get nothing
    chosen = []
    handle = model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, args: chosen.append(args[1]))
    with torch.no_grad():
        model(one_token, use_cache=False)
    handle.remove()
    reached = sorted(chosen[0].flatten().tolist())
    unreached = [e for e in range(4) if e not in reached]
    with caplog.at_level(logging.WARNING):
        report = serq_ao.quantize_model(model, serq_ao.SERQConfig(rank=32, gptq=gptq), one_token)
    assert (f"model.layers.0.mlp.experts: no calibration token was routed to expert(s) "
            f"{', '.join(map(str, unreached))}") in caplog.text
    amax, plans = report.statistics.amax, report.plans
    groups = [plans[f"model.layers.0.mlp.experts.{e}.gate_proj"].group.name for e in range(4)]
    union = torch.stack([amax[groups[e]] for e in reached]).amax(dim=0)
    for e in unreached:
        assert torch.equal(amax[groups[e]], union)
        down = plans[f"model.layers.0.mlp.experts.{e}.down_proj"]
        assert torch.equal(amax[down.group.name], torch.ones(down.group.in_features))
        assert f"model.layers.0.mlp.experts.{e}.down_proj" in {r.name for r in report.linears}
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_moe_saves_and_reloads_to_identical_logits(arch, dtype, tmp_path):
    MODELS[arch]().save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=dtype)  # rotary buffers stay fp32
    serq_ao.quantize_(model, serq_ao.SERQConfig(rank=32), CALIBRATION)
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=dtype)
    assert isinstance(back.model.layers[0].mlp.experts, SERQExperts)
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, expected)
    back.save_pretrained(tmp_path / "again")  # a reloaded model saves the same tensors
    assert_same_tensors(tmp_path / "q", tmp_path / "again")


@pytest.mark.parametrize("layout", ["original", "fused"])
def test_streamed_moe_equals_the_in_memory_result(layout, tmp_path):
    """transformers writes a Mixtral under its original names (block_sparse_moe.experts.<e>.w1,
    w3, w2) unless told to keep the fused tensors; the streamed reader takes either."""
    model = tiny_mixtral()
    model.save_pretrained(tmp_path / "source", max_shard_size="60KB", save_original_format=layout == "original")
    make_byte_tokenizer().save_pretrained(tmp_path / "source")
    stored = set(tensors(tmp_path / "source"))
    marker = "block_sparse_moe.experts.0.w1.weight" if layout == "original" else "mlp.experts.gate_up_proj"
    assert any(k.endswith(marker) for k in stored)
    config = serq_ao.SERQConfig(rank=32)
    reference = in_memory(model, config, CALIBRATION, tmp_path / "memory")
    quantize_checkpoint(tmp_path / "source", config, CALIBRATION, tmp_path / "streamed",
                        tokenizer=make_byte_tokenizer())
    assert_same_tensors(tmp_path / "memory", tmp_path / "streamed")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, reference(IDS).logits)


@pytest.mark.parametrize("method", ["l2qer", "smoothquant"])
def test_evaluation_mode_moe_saves_and_reloads(method, tmp_path):
    """Methods without a packed format save the evaluation-mode model; it reloads with its
    experts unfused again."""
    from serq_ao.integrations.serialization import load_quantized, save_quantized

    model = tiny_qwen3_moe()
    config = serq_ao.SERQConfig(method=method)
    report = serq_ao.quantize_model(model, config, CALIBRATION)
    assert not report.unquantized.keys() - {"model.layers.*.mlp.gate.weight"}
    with torch.no_grad():
        expected = model(IDS).logits
    save_quantized(model, make_byte_tokenizer(), tmp_path / "q", config)
    back, _ = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, expected)


@pytest.mark.slow
def test_packed_moe_exports():
    """torch.export of a packed MoE model (the experts' traceable form) computes its logits."""
    model = tiny_qwen3_moe()
    serq_ao.quantize_(model, serq_ao.SERQConfig(rank=32), CALIBRATION)
    with torch.no_grad():
        expected = model(IDS).logits
        program = torch.export.export(model, (IDS,), kwargs={"use_cache": False}, strict=False)
        got = program.module()(IDS, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_model_placed_by_accelerate_keeps_its_experts_in_float_and_says_so(tmp_path, caplog):
    from serq_ao.quant.lm_head import HeadError

    tiny_mixtral().save_pretrained(tmp_path / "source")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "source", device_map=device_map,
                                                 offload_folder=tmp_path / "offload").eval()
    with pytest.raises(HeadError, match="quantize_lm_head is not supported for a model placed by accelerate"):
        serq_ao.quantize_model(model, serq_ao.SERQConfig(rank=32, quantize_lm_head=True), CALIBRATION)
    with caplog.at_level(logging.WARNING):
        report = serq_ao.quantize_model(model, serq_ao.SERQConfig(rank=32), CALIBRATION)
    assert "MoE experts stay in float under an accelerate device map" in caplog.text
    assert {"model.layers.*.mlp.experts.gate_up_proj", "model.layers.*.mlp.experts.down_proj"} <= set(report.unquantized)
