"""A model's size from its configuration alone (no torch, no megatron-core): the one parameter count, shown by
training's log line and FLOP accounting (`megatron_ext/models/gpt.py`) and by train_alcf.sh's preset table
(`megatron_ext/alcf_env.py`), which must start in a fraction of a second on a login node."""

from __future__ import annotations

from megatron_ext.config import Config


def num_parameters(cfg: Config, vocab_size: int) -> int:
    """Parameters of the whole (unsharded) model, for logging and FLOP counts."""
    m = cfg.model
    h, f, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
    kv = (m.kv_channels or h // m.num_attention_heads) * (m.num_query_groups or m.num_attention_heads)
    q = (m.kv_channels or h // m.num_attention_heads) * m.num_attention_heads
    bias = 0 if m.disable_bias_linear else 1
    attn = h * (q + 2 * kv) + q * h + bias * (q + 2 * kv + h)
    mlp = h * f * (2 if m.swiglu else 1) + f * h + bias * (f * (2 if m.swiglu else 1) + h)
    norms = 2 * h * (1 if m.normalization == "RMSNorm" else 2)
    emb = vocab_size * h * (2 if m.untie_embeddings_and_output_weights else 1)
    pos = m.max_position_embeddings * h if m.position_embedding_type == "learned_absolute" else 0
    final = h * (1 if m.normalization == "RMSNorm" else 2)
    return L * (attn + mlp + norms) + emb + pos + final
