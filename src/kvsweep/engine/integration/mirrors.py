"""Forwards of transformers' Llama classes, mirrored to run kvsweep's kernels inside them.

Each is a copy of transformers 5.2's forward with one change: `attention_forward` (of
`LlamaAttention.forward`) projects q, k and v in one product; `decoder_layer_forward` (of
`LlamaDecoderLayer.forward`) adds the residual in the second norm's kernel; `mlp_forward` (of
`LlamaMLP.forward`) projects gate and up in one product and runs `silu_and_mul`. They run only for
the classes `families` declares with those forwards, and `SOURCES` holds the sha256 of each source
copied, which tests/engine/test_integration.py compares with the installed transformers.
"""

import sys

import torch.nn.functional as F

from kvsweep.kernels import rms_norm, silu_and_mul

# sha256 of the transformers 5.2 sources (of `transformers.models.llama.modeling_llama`) that the
# fusions reproduce: the two forwards copied here, the MLP rewritten in `mlp_forward`, the norm's
# formula (`kvsweep.kernels.rms_norm`) and the rotary embedding (`kvsweep.kernels.rope`).
SOURCES = {
    "LlamaAttention.forward": "39d28a8c881fdb5fe191a50b60a93f548819b408459e4517a9e3cda193031379",
    "LlamaDecoderLayer.forward": "ba7de8a8e3828ffd3c7d94d62cdd47bc21fee6f34c01fa2b935a50e1df815d91",
    "LlamaMLP.forward": "03df2d7685cf8446594448cbd33ef676a2b088779d99d9803abe3bed2ec7ad9b",
    "LlamaRMSNorm.forward": "790fa612e4fa57acfcbea31da45f92ba91f9016f7260ef539f61c5530ba06a5f",
    "apply_rotary_pos_emb": "e2975ea7060de67704dfef2f64c821064e66fc292923e37f1d2689077e846b94",
    "rotate_half": "f714a4b1160c694e270d9191a9f133e53856e2a1c62f5cd2f85740f7c2692397",
}


def attention_forward(
    module, qkv_weight, qkv_bias, hidden_states, position_embeddings=None, attention_mask=None,
    past_key_values=None, cache_position=None, **kwargs,
):  # fmt: skip
    """`LlamaAttention.forward` (transformers 5.2) with the three projections in one product. The
    rotary embedding, attention function and eager fallback are read from the module that defines
    the class's forward, as that forward reads them (so the fused RoPE, `kvsweep.engine.integration.fusions`, still applies)."""
    if hidden_states.device != qkv_weight.device or hidden_states.dtype != qkv_weight.dtype:
        return type(module).forward(
            module, hidden_states, position_embeddings, attention_mask, past_key_values, cache_position, **kwargs
        )
    family = sys.modules[type(module).forward.__module__]  # where the mirrored forward reads them
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)

    sizes = [module.q_proj.out_features, module.k_proj.out_features, module.v_proj.out_features]
    query, key, value = F.linear(hidden_states, qkv_weight, qkv_bias).split(sizes, dim=-1)
    query_states = query.view(hidden_shape).transpose(1, 2)
    key_states = key.view(hidden_shape).transpose(1, 2)
    value_states = value.view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    query_states, key_states = family.apply_rotary_pos_emb(query_states, key_states, cos, sin)

    if past_key_values is not None:
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
        key_states, value_states = past_key_values.update(key_states, value_states, module.layer_idx, cache_kwargs)

    attention_interface = family.ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, family.eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        module,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout,
        scaling=module.scaling,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = module.o_proj(attn_output)
    return attn_output, attn_weights


def decoder_layer_forward(
    layer, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
    cache_position=None, position_embeddings=None, **kwargs,
):  # fmt: skip
    """`LlamaDecoderLayer.forward` (transformers 5.2) with the residual add after attention and the
    second norm in one kernel where it applies."""
    residual = hidden_states
    hidden_states = layer.input_layernorm(hidden_states)
    hidden_states, _ = layer.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        cache_position=cache_position,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    norm = layer.post_attention_layernorm
    if rms_norm.supports(hidden_states, norm.weight, residual=residual):
        residual, hidden_states = rms_norm.rms_norm(
            hidden_states, norm.weight, norm.variance_epsilon, residual=residual
        )
    else:
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = norm(hidden_states)
    hidden_states = layer.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states


def mlp_forward(module, gate_up_weight, gate_up_bias, x):
    """`LlamaMLP.forward` with gate and up in one product and SiLU times up in one kernel."""
    if x.device != gate_up_weight.device or x.dtype != gate_up_weight.dtype:
        return type(module).forward(module, x)
    return module.down_proj(silu_and_mul.silu_and_mul(F.linear(x, gate_up_weight, gate_up_bias)))
