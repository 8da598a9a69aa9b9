"""Checkpoint conversions: Hugging Face (hf), the universal parallelism-free format (universal), DeepSpeed (deepspeed).

Shared here, import-light (no megatron-core at import time), so that every converter finds checkpoints, reports
user mistakes and writes its output the same way: a bad input is one `ConvertError` line raised before anything
is written, and output appears under its final name only once complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from megatron_ext.training import inference, layout
from megatron_ext.training.layout import COMMON_STATE
from megatron_ext.training.universal import ConvertError

T = TypeVar("T")


def find_checkpoint(load: str | Path, iteration: int | None = None) -> Path:
    """The iter_%07d folder to read (see megatron_ext.training.layout); a miss is a ConvertError."""
    try:
        return layout.find_checkpoint(load, iteration)
    except layout.CheckpointNotFound as e:
        raise ConvertError(str(e)) from None


def read_common(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's common state, read as dist_checkpointing does but without importing megatron-core (slow)
    so that unsupported checkpoints are refused at once."""
    import torch

    try:
        common = torch.load(ckpt / COMMON_STATE, map_location="cpu")
    except Exception as e:  # pickle/zip errors carry multi-line messages
        raise ConvertError(f"{ckpt / COMMON_STATE}: unreadable common state ({type(e).__name__})") from e
    if not isinstance(common, dict):
        raise ConvertError(f"{ckpt / COMMON_STATE}: expected a dict, found {type(common).__name__}")
    return common


def saved_config(ckpt: Path, common: dict[str, Any]) -> dict[str, Any]:
    """The run's Config as a dict (megatron_ext.training.inference.saved_config); a miss is a ConvertError."""
    try:
        return inference.saved_config(ckpt, common)
    except layout.CheckpointNotFound as e:
        raise ConvertError(str(e)) from None


def check_output_dir(out: str | Path) -> Path:
    """Refuses an output folder that exists and is not empty (nothing is ever overwritten)."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConvertError(f"{path}: already exists and is not empty; choose a new output folder")
    return path


@contextlib.contextmanager
def atomic_output_dir(out: str | Path) -> Iterator[Path]:
    """A temporary sibling folder that becomes `out` only when the block succeeds (removed when it fails)."""
    final = check_output_dir(out).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        final.rmdir()  # empty, as checked
    os.replace(tmp, final)


@contextlib.contextmanager
def world_of_one() -> Iterator[bool]:
    """A one-process gloo group for dist_checkpointing (it asks for ranks even when reading alone); yields
    whether it was started here. An existing group is reused and left alone."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConvertError("conversions run in one process; start them outside torchrun/mpiexec")
        yield False
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield True
    finally:
        if "megatron.core.parallel_state" in sys.modules:
            sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
        dist.destroy_process_group()


def batches_within(items: list[T], budget: int, size: Callable[[T], int]) -> Iterator[list[T]]:
    """Consecutive items whose sizes together stay within `budget` (an item larger than it goes alone): converters
    read or write in groups no larger than the largest tensor, so memory holds about two tensors at most."""
    batch: list[T] = []
    held = 0
    for item in items:
        if batch and held + size(item) > budget:
            yield batch
            batch, held = [], 0
        batch.append(item)
        held += size(item)
    if batch:
        yield batch


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr (converters keep stdout for their listing)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not enabled, leave=False)


def saved_tokenizer(kind: str, model: str | None) -> Any:
    """The run's tokenizer (for its true vocabulary size); a missing model file is a ConvertError."""
    from megatron_ext.data.tokenizers import build_tokenizer

    try:
        return build_tokenizer(kind, model)
    except (ValueError, OSError) as e:
        raise ConvertError(f"tokenizer {kind}: {e} (pass the tokenizer model path)") from e


def tensor_metadata(ckpt: Path) -> dict[str, Any]:
    """Every tensor key of a dist_checkpointing folder with its global shape and dtype (in a world of one)."""
    from megatron.core import dist_checkpointing

    return dict(dist_checkpointing.load_tensors_metadata(str(ckpt)))


def read_tensors(ckpt: Path, wanted: list[tuple[str, int | None]], meta: dict[str, Any]) -> dict:
    """The requested tensors (whole, or one layer of a stacked key) in one dist_checkpointing read."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    request = {}
    for i, (key, layer) in enumerate(wanted):
        md = meta[key]
        # One layer as a [1, ...] slice at offset `layer` of axis 0. Not with prepend_axis_num: that takes
        # megatron-core's legacy path, which in a world of one counts the other layers as local shards too.
        shape = md.global_shape if layer is None else (1, *md.global_shape[1:])
        offsets = () if layer is None else ((0, layer, md.global_shape[0]),)
        request[f"t{i}"] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=md.dtype), *offsets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's ShardedTensor deprecation notes
        loaded = dist_checkpointing.load(request, str(ckpt), validate_access_integrity=False)
    return {w: loaded[f"t{i}"] if w[1] is None else loaded[f"t{i}"][0] for i, w in enumerate(wanted)}
