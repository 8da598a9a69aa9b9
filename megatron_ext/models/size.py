"""A model's size from its configuration alone (no torch, no megatron-core): the one parameter count and FLOPs per
token, shown by training's log line and FLOP accounting (`megatron_ext/models/gpt.py`), by train_alcf.sh's preset
table (`megatron_ext/alcf_env.py`) and its resource estimate (`megatron_ext/resources.py`), which must start in a
fraction of a second on a login node."""

from __future__ import annotations

from megatron_ext.config import Config


def layer_parameters(cfg: Config) -> int:
    """Parameters of one transformer layer (attention, MLP, their norms)."""
    m = cfg.model
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = (m.kv_channels or h // m.num_attention_heads) * (m.num_query_groups or m.num_attention_heads)
    q = (m.kv_channels or h // m.num_attention_heads) * m.num_attention_heads
    bias = 0 if m.disable_bias_linear else 1
    attn = h * (q + 2 * kv) + q * h + bias * (q + 2 * kv + h)
    mlp = h * f * (2 if m.swiglu else 1) + f * h + bias * (f * (2 if m.swiglu else 1) + h)
    norms = 2 * h * (1 if m.normalization == "RMSNorm" else 2)
    return attn + mlp + norms


def input_parameters(cfg: Config, vocab_size: int) -> int:
    """Parameters of the input side (first pipeline stage): word and learned position embeddings."""
    m = cfg.model
    pos = m.max_position_embeddings * m.hidden_size if m.position_embedding_type == "learned_absolute" else 0
    return vocab_size * m.hidden_size + pos


def output_parameters(cfg: Config, vocab_size: int) -> int:
    """Parameters of the output side (last pipeline stage): final norm and an untied output layer."""
    m = cfg.model
    final = m.hidden_size * (1 if m.normalization == "RMSNorm" else 2)
    return final + (vocab_size * m.hidden_size if m.untie_embeddings_and_output_weights else 0)


def num_parameters(cfg: Config, vocab_size: int) -> int:
    """Parameters of the whole (unsharded) model, for logging and FLOP counts."""
    layers = cfg.model.num_layers * layer_parameters(cfg)
    return layers + input_parameters(cfg, vocab_size) + output_parameters(cfg, vocab_size)


def flops_per_token(cfg: Config, vocab_size: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), as in Megatron-LM's MFU accounting."""
    m = cfg.model
    h, s, L = m.hidden_size, m.seq_length, m.num_layers
    dense = num_parameters(cfg, vocab_size) - (
        m.max_position_embeddings * h if m.position_embedding_type == "learned_absolute" else 0
    )
    if not m.untie_embeddings_and_output_weights:
        dense += vocab_size * h  # the tied output layer still does its matmul
    dense -= vocab_size * h  # the input embedding is a lookup, not a matmul
    q = (m.kv_channels or h // m.num_attention_heads) * m.num_attention_heads
    attention = 2 * L * s * q  # QK^T and AV, per token (causal mask not discounted, as Megatron-LM)
    return 3 * (2 * dense + 2 * attention)
