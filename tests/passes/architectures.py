"""Tiny random configs of the architectures the passes must handle, and their expected plans."""

import torch
import transformers as T

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def llama():
    return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **COMMON))


def mistral():
    return T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, **COMMON))


def qwen2():  # q/k/v biases; multi-head attention, so the value-row fold (bias included) runs
    return T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=4, **COMMON))


def phi3():  # fused qkv_proj and gate_up_proj
    return T.Phi3ForCausalLM(T.Phi3Config(num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, **COMMON))


def gemma3():  # (1 + w) norms, q/k norms, sandwich norms, GeGLU, tied embeddings
    return T.Gemma3ForCausalLM(T.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, **COMMON))


def opt():  # LayerNorm with bias, ReLU MLP, biased linears
    config = T.OPTConfig(
        vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, dropout=0.0,
    )
    return T.OPTForCausalLM(config)


# Per architecture, layer 0's groups: (linears, producer kind, a detail to check)
EXPECTED = {
    "llama": [
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm", "input_layernorm"),
        (("self_attn.o_proj",), "attention", "GQA"),
        (("mlp.gate_proj", "mlp.up_proj"), "norm", "post_attention_layernorm"),
        (("mlp.down_proj",), "gated", "silu"),
    ],
    "qwen2": [
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm", "input_layernorm"),
        (("self_attn.o_proj",), "attention", "MHA"),
        (("mlp.gate_proj", "mlp.up_proj"), "norm", "post_attention_layernorm"),
        (("mlp.down_proj",), "gated", "silu"),
    ],
    "phi3": [
        (("self_attn.qkv_proj",), "norm", "input_layernorm"),
        (("self_attn.o_proj",), "attention", "MHA"),
        (("mlp.gate_up_proj",), "norm", "post_attention_layernorm"),
        (("mlp.down_proj",), "gated", "silu"),
    ],
    "gemma3": [
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm", "input_layernorm"),
        (("self_attn.o_proj",), "attention", "GQA"),
        (("mlp.gate_proj", "mlp.up_proj"), "norm", "pre_feedforward_layernorm"),
        (("mlp.down_proj",), "gated", "gelu"),
    ],
    "opt": [
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm", "self_attn_layer_norm"),
        (("self_attn.out_proj",), "attention", "MHA"),
        (("fc1",), "norm", "final_layer_norm"),
        (("fc2",), "activation", "relu"),
    ],
}
EXPECTED["mistral"] = EXPECTED["llama"]
BUILDERS = {"llama": llama, "mistral": mistral, "qwen2": qwen2, "phi3": phi3, "gemma3": gemma3, "opt": opt}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = BUILDERS[name]().eval()
    # random init leaves norm weights at exactly 1 (or 0 for Gemma) and biases at 0, which
    # would hide a wrong fold; give every parameter some spread
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.2)
    return model
