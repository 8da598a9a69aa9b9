"""The context compressor's model pieces (AceRAG): the encoder (a GPTModel of the LM's first K layers that returns
its post-final-norm hidden states), the soft tokens it gives at the kept positions, and the frozen LM reading them
through megatron-core's `GPTModel.forward(decoder_input=...)`.

The batch layout (soft-token sources and places, right-padded rows) is megatron_ext/data/context_compressor.py's;
the recipe that loads the LM checkpoint and trains the encoder is megatron_ext/context_compressor.py.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel


def as_encoder(gpt: GPTModel) -> GPTModel:
    """A GPTModel built with post_process (so its decoder has the final norm) and tied embeddings (no output
    weight), made to return the decoder's output [s, b, h] instead of logits. Same parameters and checkpoint keys as
    a K-layer GPT with tied embeddings, which is what the tools (inspect, to-hf) see."""
    assert gpt.share_embeddings_and_output_weights, "the encoder has no output layer of its own"
    gpt.post_process = False
    return gpt


@torch.no_grad()
def copy_lm_layers(encoder: GPTModel, lm: GPTModel) -> None:
    """Initialises the encoder from the LM: embeddings, the first K layers, the final norm (this rank's shards;
    both are built at the same tensor-parallel size)."""
    encoder.embedding.load_state_dict(lm.embedding.state_dict())
    for mine, theirs in zip(encoder.decoder.layers, lm.decoder.layers):
        mine.load_state_dict(theirs.state_dict())
    encoder.decoder.final_layernorm.load_state_dict(lm.decoder.final_layernorm.state_dict())


def positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)


def soft_tokens(encoder: torch.nn.Module, enc_tokens: torch.Tensor, soft_src: torch.Tensor) -> torch.Tensor:
    """[soft tokens, h]: the encoder's hidden states of the chunks `enc_tokens` [c, e] at the flat positions
    `soft_src` (chunk x e + position), in order."""
    hidden = encoder(enc_tokens, positions(enc_tokens), None)  # [e, c, h]
    return hidden.transpose(0, 1).reshape(-1, hidden.shape[-1]).index_select(0, soft_src)


def lm_input(lm: GPTModel, tokens: torch.Tensor, soft: torch.Tensor, soft_dst: torch.Tensor) -> torch.Tensor:
    """The LM's decoder input [s, b, h]: its embeddings of `tokens` [b, s] with the soft tokens put at the flat
    places `soft_dst` (row x s + position); learned absolute positions are added to soft tokens too (RoPE takes
    positions 0..s-1 inside the LM)."""
    pos = positions(tokens)
    emb = lm.embedding(input_ids=tokens, position_ids=pos)  # [s, b, h]
    if lm.embedding.add_position_embedding:
        soft = soft + lm.embedding.position_embeddings(pos.reshape(-1).index_select(0, soft_dst))
    b, s = tokens.shape
    flat = emb.transpose(0, 1).reshape(b * s, -1)
    flat = flat.index_put((soft_dst,), soft.to(flat.dtype))  # out of place: gradients reach the soft tokens
    return flat.view(b, s, -1).transpose(0, 1).contiguous()


def lm_losses(
    lm: GPTModel, tokens: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor, soft_dst: torch.Tensor
) -> torch.Tensor:
    """Per-token losses [b, s] of the frozen LM on `tokens` with soft tokens in place (see `lm_input`)."""
    return lm(tokens, positions(tokens), None, decoder_input=lm_input(lm, tokens, soft, soft_dst), labels=labels)
