"""Checkpoints in Megatron-LM's layout (`iter_%07d/` + `latest_checkpointed_iteration.txt`) via dist_checkpointing.

The optimizer state is saved in model space (one tensor per parameter and state, keyed by the parameter's global
key; the distributed optimizer's "fully_reshardable" format), so a checkpoint loads at another TP/PP/DP and
converts to the universal format without the run's layout. `--load` also takes a universal checkpoint folder.

A save goes to `iter_%07d.tmp/` and becomes visible by an atomic rename, then the tracker file is replaced: a job
killed mid-save leaves the previous checkpoint as the latest. A manifest of file sizes, written last, lets a load
detect a damaged checkpoint (truncated or missing files) and fall back to the newest good one.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ext.cli import UserError, human_bytes, os_reason
from megatron_ext.data.tokenizers import padded_vocab_size
from megatron_ext.training import universal
from megatron_ext.training.layout import (
    COMMON_STATE,
    MANIFEST,
    TRACKER,
    CheckpointNotFound,
    iteration_dir,
    latest_iteration,
    verify,
    without_record_crc,
    write_manifest,
)
from megatron_ext.training.optim import torch_optimizers
from megatron_ext.training.schedules import ParamScheduler
from megatron_ext.training.universal import ConvertError


class CheckpointError(UserError, RuntimeError):
    """No checkpoint can be resumed from; the message says what was found."""


@dataclass(frozen=True)
class Vocabulary:
    """The run's tokenizer, which a checkpoint's embedding rows must belong to."""

    size: int  # the tokenizer's own, before padding
    tokenizer: str  # its flags, for messages
    resize: bool = False  # --finetune --resize-vocabulary: keep the rows both know, the others as initialised


# Gathered over data-parallel ranks through the gloo groups (megatron-core's NCCL variant needs CUDA).
OPTIMIZER_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}


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


def allocate_optimizer_state(optimizer: MegatronOptimizer, step: int = 0) -> None:
    """Gives every Adam parameter zero moments and step 0 before a load, as a first step would: megatron-core's
    distributed optimizer cannot describe (or load into) an optimizer that has never stepped when it falls back to
    torch's AdamW (no Apex / Transformer Engine). Step 0 with zero moments is exactly a fresh Adam. (A converter
    passes the `step` that the state it writes was saved at.)"""
    for opt in torch_optimizers(optimizer):
        if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                if not state:
                    state["step"] = torch.tensor(float(step))
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _sharded_state(
    model: list[DistributedDataParallel],
    optimizer: MegatronOptimizer | None,
    is_loading: bool,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for i, chunk in enumerate(model):
        state[_model_key(i, len(model))] = chunk.module.sharded_state_dict()
    if optimizer is not None:
        if is_loading:
            allocate_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return state


def checkpoint_state(
    model: list[DistributedDataParallel],
    optimizer: MegatronOptimizer,
    scheduler_state: dict[str, Any] | None,
    iteration: int,
    extra: dict[str, Any],
    rng: bool = True,
) -> dict[str, Any]:
    """What a save writes: the sharded model and optimizer, this rank's RNG states and the run's progress.

    Without `rng` (a converted checkpoint, whose RNG states would belong to no run) the checkpoint says so, and a
    run loading it keeps the states its seed gave it, as with a universal checkpoint."""
    state = _sharded_state(model, optimizer, is_loading=False)
    if rng:
        state["rng_state"] = _rng_state()
    state["rng_state_saved"] = rng
    state["parallel_layout"] = _layout()
    state["scheduler"] = scheduler_state
    state["iteration"] = iteration
    state.update(extra)
    return state


def _iterations(root: Path) -> list[int]:
    """Every complete-looking iteration folder, newest first (temporary folders of unfinished saves excluded)."""
    found = [int(p.name[5:]) for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, reverse=True)


def _retain(root: Path, keep: int | None, interval: int | None = None) -> None:
    """Deletes all but the newest `keep` checkpoints (1 when only `interval` is given) and those whose iteration
    is a multiple of `interval` (--save-retain-interval); called once the newest is complete."""
    for iteration in _iterations(root)[keep or 1 :]:
        if interval is None or iteration % interval:
            shutil.rmtree(iteration_dir(root, iteration), ignore_errors=True)


def save(
    root: str | Path,
    iteration: int,
    model: list[DistributedDataParallel],
    optimizer: MegatronOptimizer,
    scheduler: ParamScheduler,
    extra: dict[str, Any],
    keep_last: int | None = None,
    async_queue: AsyncCallsQueue | None = None,
    retain_interval: int | None = None,
) -> Path:
    """Writes iter_%07d atomically and then points the tracker at it. Collective: every rank calls it.

    With `async_queue` the files are written by megatron-core's background writer while training goes on; the
    rename and the tracker follow when the queue finalizes the save (the caller finalizes before the next save
    and before exiting), so a crash in between leaves the previous checkpoint as the latest.
    """
    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    failed: list[str | None] = [None]
    if torch.distributed.get_rank() == 0:
        try:
            for stale in root.glob("iter_*.tmp"):  # left by a job killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            failed = [_too_little_space(root, final.name)]
            if not failed[0]:
                tmp.mkdir(parents=True)
        except OSError as e:
            failed = [f"--save {root}: cannot write checkpoint {final.name}: {os_reason(e)}"]
    torch.distributed.broadcast_object_list(failed, src=0)  # every rank stops, not rank 0 alone
    if failed[0]:
        raise CheckpointError(failed[0])
    state = checkpoint_state(model, optimizer, scheduler.state_dict(), iteration, extra)
    publish = partial(_publish, root, tmp, iteration, keep_last, retain_interval)
    children_die_with_their_parent()
    with without_record_crc():  # the writer processes are forked inside: they inherit the setting
        if async_queue is not None:
            request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
            assert request is not None
            request.add_finalize_fn(publish)
            async_queue.schedule_async_request(request)
            return final
        # The writer's "Local process N encountered an error" repeats the exception that the line below reports.
        logging.getLogger(filesystem_async.__name__).setLevel(logging.CRITICAL)
        try:
            dist_checkpointing.save(state, str(tmp))
        except (OSError, RuntimeError, CheckpointingException, CheckpointException) as e:
            if torch.distributed.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"--save {root}: cannot write checkpoint {final.name}: {_write_failure(e, root)}; the half-written "
                f"{tmp.name} is removed, the last complete checkpoint is unchanged"
            ) from e
    publish()
    return final


def _die_with(parent: int) -> None:
    """In a child of `parent`: killed when it dies (Linux's PR_SET_PDEATHSIG), at once if it already has."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (linux/prctl.h)
    if os.getppid() != parent:
        os._exit(1)


@functools.cache
def children_die_with_their_parent() -> SyncManager | None:
    """From now on, the processes a save starts die with this one: after a kill -9 of a rank during a save, a writer
    (forked inside dist_checkpointing.save) stayed alive with parent 1, holding the memory of the tensors it was
    writing, and so did megatron-core's results-queue manager (a spawned process). Every fork of this process (and
    of its forks) takes PR_SET_PDEATHSIG; the manager is started here with it, as megatron-core would start it, and
    handed to megatron-core. Returns the manager (kept alive by the cache)."""
    if not sys.platform.startswith("linux"):
        return None
    forking = [0]

    def remember_parent() -> None:
        forking[0] = os.getpid()

    os.register_at_fork(before=remember_parent, after_in_child=lambda: _die_with(forking[0]))
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # megatron-core's _get_write_results_queue
    manager.start(_die_with, (os.getpid(),))
    filesystem_async._results_queue = manager.Queue()
    return manager


def last_checkpoint_bytes(root: Path) -> int | None:
    """The size of the latest checkpoint in `root` from its manifest, or None (none yet, or not one of ours)."""
    try:
        iteration = latest_iteration(root)
        if iteration is None:
            return None
        sizes = json.loads((iteration_dir(root, iteration) / MANIFEST).read_text())
        return sum(int(v) for v in sizes.values())
    except (OSError, ValueError, CheckpointNotFound):
        return None


def _too_little_space(root: Path, name: str) -> str | None:
    """Why checkpoint `name` cannot fit in `root` (or None): the next one is about as large as the last (a model's
    size does not change between saves), so a disk with less free space stops the run before writing anything."""
    needed = last_checkpoint_bytes(root)
    if needed is None:
        return None
    free = shutil.disk_usage(root).free
    if free >= needed:
        return None
    return (
        f"--save {root}: {human_bytes(free)} free, checkpoint {name} needs about {human_bytes(needed)} (the size of "
        "the last one); not written, the last complete checkpoint is unchanged: free space or save elsewhere"
    )


def _write_failure(error: BaseException, folder: Path) -> str:
    """The cause of a failed save in words. A full disk often surfaces as torch's 'unexpected pos' from a short
    write, not as ENOSPC, so the free space decides then."""
    pending, seen = [error], []
    while pending:
        e = pending.pop()
        seen.append(e)
        if isinstance(e, OSError) and e.errno:
            return os_reason(e)
        if isinstance(e, CheckpointException):  # PyTorch's wrapper of each rank's failure
            pending += [exc for exc, _ in e.failures.values()]
        pending += [c for c in (e.__cause__, e.__context__) if c is not None and c not in seen]
    try:
        if shutil.disk_usage(folder).free < 2**20:
            return os.strerror(errno.ENOSPC).lower()
    except OSError:
        pass
    return _first_line(error)


def _publish(root: Path, tmp: Path, iteration: int, keep_last: int | None, retain_interval: int | None) -> None:
    """Once every rank's files are written: manifest, atomic rename, tracker, retention (rank 0)."""
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        final = iteration_dir(root, iteration)
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = root / (TRACKER + ".tmp")
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, root / TRACKER)
        if keep_last is not None or retain_interval is not None:
            _retain(root, keep_last, retain_interval)
    torch.distributed.barrier()


# What our own runs write into a --save folder besides checkpoints: a --load folder holding only these is empty.
RUN_FILES = re.compile(r"config\.json|train\.log|tensorboard|iter_\d+\.tmp|\..*")


def not_a_checkpoint(root: Path) -> str | None:
    """Why `root`, holding no checkpoint, must not be taken as an empty folder to start afresh in (or None): a
    Hugging Face model, or files that are not a run's own (a typo'd path, another framework's checkpoint)."""
    if not root.is_dir():
        return None
    config = root / "config.json"
    if config.is_file() and '"model_type"' in config.read_text(errors="replace") and any(root.glob("*.safetensors")):
        return (
            f"--load {root} is a Hugging Face model; convert it first: tools/convert_checkpoint.py from-hf --load "
            f"{root} --save NEW, then --load NEW (with --finetune to start a new run from its weights)"
        )
    others = sorted(p.name for p in root.iterdir() if not RUN_FILES.fullmatch(p.name))
    if others:
        return (
            f"--load {root} holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''} but no checkpoint; "
            "expected iter_NNNNNNN folders with latest_checkpointed_iteration.txt, a universal checkpoint, or an "
            "empty or new folder to start in"
        )
    return None


def find_loadable(root: str | Path, iteration: int | None = None) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from: the tracker's, else (damaged or missing) the newest good one; and a line
    for every checkpoint passed over. A requested iteration (--ckpt-step) is that one or none; an iteration folder
    itself (`ckpt/iter_0000002`) is that iteration. Raises CheckpointError when `root` holds no checkpoint but is
    not empty either (see :func:`not_a_checkpoint`): a fresh start there would hide the mistake."""
    root = Path(root)
    if universal.is_universal(root):
        return root, []
    folder = re.fullmatch(r"iter_(\d+)", root.name)
    if folder and (root / COMMON_STATE).is_file():
        if iteration is not None and iteration != int(folder.group(1)):
            raise CheckpointError(f"--load {root} is iteration {int(folder.group(1))}, --ckpt-step {iteration}: "
                                  "give one of them")  # fmt: skip
        root, iteration = root.parent, int(folder.group(1))
    if iteration is not None:
        problem = verify(iteration_dir(root, iteration))
        if problem is None:
            return iteration_dir(root, iteration), []
        return None, [f"--ckpt-step {iteration}: checkpoint {iteration_dir(root, iteration)} is unusable ({problem})"]
    order = _iterations(root)
    try:
        named = latest_iteration(root)
    except CheckpointNotFound as e:
        named, notes = None, [str(e)]
    else:
        notes = []
    if named is not None:
        order = [named] + [i for i in order if i != named]
    for iteration in order:
        problem = verify(iteration_dir(root, iteration))
        if problem is None:
            return iteration_dir(root, iteration), notes
        notes.append(f"checkpoint {iteration_dir(root, iteration)} is unusable ({problem}); skipped")
    problem = None if notes else not_a_checkpoint(root)
    if problem:
        raise CheckpointError(problem)
    return None, notes


def load(
    root: str | Path,
    model: list[DistributedDataParallel],
    optimizer: MegatronOptimizer | None,
    load_rng: bool = True,
    log: Callable[[str], None] = print,
    iteration: int | None = None,
    vocabulary: Vocabulary | None = None,
) -> dict[str, Any] | None:
    """Restores model, optimizer (unless None) and RNG from the newest good checkpoint (or `iteration`), or from
    a universal checkpoint folder; returns its other entries (the schedule under "scheduler": whether it is
    followed is the caller's decision). A checkpoint of another vocabulary size than `vocabulary` is refused
    unless it asks to resize."""
    choice: list[Any] = [None, [], None]
    if torch.distributed.get_rank() == 0:
        try:
            choice = [*find_loadable(root, iteration), None]
        except CheckpointError as e:  # raised on every rank below, not on rank 0 alone (the others would wait)
            choice = [None, [], str(e)]
    torch.distributed.broadcast_object_list(choice, src=0)  # every rank loads the same checkpoint
    path, notes, refusal = choice
    if path is None and notes and not refusal:  # the last note is the error's reason: said once, in the error
        refusal, notes = f"--load {root}: no usable checkpoint ({notes[-1]})", notes[:-1]
    for note in notes:
        log(note)
    if refusal:
        raise CheckpointError(refusal)
    if path is None:
        return None
    if universal.is_universal(path):
        return _load_universal(Path(path), model, optimizer, log, vocabulary)
    state = _sharded_state(model, optimizer, is_loading=True)
    common = dist_checkpointing.load_common_state_dict(str(path))
    resized = _vocabulary_rows(path, common, vocabulary, state)
    same_layout = common.get("parallel_layout") == _layout() and common.get("rng_state_saved", True)
    if load_rng and same_layout:  # RNG streams only mean something in the tensor/pipeline layout they were saved in
        state["rng_state"] = _rng_state()
    with torch.no_grad():
        try:
            loaded = dist_checkpointing.load(state, str(path))
        except (CheckpointingException, CheckpointException) as e:
            if isinstance(e, CheckpointException):  # PyTorch's wrapper of what each rank's read raised
                e = next((exc for exc, _ in e.failures.values()), e)
            hint = "; without its optimizer state: --no-load-optim" if optimizer is not None else ""
            raise CheckpointError(f"--load {path}: {_first_line(e)} (another model or layout{hint})") from e
        for model_key, name, shard, start, rows in resized:
            known = slice(start, max(start, min(rows, start + len(shard))))
            local = shard.clone()  # rows past `rows` keep their initial values
            local[: known.stop - known.start] = loaded[model_key][name][known]
            loaded[model_key][name] = local
        for i, chunk in enumerate(model):
            chunk.module.load_state_dict(loaded[_model_key(i, len(model))])
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
    if "rng_state" in state:
        _set_rng_state(loaded["rng_state"])
    skip = {"rng_state", "optimizer"} | {_model_key(i, len(model)) for i in range(len(model))}
    rest = {k: v for k, v in loaded.items() if k not in skip}
    if "train_state" not in rest:
        rest.update(_megatron_lm_state(rest, log))
    return {"path": str(path), **rest}


def _vocabulary_rows(
    path: str | Path, common: dict[str, Any], vocabulary: Vocabulary | None, state: dict[str, Any]
) -> list[tuple[str, str, torch.Tensor, int, int]]:
    """Refuses a checkpoint of another vocabulary size, or (resizing) makes `state` read its whole embedding and
    output tensors: returns, for each, where it is in `state`, our shard (a freshly initialised parameter), the
    shard's first row and the rows both vocabularies know."""
    saved = common.get("vocab_size")
    if vocabulary is None or saved is None or saved == vocabulary.size:
        return []
    _check_vocabulary(path, saved, common.get("config"), vocabulary)
    divisible = (common.get("config") or {}).get("model", {}).get("make_vocab_size_divisible_by", 128)
    rows = padded_vocab_size(saved, divisible, common.get("parallel_layout", [1, 1])[1])
    resized = []
    for model_key in [k for k in state if k.startswith("model")]:
        for name, sh in list(state[model_key].items()):
            if isinstance(sh, ShardedTensor) and sh.key in universal.VOCAB_KEYS:
                whole = torch.empty((rows, *sh.global_shape[1:]), dtype=sh.data.dtype)
                state[model_key][name] = ShardedTensor.from_rank_offsets(sh.key, whole, replica_id=sh.replica_id)
                resized.append((model_key, name, sh.data, sh.global_offset[0], min(saved, vocabulary.size)))
    return resized


def _check_vocabulary(path: str | Path, saved: int, config: dict[str, Any] | None, vocabulary: Vocabulary) -> None:
    """Refuses a checkpoint saved with a vocabulary of `saved` tokens other than the run's, unless it resizes."""
    if saved == vocabulary.size or vocabulary.resize:
        return
    data = (config or {}).get("data", {})
    recorded = " ".join(f"--{k.replace('_', '-')} {data[k]}" for k in ("tokenizer_type", "tokenizer_model")
                        if data.get(k))  # fmt: skip
    raise CheckpointError(
        f"--load {path} was saved with a vocabulary of {saved} tokens ({recorded or 'tokenizer not recorded'}), "
        f"this run's tokenizer ({vocabulary.tokenizer}) has {vocabulary.size}: use the checkpoint's tokenizer, "
        "or --finetune --resize-vocabulary to start from its weights with the embedding resized"
    )


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _megatron_lm_state(common: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Progress of a checkpoint written by Megatron-LM's training (its `args` and `iteration`): the position in the
    data and the schedule follow from the consumed samples; its RNG, data order and scheduler are not ours."""
    args = common.get("args")
    samples = int(getattr(args, "consumed_train_samples", 0) or 0)
    seq = int(getattr(args, "seq_length", 0) or 0)
    iteration = int(common.get("iteration", 0) or 0)
    log(f"Megatron-LM checkpoint (version {common.get('checkpoint_version')}): iteration {iteration}, "
        f"{samples} samples consumed; its LR schedule and data order are not carried over")  # fmt: skip
    train_state = {"iteration": iteration, "consumed_samples": samples, "consumed_tokens": samples * seq}
    return {"train_state": train_state, "scheduler": None, "data_state": None}


def _load_universal(
    path: Path,
    model: list[DistributedDataParallel],
    optimizer: MegatronOptimizer | None,
    log: Callable[[str], None],
    vocabulary: Vocabulary | None,
) -> dict[str, Any]:
    """Fills this rank's shards of the model (and optimizer) from a universal checkpoint: any TP/PP/DP layout.
    RNG states are layout-bound and not part of the format; the run's seed starts them. Another tokenizer's
    vocabulary is refused as in a native checkpoint; resized, the rows both know are read, the others keep their
    initial values."""
    try:
        meta = universal.read_meta(path)
        saved = meta.get("vocab_size")
        known_rows = None
        if vocabulary is not None and saved is not None and saved != vocabulary.size:
            _check_vocabulary(path, saved, meta.get("config"), vocabulary)
            known_rows = min(saved, vocabulary.size)
        state = _sharded_state(model, optimizer, is_loading=True)
        with torch.no_grad():
            loaded = universal.load_into(path, state, known_rows)
    except ConvertError as e:
        raise CheckpointError(f"--load {path}: {e}") from e
    with torch.no_grad():
        for i, chunk in enumerate(model):
            chunk.module.load_state_dict(loaded[_model_key(i, len(model))])
        if optimizer is not None:
            if meta.get("optimizer_step") is None:
                raise CheckpointError(f"--load {path}: the universal checkpoint holds no optimizer step; "
                                      "pass --no-load-optim or --finetune")  # fmt: skip
            universal.set_optimizer_step(loaded["optimizer"], meta["optimizer_step"])
            optimizer.load_state_dict(loaded["optimizer"])
    source = meta["source_layout"]
    log(
        f"loaded universal checkpoint {path} (iteration {meta['iteration']}, saved at TP="
        f"{source['tensor_model_parallel_size']} PP={source['pipeline_model_parallel_size']}); "
        f"{'with' if optimizer is not None else 'without'} optimizer moments"
    )
    train_state = meta.get("train_state") or {"iteration": meta["iteration"]}
    restored = {key: meta.get(key) for key in ("scheduler", "data_state", "recipe_state", "config")}
    return {"path": str(path), "iteration": meta["iteration"], "train_state": train_state, **restored}
