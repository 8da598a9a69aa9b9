"""Our checkpoint in a chosen TP/PP layout, written from a universal folder (`from-universal`) or straight from
another of our checkpoints (`reshard`).

Our checkpoints keep every tensor under its global key (the optimizer state too: "fully_reshardable"), so a
checkpoint for any layout holds the same tensors; the layout shows only in the vocabulary padding and in the
config. The converter therefore writes the torch_dist files itself, streaming: tensors (one layer of one parameter
or state each) are read from the source a file's worth at a time, at most the largest tensor, written, and released
before the next, so memory stays at about that whatever the model size. What the files must hold (keys, dtypes,
modules' extra state, the optimizer's param groups and step) is asked of megatron-core, from a model with the same
layers and options but tiny dimensions. A run of the target layout loads the result with plain `--load` (and
`--ckpt-step`), optimizer moments included; its RNG states start from the run's seed, as with `--load UNIV` (a
converted checkpoint holds none).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

from megatron_ext.config import Config, ConfigError
from megatron_ext.convert import (
    ConvertError,
    atomic_output_dir,
    batches_within,
    check_output_dir,
    find_checkpoint,
    progress_bar,
    read_tensors,
    world_of_one,
)
from megatron_ext.convert.universal import describe_checkpoint
from megatron_ext.training.universal import check_shape, read_meta, source_tensor, state_of, target_shape


def _target_config(meta: dict[str, Any], tp: int | None, pp: int | None, distributed_optimizer: bool | None) -> Config:
    saved = meta["config"]
    par = saved.setdefault("parallel", {})
    if tp is not None:
        par["tensor_model_parallel_size"] = tp
    if pp is not None:
        par["pipeline_model_parallel_size"] = pp
    if distributed_optimizer is not None:
        par["use_distributed_optimizer"] = distributed_optimizer
    par["num_layers_per_virtual_pipeline_stage"] = None
    par["device"] = "cpu"
    par["distributed_backend"] = "gloo"
    saved.setdefault("checkpoint", {}).update(load=None, save=None)
    try:
        return Config.from_dict(saved)
    except ConfigError as e:
        raise ConvertError(f"the target layout does not fit the model: {e}") from e


# The structure of the target checkpoint (every key, its dtype, the optimizer's and the run's common state) comes
# from megatron-core itself, asked of a model with the same layers and options but tiny dimensions: the keys of our
# checkpoints are global (layout-free), so only the shapes differ, and those come from the universal folder.
_TWIN_HEAD_DIM = 8
_TWIN_FFN = 16
_TWIN_VOCAB = 16


def _twin_config(cfg: Config) -> Config:
    d = cfg.to_dict()
    heads = d["model"]["num_attention_heads"]
    d["model"].update(hidden_size=heads * _TWIN_HEAD_DIM, kv_channels=_TWIN_HEAD_DIM, ffn_hidden_size=_TWIN_FFN)
    d["parallel"].update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    return Config.from_dict(d)


@dataclass
class _Target:
    """What the target checkpoint holds: tensors as {key: (layers or None, dtype)}, sharded objects (modules' extra
    state) by their unique key, and the common state (optimizer step and param groups, schedule, progress)."""

    tensors: dict[str, tuple[int | None, Any]]
    objects: dict[str, Any]
    common: dict[str, Any]


def _target(cfg: Config, meta: dict[str, Any]) -> _Target:
    """Builds the tiny twin of the target in this process (a world of one) and reads its checkpoint structure."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_ext import distributed, platform
    from megatron_ext.models.gpt import build_model, transformer_config
    from megatron_ext.training import checkpointing
    from megatron_ext.training.optim import build_optimizer, wrap_model

    twin = _twin_config(cfg)
    plat = platform.select("cpu", "gloo")
    platform.setup_device(plat, 0)
    distributed.initialize_model_parallel(1, 1, None)
    model_parallel_cuda_manual_seed(twin.training.seed)
    config = transformer_config(twin, plat)
    model = wrap_model(twin, config, [build_model(twin, plat, config, _TWIN_VOCAB)])
    step = meta.get("optimizer_step")
    optimizer = None
    if step is not None:
        optimizer = build_optimizer(twin, model)
        checkpointing.allocate_optimizer_state(optimizer, step)  # megatron-core saves the step it finds there
    extra = {
        "train_state": meta.get("train_state") or {"iteration": meta["iteration"]},
        "data_state": meta.get("data_state"),
        "recipe_state": meta.get("recipe_state"),
        "config": cfg.to_dict(),
        "vocab_size": meta["vocab_size"],
    }
    state = checkpointing.checkpoint_state(model, optimizer, meta.get("scheduler"), meta["iteration"], extra, rng=False)
    par = cfg.parallel
    state["parallel_layout"] = [par.pipeline_model_parallel_size, par.tensor_model_parallel_size]
    sharded, common = save_preprocess(state, validate_access_integrity=False)
    tensors: dict[str, tuple[int | None, Any]] = {}
    objects: dict[str, Any] = {}
    for entry in nested_values(sharded):
        if isinstance(entry, ShardedObject):
            objects[entry.unique_key] = entry.data
        elif isinstance(entry, ShardedTensor):
            if entry.prepend_axis_num > 1:
                raise ConvertError(f"{entry.key}: {entry.prepend_axis_num} stacked axes are not supported")
            tensors[entry.key] = (entry.global_shape[0] if entry.prepend_axis_num else None, entry.dtype)
    return _Target(tensors, objects, common)


def _item_bytes(item: Any) -> int:
    data = item.tensor_data
    return 0 if data is None else math.prod(data.chunk.sizes) * data.properties.dtype.itemsize


def _item_key(item: Any) -> tuple[str, tuple[int, ...]]:
    return item.index.fqn, tuple(item.index.offset or ())


def _grouped_files_writer(path: Path, file_of: dict[tuple[str, tuple[int, ...]], int]) -> Any:
    """PyTorch's FileSystemWriter, but writing the files we grouped (`file_of`: tensor -> file; the small objects go
    with the last): its writer loop keeps each file's tensors until the file is closed, so one file per rank would
    hold the whole checkpoint."""
    from torch.distributed import checkpoint as dcp

    class Writer(dcp.FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            last = max(file_of.values())
            files: dict[int, list[Any]] = {}
            for item in plan.items:
                files.setdefault(file_of.get(_item_key(item), last), []).append(item)
            queue: Queue = Queue()
            for n, (_, items) in enumerate(sorted(files.items())):
                name = f"{plan.storage_data.prefix}{n}.distcp"
                queue.put((self.fs.concat_path(self.path, name), name, items))
            return self._write_data(planner, queue)

    return Writer(path, single_file_per_rank=True, thread_count=1)


# A reader returns the full tensors (any dtype; vocabulary tensors with any padding) for (target key, layer, target
# shape) requests, given a file's worth at a time so that a checkpoint source serves them in one read.
Reader = Callable[[list[tuple[str, int | None, tuple[int, ...]]]], list[Any]]


def _universal_reader(univ: Path, meta: dict[str, Any]) -> Reader:

    return lambda wanted: [source_tensor(univ, meta, key, layer, shape) for key, layer, shape in wanted]


def _checkpoint_reader(ckpt: Path, meta: dict[str, Any], sources: Any, tensors: Any) -> Reader:

    def read(wanted: list[tuple[str, int | None, tuple[int, ...]]]) -> list[Any]:
        names = [state_of(ckpt, meta, key, layer) for key, layer, _ in wanted]
        loaded = read_tensors(ckpt, list(dict.fromkeys(sources[n] for n in names)), tensors)
        for (key, _, shape), (name, state) in zip(wanted, names, strict=True):
            check_shape(ckpt, name, key, loaded[sources[(name, state)]], shape)
        return [loaded[sources[n]] for n in names]

    return read


def _write_tensors(
    read: Reader, root: Path, meta: dict[str, Any], target: _Target, padded_vocab: int, out: Path, bar: Any
) -> None:
    """Writes the tensors and objects as torch_dist (PyTorch DCP) files: one chunk per tensor, or per layer of a
    stacked key, read from the source only when the writer reaches the file that holds it, so memory holds about
    one file (at most the largest tensor) at a time. Loading reshards the chunks to whatever layout the run uses."""
    import io

    import torch
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    from megatron_ext.training.layout import without_record_crc

    items: list[WriteItem] = []
    requests: dict[tuple[str, tuple[int, ...]], tuple[str, int | None, tuple[int, ...]]] = {}
    for key, (layers, dtype) in target.tensors.items():
        for layer in range(layers) if layers is not None else [None]:
            shape = target_shape(root, meta, key, layer, padded_vocab)
            if layers is None or layer is None:  # one is None when the other is: a tensor of no layer
                offsets, sizes, size = (0,) * len(shape), shape, shape
            else:
                offsets, sizes, size = (layer, *(0,) * len(shape)), (1, *shape), (layers, *shape)
            index = MetadataIndex(key, torch.Size(offsets))
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            data = TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=dtype), size=torch.Size(size))
            items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=data))
            requests[(key, tuple(offsets))] = (key, layer, shape)
    # Files of at most the largest tensor's bytes; each file is one read of the source.
    item_of = {_item_key(i): i for i in items}
    groups = list(batches_within(list(requests), max(map(_item_bytes, items)), lambda r: _item_bytes(item_of[r])))
    file_of = {request: n for n, group in enumerate(groups) for request in group}
    for unique_key in target.objects:
        items.append(WriteItem(index=MetadataIndex(unique_key), type=WriteItemType.BYTE_IO))
    read_ahead: dict[tuple[str, tuple[int, ...]], Any] = {}

    def resolve(item: WriteItem) -> Any:
        bar.update(1)
        if item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save([target.objects[item.index.fqn]], buffer)  # megatron-core's form of a sharded object
            return buffer
        request = _item_key(item)
        if request not in read_ahead:
            group = groups[file_of[request]]
            read_ahead.update(zip(group, read([requests[r] for r in group]), strict=True))
        full = read_ahead.pop(request)
        key, layer, shape = requests[request]
        dtype = target.tensors[key][1]
        if tuple(full.shape) != shape:  # vocabulary padding: zero rows added, or rows past the tokenizer's dropped
            fitted = torch.zeros(shape, dtype=dtype)
            rows = min(shape[0], full.shape[0])
            fitted[:rows] = full[:rows]
            full = fitted
        full = full.to(dtype)
        return full if layer is None else full.unsqueeze(0)

    class Planner(DefaultSavePlanner):
        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item: WriteItem) -> Any:
            return resolve(write_item)

    try:
        with without_record_crc():
            dcp.save({}, storage_writer=_grouped_files_writer(out, file_of), planner=Planner(flatten_state_dict=False))
    except CheckpointException as e:  # PyTorch wraps what the reads raised (a damaged source file: one line)
        raise next((exc for exc, _ in e.failures.values() if isinstance(exc, ConvertError)), e) from None


def _convert(
    source: Path,
    open_source: Callable[[], tuple[dict[str, Any], Reader]],
    out_dir: str | Path | None,
    layout: tuple[int | None, int | None, bool | None],
    dry_run: bool,
    progress: bool,
    what: str,
) -> list[str]:
    """Writes our checkpoint (iter_%07d + tracker + config.json) in the target layout (default: the source's) from
    a source (`open_source`: its universal metadata and a reader), in a world of one. Returns what is (or would
    be) written."""
    if not dry_run and out_dir is not None:
        check_output_dir(out_dir)
    with world_of_one():
        meta, read = open_source()
        return _write_checkpoint(source, meta, read, out_dir, _target_config(meta, *layout), dry_run, progress, what)


def _write_checkpoint(
    source: Path,
    meta: dict[str, Any],
    read: Reader,
    out_dir: str | Path | None,
    cfg: Config,
    dry_run: bool,
    progress: bool,
    what: str,
) -> list[str]:
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    lines = [
        f"{source} (iteration {meta['iteration']}, {len(meta['params'])} parameters) -> TP={tp} PP={pp}, "
        f"{'distributed' if cfg.parallel.use_distributed_optimizer else 'plain'} optimizer, "
        f"{'with' if meta.get('optimizer_step') is not None else 'without'} Adam moments"
    ]
    if dry_run:
        return lines
    if out_dir is None:
        raise ConvertError(f"{what} needs an output folder")
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.serialization import get_default_save_common_strategy

    from megatron_ext.data.tokenizers import padded_vocab_size
    from megatron_ext.training.layout import TRACKER, iteration_dir, write_manifest

    padded_vocab = padded_vocab_size(meta["vocab_size"], cfg.model.make_vocab_size_divisible_by, tp)
    with atomic_output_dir(out_dir) as tmp:
        target = _target(cfg, meta)
        ckpt = iteration_dir(tmp, meta["iteration"])
        ckpt.mkdir(parents=True)
        total = sum(layers or 1 for layers, _ in target.tensors.values()) + len(target.objects)
        with progress_bar(total, what, progress) as bar:
            _write_tensors(read, source, meta, target, padded_vocab, ckpt, bar)
        get_default_save_common_strategy().save_common(target.common, ckpt)
        save_config(CheckpointingConfig("torch_dist", 1), str(ckpt))
        write_manifest(ckpt)
        (tmp / TRACKER).write_text(f"{meta['iteration']}\n")
        cfg.to_json(tmp / "config.json")
    return lines


def from_universal(
    univ_dir: str | Path,
    out_dir: str | Path | None,
    *,
    tensor_model_parallel_size: int | None = None,
    pipeline_model_parallel_size: int | None = None,
    use_distributed_optimizer: bool | None = None,
    dry_run: bool = False,
    progress: bool = True,
) -> list[str]:
    """Universal folder -> our checkpoint in the target layout (default: the universal folder's source layout)."""
    univ = Path(univ_dir)

    def open_source() -> tuple[dict[str, Any], Reader]:
        meta = read_meta(univ)
        return meta, _universal_reader(univ, meta)

    layout = (tensor_model_parallel_size, pipeline_model_parallel_size, use_distributed_optimizer)
    return _convert(univ, open_source, out_dir, layout, dry_run, progress, "from-universal")


def reshard(
    ckpt_dir: str | Path,
    out_dir: str | Path | None,
    iteration: int | None = None,
    *,
    tensor_model_parallel_size: int | None = None,
    pipeline_model_parallel_size: int | None = None,
    use_distributed_optimizer: bool | None = None,
    dry_run: bool = False,
    progress: bool = True,
) -> list[str]:
    """Our checkpoint -> our checkpoint in another layout, directly: each file's worth of tensors is read from the
    source checkpoint (one dist_checkpointing read) and written, with no universal folder in between."""
    ckpt = find_checkpoint(ckpt_dir, iteration)

    def open_source() -> tuple[dict[str, Any], Reader]:
        meta, sources, tensors = describe_checkpoint(ckpt)
        return meta, _checkpoint_reader(ckpt, meta, sources, tensors)

    layout = (tensor_model_parallel_size, pipeline_model_parallel_size, use_distributed_optimizer)
    return _convert(ckpt, open_source, out_dir, layout, dry_run, progress, "reshard")
