"""Builds runs from the same seed in several layouts and writes, per scenario, the initial weights gathered into full
tensors (rank 0, one .pt file) and the losses of the first steps (JSON).

Launched by tests/test_same_init.py once with 1 process (the references) and once under torchrun with 2 (TP=2,
PP=2, interleaved PP, PP=2 with tied embeddings, DP=2): no weights are copied between runs, each starts from what
its own setup drew (megatron_ext/models/init.py).

usage: same_init_scenarios.py DATA_PREFIX OUT_JSON SCENARIO [SCENARIO ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_ext.platform import quiet_optional_dependency_warnings

quiet_optional_dependency_warnings()

import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from megatron_ext.config import parse_args  # noqa: E402
from megatron_ext.models.full_weights import local_shards, shard_region  # noqa: E402
from megatron_ext.training.loop import setup, train_step  # noqa: E402

STEPS = 4
# A small Llama-style model; dropout off: its masks depend on the layout. The byte tokenizer's vocabulary padded
# to a multiple of 1 x TP (the same rows at TP=1 and TP=2); tp2_padded pads it to 512 rows (128 x TP).
BASE = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --seq-length 64 "
    "--swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
    "--hidden-dropout 0 --attention-dropout 0 --lr 4e-3 --lr-decay-style constant --micro-batch-size 2 "
    "--global-batch-size 8 --eval-iters 0 --log-interval 1000 --seed 4321 --make-vocab-size-divisible-by 1"
).split()
UNTIED = ["--untie-embeddings-and-output-weights"]
SCENARIOS: dict[str, list[str]] = {
    "reference": UNTIED,
    "reference_tied": [],
    "tp2": [*UNTIED, "--tensor-model-parallel-size", "2"],
    "tp2_padded": [*UNTIED, "--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "128"],
    "pp2": [*UNTIED, "--pipeline-model-parallel-size", "2"],
    "pp2_interleaved": [*UNTIED, "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    "pp2_tied": ["--pipeline-model-parallel-size", "2"],
    "dp2": UNTIED,
    "reference_megatron_init": [*UNTIED, "--no-use-cpu-initialization"],
    "pp2_megatron_init": [*UNTIED, "--pipeline-model-parallel-size", "2", "--no-use-cpu-initialization"],
}


def gather_full_weights(model: list[torch.nn.Module]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(every key's full tensor from all ranks' shards, the keys where two ranks' copies of a region differ), on
    rank 0 (empty elsewhere). Replicas (data-parallel ranks, the tied output layer) must agree."""
    pieces = [(sh.key, tuple(sh.global_shape), shard_region(sh), sh.data.detach().cpu()) for sh in local_shards(model)]
    everyone: list[object] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, pieces)
    full: dict[str, torch.Tensor] = {}
    written: dict[str, torch.Tensor] = {}
    disagree = set()
    for rank_pieces in everyone if torch.distributed.get_rank() == 0 else []:
        for key, shape, region, data in rank_pieces:  # type: ignore[union-attr]
            tensor = full.setdefault(key, torch.zeros(shape, dtype=data.dtype))
            mask = written.setdefault(key, torch.zeros(shape, dtype=torch.bool))
            data = data.reshape(tensor[region].shape)
            if mask[region].any() and not torch.equal(tensor[region][mask[region]], data[mask[region]]):
                disagree.add(key)
            tensor[region] = data
            mask[region] = True
    return full, sorted(disagree)


def run(name: str, prefix: str, workdir: Path) -> dict[str, object]:
    argv = [*BASE, *SCENARIOS[name], "--data-path", prefix, "--data-cache-path", str(workdir / "cache")]
    tr = setup(parse_args([*argv, "--train-iters", str(STEPS)]))
    full, disagree = gather_full_weights(tr.model)
    if torch.distributed.get_rank() == 0:
        torch.save(full, workdir / f"init_{name}.pt")
    losses = [train_step(tr)["lm_loss"] for _ in range(STEPS)]
    parallel_state.destroy_model_parallel()
    return {"losses": losses, "replicas_disagree": disagree}


def main() -> None:
    prefix, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    results = {name: run(name, prefix, Path(out).parent) for name in names}
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
