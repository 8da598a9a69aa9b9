"""Full (parallelism-free) weights keyed as in megatron-core's sharded state dict, and their local shards.

megatron-core describes each local parameter as a `ShardedTensor`: a global key, the global shape and this rank's
offset in it (layers are stacked along a leading axis, so the same key holds every layer). That description is
enough to cut any rank's slice out of a full tensor, whatever the tensor/pipeline layout: this is how the same
weights are placed into TP=2 or PP=2 models, and the base of the universal checkpoint format.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.transformer.module import MegatronModule


def local_shards(model_chunks: list[torch.nn.Module]) -> Iterator[ShardedTensor]:
    """Every ShardedTensor of this rank's model chunks (factories such as SwiGLU's fc1 split are built)."""
    for chunk in model_chunks:
        module: MegatronModule = getattr(chunk, "module", chunk)  # DDP-wrapped or bare
        sharded, _ = extract_sharded_tensors_and_factories(module.sharded_state_dict())
        stack = list(sharded.values())
        while stack:
            item = stack.pop()
            if isinstance(item, ShardedTensorFactory):
                built = item.build()
                stack.extend(built.values() if isinstance(built, dict) else built)
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, ShardedTensor) and item.flattened_range is None:
                yield item


def shard_region(sh: ShardedTensor) -> tuple[slice, ...]:
    """This shard's region of the full tensor; prepended (layer) axes have extent 1 and are not in local_shape."""
    shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    return tuple(slice(o, o + n) for o, n in zip(sh.global_offset, shape))


def load_full_weights(model_chunks: list[torch.nn.Module], full: dict[str, torch.Tensor]) -> None:
    """Copies each local shard from the full tensor of its key (any TP/PP layout)."""
    missing = []
    with torch.no_grad():
        for sh in local_shards(model_chunks):
            if sh.key not in full:
                missing.append(sh.key)
                continue
            tensor = full[sh.key]
            if tuple(tensor.shape) != tuple(sh.global_shape):
                raise ValueError(
                    f"{sh.key}: full tensor has shape {tuple(tensor.shape)}, model expects {sh.global_shape}"
                )
            sh.data.copy_(tensor[shard_region(sh)].reshape(sh.data.shape))
    if missing:
        raise KeyError(f"no full weight for {sorted(set(missing))}")


def full_weights_single_rank(model_chunks: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Full tensors of a model that holds every shard itself (TP=1, PP=1); for tests and exports."""
    full: dict[str, torch.Tensor] = {}
    for sh in local_shards(model_chunks):
        tensor = full.setdefault(sh.key, torch.zeros(sh.global_shape, dtype=sh.data.dtype))
        region = shard_region(sh)
        tensor[region] = sh.data.detach().reshape(tensor[region].shape)
    return full
