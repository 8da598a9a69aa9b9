"""Layout-free initial weights: the same model from the same seed on any tensor/pipeline/data/virtual-pipeline layout.

megatron-core draws each rank's shard from that rank's RNG state, so `--seed 1234` gives another initial model at
TP=2 or PP=2 than at TP=1 and loss curves of two layouts cannot be compared. Here every full tensor (one layer of a
stacked key) is drawn in blocks of whole rows, each block from a generator seeded by (seed, the tensor's global
checkpoint key, layer, block), with megatron-core's own init function for that kind of weight, and this rank's
slice is cut out of it as the checkpoint's sharded_state_dict describes it (`models/full_weights.py`: the mapping
that places full weights and reads universal checkpoints, SwiGLU's fc1 halves included). The keys are global:
megatron-core's module names restart at layer 0 on every pipeline stage, the checkpoint keys carry the global
layer as an offset.

A rank draws only the blocks that hold its rows, in parallel threads (torch's thread count), on the CPU (the same
numbers whatever the device): a tensor-parallel split of the first axis (QKV, fc1, embedding, output layer) costs
1/TP, a split of the second (attention projection, fc2) the whole tensor; memory is those rows of one tensor at a
time. `bench/same_init.py` measures it. Where the vocabulary padding differs (it grows with TP unless
`--make-vocab-size-divisible-by` absorbs it) the embedding and output tensors keep the real vocabulary's rows,
but the padding rows enter the softmax of the output layer, so losses differ slightly.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from megatron.core.transformer import TransformerConfig

from megatron_ext.models.full_weights import local_shards, shard_region

BLOCK = 1 << 22
"""Elements of the full tensor drawn by one generator (whole rows: a longer row is a block alone)."""

# Checkpoint-key endings of the randomly initialised weights -> which of megatron-core's init functions draws
# them (TransformerConfig.init_method, output_layer_init_method, embedding_init_method), as its modules do.
RANDOM_WEIGHTS = {
    "embedding.word_embeddings.weight": "embedding_init_method",
    "embedding.position_embeddings.weight": "embedding_init_method",
    "self_attention.linear_qkv.weight": "init_method",
    "self_attention.linear_proj.weight": "output_layer_init_method",
    "mlp.linear_fc1.weight": "init_method",
    "mlp.linear_fc2.weight": "output_layer_init_method",
    "output_layer.weight": "init_method",
}


def tensor_seed(seed: int, key: str, place: tuple[int, ...]) -> int:
    """The generator seed of one block of a full tensor: a hash of the run's seed, the global key and the place
    (layer of a stacked key, block of rows) in 63 bits."""
    digest = hashlib.sha256(f"{seed}|{key}|{','.join(map(str, place))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def init_function(config: TransformerConfig, key: str) -> Callable[..., torch.Tensor] | None:
    """megatron-core's init function of the weight under `key`, or None for weights built constant (biases,
    norms), which are the same on every layout already."""
    for ending, name in RANDOM_WEIGHTS.items():
        if key == ending or key.endswith("." + ending):
            return getattr(config, name)
    return None


@dataclass
class InitReport:
    """What `initialise` did: elements drawn and seconds spent per key (for bench/same_init.py)."""

    elements: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def initialise(model_chunks: list[torch.nn.Module], config: TransformerConfig, seed: int) -> InitReport:
    """Redraws every random weight of this rank's `model_chunks` as its slice of the layout-free full tensor.

    Raises ValueError for a weight that is neither known (RANDOM_WEIGHTS) nor constant as built: its values would
    depend on the layout, which is what this replaces."""
    report = InitReport()
    with torch.no_grad(), ThreadPoolExecutor(torch.get_num_threads()) as pool:
        for sh in local_shards(model_chunks):
            init = init_function(config, sh.key)
            if init is None:
                if sh.data.numel() and not bool((sh.data == sh.data.reshape(-1)[0]).all()):
                    raise ValueError(f"{sh.key}: no layout-free initialisation for this weight (models/init.py)")
                continue
            start = time.perf_counter()
            region = shard_region(sh)
            layer, region = tuple(sh.global_offset[: sh.prepend_axis_num]), region[sh.prepend_axis_num :]
            full_shape = tuple(sh.global_shape[sh.prepend_axis_num :])
            rows, first = draw_rows(init, seed, sh.key, layer, full_shape, region[0], pool)
            local = rows[region[0].start - first : region[0].stop - first][(slice(None), *region[1:])]
            sh.data.copy_(local.reshape(sh.data.shape))
            report.elements += rows.numel()
            report.seconds[sh.key] = report.seconds.get(sh.key, 0.0) + time.perf_counter() - start
    return report


def draw_rows(
    init: Callable[..., torch.Tensor],
    seed: int,
    key: str,
    layer: tuple[int, ...],
    shape: tuple[int, ...],
    wanted: slice,
    pool: ThreadPoolExecutor,
) -> tuple[torch.Tensor, int]:
    """(rows of the full fp32 tensor that cover `wanted`, the first of them), drawn on the CPU (the same numbers on
    every device). The full tensor is made of blocks of whole rows, about BLOCK elements each, every block from
    its own generator and always drawn whole (the last one past the tensor's end), so a row's numbers depend on
    its place only, not on the row count: a vocabulary padded further keeps the rows of the real one. A rank
    draws only the blocks of its rows (a tensor-parallel split of the first axis: 1/TP of the work), in threads."""
    per_block = max(1, BLOCK // max(math.prod(shape[1:]), 1))
    blocks = range(wanted.start // per_block, -(-wanted.stop // per_block))
    first = blocks.start * per_block
    rows = torch.empty((len(blocks) * per_block, *shape[1:]), dtype=torch.float32)

    def draw(block: int) -> None:
        part = rows[block * per_block - first : (block + 1) * per_block - first]
        init(part, generator=torch.Generator().manual_seed(tensor_seed(seed, key, (*layer, block))))

    list(pool.map(draw, blocks))
    return rows, first
