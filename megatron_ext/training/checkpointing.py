"""Checkpoints in Megatron-LM's layout (`iter_%07d/` + `latest_checkpointed_iteration.txt`) via dist_checkpointing.

A save goes to `iter_%07d.tmp/` and becomes visible by an atomic rename, then the tracker file is replaced: a job
killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import MegatronOptimizer

from megatron_ext.training.schedules import ParamScheduler

TRACKER = "latest_checkpointed_iteration.txt"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> int | None:
    """The iteration named by the tracker file, or None when there is no checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return 0
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}")
    return int(text)


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _layout() -> list[int]:
    return [
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
    ]


def _rng_state() -> ShardedObject:
    """This rank's RNG states, one object per (pipeline, tensor) rank: data-parallel replicas share their states
    (Megatron seeds them alike), so a run can resume with another data-parallel size."""
    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    offset = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank())
    return ShardedObject(
        "rng_state", state, tuple(_layout()), offset, replica_id=parallel_state.get_data_parallel_rank()
    )


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(
    model: list[torch.nn.Module],
    optimizer: MegatronOptimizer | None,
    is_loading: bool,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for i, chunk in enumerate(model):
        state[_model_key(i, len(model))] = chunk.module.sharded_state_dict()  # type: ignore[operator]
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return state


def save(
    root: str | Path,
    iteration: int,
    model: list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: ParamScheduler,
    extra: dict[str, Any],
) -> Path:
    """Writes iter_%07d atomically and then points the tracker at it. Collective: every rank calls it."""
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    state["rng_state"] = _rng_state()
    state["parallel_layout"] = _layout()
    state["scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    state.update(extra)
    dist_checkpointing.save(state, str(tmp))
    torch.distributed.barrier()
    if rank0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = Path(root) / (TRACKER + ".tmp")
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, Path(root) / TRACKER)
    torch.distributed.barrier()
    return final


def load(root: str | Path, model: list[torch.nn.Module], optimizer: MegatronOptimizer | None) -> dict[str, Any] | None:
    """Restores model, optimizer and RNG from the latest checkpoint; returns its other entries (the schedule
    under "scheduler": whether it is followed is the caller's decision)."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    path = iteration_dir(root, iteration)
    if not path.is_dir():
        raise FileNotFoundError(f"{Path(root) / TRACKER} names iteration {iteration} but {path} is missing")
    state = _sharded_state(model, optimizer, is_loading=True)
    same_layout = dist_checkpointing.load_common_state_dict(str(path)).get("parallel_layout") == _layout()
    if same_layout:  # RNG streams only mean something in the tensor/pipeline layout they were saved in
        state["rng_state"] = _rng_state()
    with torch.no_grad():
        loaded = dist_checkpointing.load(state, str(path))
        for i, chunk in enumerate(model):
            chunk.module.load_state_dict(loaded[_model_key(i, len(model))])  # type: ignore[operator]
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    skip = {"rng_state", "optimizer"} | {_model_key(i, len(model)) for i in range(len(model))}
    return {k: v for k, v in loaded.items() if k not in skip}
