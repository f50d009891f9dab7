"""Tiny random models, built from config objects, for every architecture the registry covers (no downloads)."""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=128, num_key_value_heads=2)

# model_type -> extra config kwargs (on top of COMMON, translated per family below)
TINY_CONFIGS: dict[str, dict] = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 8}, "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8}, "gemma3_text": {"head_dim": 8}, "phi3": {}, "granite": {"residual_multiplier": 0.5},
    "olmo2": {}, "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                  "shared_expert_intermediate_size": 24},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "head_dim": 8},
    "gpt2": {}, "gpt_neox": {}, "gptj": {}, "falcon": {}, "bloom": {}, "opt": {},
}
MODEL_TYPES = sorted(TINY_CONFIGS)


def tiny_config(model_type: str, num_layers: int = 4, **overrides):
    from transformers import AutoConfig

    kw = dict(COMMON, num_hidden_layers=num_layers, **TINY_CONFIGS[model_type])
    if model_type == "gpt2":
        kw = dict(vocab_size=96, n_embd=32, n_layer=num_layers, n_head=4, n_inner=48, n_positions=128)
    elif model_type == "gptj":
        kw = dict(vocab_size=96, n_embd=32, n_layer=num_layers, n_head=4, n_inner=48, n_positions=128, rotary_dim=4)
    elif model_type == "bloom":
        kw = dict(vocab_size=96, hidden_size=32, n_layer=num_layers, n_head=4)
    elif model_type == "falcon":
        kw = dict(vocab_size=96, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                  new_decoder_architecture=False, parallel_attn=True, alibi=False, max_position_embeddings=128)
    elif model_type == "opt":
        kw = dict(vocab_size=96, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, ffn_dim=48,
                  word_embed_proj_dim=32, max_position_embeddings=128, do_layer_norm_before=True)
    elif model_type == "gpt_neox":
        kw["rotary_pct"] = 0.5
    kw.update(pad_token_id=0, eos_token_id=1, bos_token_id=1)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, num_layers: int = 4, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers, **overrides))
    model.eval()
    # Random init leaves some norms at exactly 1/0; perturb every parameter so no FFN is an identity by accident.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model
