"""Writes a DeepSpeed checkpoint of a small module with Megatron-DeepSpeed GPT parameter names, trained a few Adam
steps under ZeRO-1 on CPU, plus the reference values from plain PyTorch (weights and Adam moments).

    python tests/deepspeed_checkpoint.py OUT_DIR

OUT_DIR/ds/global_step{STEPS}/ is the DeepSpeed checkpoint (with `universal_checkpoint_info` and Megatron-DeepSpeed
`args` in its client state, as Megatron-DeepSpeed saves them); OUT_DIR/reference.pt holds
{name: {"param", "exp_avg", "exp_avg_sq"}} from torch.optim.Adam run on the same gradients.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

LAYERS, HIDDEN, HEADS, KV, FFN, VOCAB, PADDED, SEQ, STEPS = 2, 64, 4, 2, 128, 258, 320, 64, 3
ARGS = argparse.Namespace(
    num_layers=LAYERS,
    hidden_size=HIDDEN,
    num_attention_heads=HEADS,
    num_key_value_heads=KV,
    ffn_hidden_size=FFN,
    seq_length=SEQ,
    max_position_embeddings=SEQ,
    swiglu=True,
    normalization="rmsnorm",
    use_rotary_position_embeddings=True,
    rope_theta=10000,
    untie_embeddings_and_output_weights=True,
    add_bias_linear=False,
    tokenizer_type="ByteTokenizer",
    make_vocab_size_divisible_by=64,
    consumed_train_samples=STEPS * 4,
)


def shapes() -> dict[str, tuple[int, ...]]:
    """Megatron-DeepSpeed's GPTModel names (non-pipeline) and full shapes."""
    head = HIDDEN // HEADS
    out = {"language_model.embedding.word_embeddings.weight": (PADDED, HIDDEN)}
    for i in range(LAYERS):
        p = f"language_model.encoder.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attention.query_key_value.weight": ((HEADS + 2 * KV) * head, HIDDEN),
            p + "self_attention.dense.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.dense_h_to_4h.weight": (2 * FFN, HIDDEN),
            p + "mlp.dense_4h_to_h.weight": (HIDDEN, FFN),
        }
    out |= {"language_model.encoder.final_layernorm.weight": (HIDDEN,)}
    out |= {"language_model.output_layer.weight": (PADDED, HIDDEN)}
    return out


class Named(torch.nn.Module):
    """Parameters under dotted names (nested modules), and a loss that reaches every one of them."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for name, shape in shapes().items():
            owner: torch.nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02))

    def forward(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(100 + step)
        loss = torch.zeros(())
        for p in self.parameters():
            loss = loss + ((p - torch.randn(p.shape, generator=gen) * 0.05) ** 2).mean()
        return loss


def main() -> None:
    out = Path(sys.argv[1])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", DS_ACCELERATOR="cpu")
    import deepspeed

    # DeepSpeed would JIT-compile its shared-memory all-reduce for the CPU accelerator (minutes); gloo suffices.
    for name in list(deepspeed.ops.__compatible_ops__):
        if "shm_comm" in name:
            deepspeed.ops.__compatible_ops__[name] = False
    model = Named()
    reference = copy.deepcopy(model)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
        "gradient_clipping": 0.0,
    }
    deepspeed.init_distributed(dist_backend="gloo")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(STEPS):
        engine.backward(engine(step))
        engine.step()
        adam.zero_grad()
        reference(step).backward()
        adam.step()
    info = {
        "vocabulary_parameter_patterns": [
            "language_model.embedding.word_embeddings.weight",
            "language_model.output_layer.weight",
        ],
        "original_vocab_size": VOCAB,
        "tp_replicated_parameter_patterns": [r".*layernorm\.weight$"],
        "parameter_with_row_parallelism_patterns": [r".*dense\.weight$", r".*dense_4h_to_h\.weight$"],
        "parameter_with_2_sub_params_cat_dim_0": [r".*dense_h_to_4h\.weight$"],
    }
    client = {"universal_checkpoint_info": info, "args": ARGS, "iteration": STEPS}
    engine.save_checkpoint(str(out / "ds"), tag=f"global_step{STEPS}", client_state=client)
    expected = {
        name: {"param": p.detach().clone(), **{k: adam.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}}
        for name, p in reference.named_parameters()
    }
    torch.save(expected, out / "reference.pt")


if __name__ == "__main__":
    main()
