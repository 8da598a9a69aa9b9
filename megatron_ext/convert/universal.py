"""The universal checkpoint: one full tensor per parameter and optimizer state, free of any TP/PP/DP layout.

Laid out like DeepSpeed's universal checkpoints, so that importing one of theirs is a renaming of parameters:

    UNIV/universal.json                 format, iteration, config, train/data/scheduler state, parameter list
    UNIV/zero/<name>/fp32.pt            {"param": fp32 tensor}   (the fp32 main weights)
    UNIV/zero/<name>/exp_avg.pt         {"param": tensor}        (Adam first moment; absent without moments)
    UNIV/zero/<name>/exp_avg_sq.pt      {"param": tensor}        (Adam second moment)
    UNIV/zero/<name>/step.pt            tensor(step)

Names are megatron-core's per-layer names (`decoder.layers.3.self_attention.linear_qkv.weight`); in our
dist_checkpointing checkpoints the layers are stacked under one key (`decoder.layers.self_attention...`, layer on
axis 0), which `layer_name` / `stacked_key` translate. Vocabulary tensors keep megatron's padding rows (a multiple
of make_vocab_size_divisible_by x TP), because their logits take part in the softmax: a layout with the same
padding resumes exactly; another padding gets its extra rows as zeros or drops rows past the tokenizer's
`vocab_size` (DeepSpeed imports, which hold no padding, are zero-padded).

`to_universal` streams (one layer's tensors at a time); `load_into` fills a model and optimizer of any layout
(each rank reads its own slices, memory-mapped) and is what `--load UNIV` uses.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_ext.convert import (
    ConvertError,
    atomic_output_dir,
    batches_within,
    check_output_dir,
    find_checkpoint,
    progress_bar,
    read_common,
    read_tensors,
    saved_config,
    saved_tokenizer,
    tensor_metadata,
    world_of_one,
)
from megatron_ext.training import layout

FORMAT = "megatron_ext.universal/1"
META = "universal.json"
ZERO = "zero"
MOMENTS = ("exp_avg", "exp_avg_sq")
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
OPTIMIZER_PREFIX = "optimizer.state."
# The fp32 main weights are `optimizer.state.fp32_param.<key>` (Float16Optimizer) or `optimizer.state.param.<key>`
# (DistributedOptimizer); an fp32 run without the distributed optimizer keeps them in the model weights.
MAIN_STATES = ("fp32_param", "param")
_LAYER = re.compile(r"^(.*?\blayers\.)(\d+)\.(.*)$")


def is_universal(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def layer_name(key: str, layer: int | None) -> str:
    """Per-layer name of a stacked sharded key: `decoder.layers.X` + layer 3 -> `decoder.layers.3.X`."""
    if layer is None:
        return key
    head, sep, tail = key.partition("layers.")
    if not sep:
        raise ValueError(f"{key} is not a stacked layer key")
    return f"{head}layers.{layer}.{tail}"


def stacked_key(name: str) -> tuple[str, int | None]:
    """Inverse of layer_name."""
    m = _LAYER.match(name)
    return (f"{m[1]}{m[3]}", int(m[2])) if m else (name, None)


def _is_stacked(key: str) -> bool:
    return key.startswith("decoder.layers.")


def read_meta(path: str | Path) -> dict[str, Any]:
    meta_file = Path(path) / META
    if not meta_file.exists() and any((Path(path) / f).is_file() for f in (layout.TRACKER, layout.COMMON_STATE)):
        raise ConvertError(
            f"{path}: a regular checkpoint, not a universal one (no {META}); use `reshard` to change its layout, "
            "or `to-universal` to make a universal checkpoint of it"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{meta_file}: unreadable ({e})") from e
    if meta.get("format") != FORMAT:
        raise ConvertError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def state_file(root: Path, name: str, state: str) -> Path:
    return root / ZERO / name / f"{state}.pt"


def read_state(root: Path, name: str, state: str) -> Any:
    """One full tensor, memory-mapped: a rank that needs a slice only pages in that slice."""
    import torch

    f = state_file(root, name, state)
    try:
        saved = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise ConvertError(f"{f}: missing (the universal checkpoint is incomplete)") from None
    except Exception as e:  # zip/pickle errors of a truncated file carry long messages
        raise ConvertError(f"{f}: unreadable ({type(e).__name__}); the file is damaged") from e
    return saved["param"] if isinstance(saved, dict) else saved


def _save_tensor(path: Path, tensor: Any) -> None:
    """torch.save writes a view's whole storage: copy only views of larger tensors. No record CRC (as our
    checkpoints: `layout.without_record_crc`)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    own = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    with layout.without_record_crc():
        torch.save({"param": tensor if own else tensor.contiguous().clone()}, path)


# ---- our checkpoint -> universal ----------------------------------------------------------------------------


def common_step(optimizer_common: Any) -> int | None:
    """The optimizer step saved in the common state (`common_step`, or the param groups' `step`)."""
    if isinstance(optimizer_common, dict):
        state = optimizer_common.get("state")
        if isinstance(state, dict) and "common_step" in state:
            return int(state["common_step"])
        for group in optimizer_common.get("param_groups", []):
            if isinstance(group, dict) and group.get("step") is not None:
                return int(group["step"])
        for value in optimizer_common.values():
            found = common_step(value)
            if found is not None:
                return found
    return None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _vocab_size(common: dict[str, Any], config: dict[str, Any], tokenizer_model: str | None) -> int:
    if common.get("vocab_size"):
        return int(common["vocab_size"])
    data = config.get("data", {})
    return saved_tokenizer(data.get("tokenizer_type"), tokenizer_model or data.get("tokenizer_model")).vocab_size


Sources = dict[tuple[str, str], tuple[str, int | None]]


def describe_checkpoint(ckpt: Path, tokenizer_model: str | None = None) -> tuple[dict[str, Any], Sources, Any]:
    """What the universal form of one of our checkpoints holds: its universal.json (as a dict), where every
    (parameter name, state) is read from (checkpoint key, layer), and the checkpoint's tensor metadata. Runs in a
    world of one (dist_checkpointing asks for ranks)."""
    common = read_common(ckpt)
    config = saved_config(ckpt, common)
    vocab = _vocab_size(common, config, tokenizer_model)
    tensors = tensor_metadata(ckpt)
    params: dict[str, Any] = {}
    sources: Sources = {}
    for key in (k for k in tensors if not k.startswith(OPTIMIZER_PREFIX)):
        stacked = _is_stacked(key)
        main = next((m for m in (f"{OPTIMIZER_PREFIX}{s}.{key}" for s in MAIN_STATES) if m in tensors), key)
        moments = [m for m in MOMENTS if f"{OPTIMIZER_PREFIX}{m}.{key}" in tensors]
        for layer in range(tensors[key].global_shape[0]) if stacked else [None]:
            name = layer_name(key, layer)
            shape = list(tensors[key].global_shape[1:] if stacked else tensors[key].global_shape)
            params[name] = {"shape": shape, "dtype": "float32", "states": ["fp32", *moments]}
            sources[(name, "fp32")] = (main, layer)
            sources |= {(name, m): (f"{OPTIMIZER_PREFIX}{m}.{key}", layer) for m in moments}
    step = common_step(common.get("optimizer"))
    return _universal_meta(common, config, vocab, step, params, source=str(ckpt)), sources, tensors


def to_universal(
    ckpt_dir: str | Path,
    out_dir: str | Path | None,
    iteration: int | None = None,
    *,
    dry_run: bool = False,
    tokenizer_model: str | None = None,
    progress: bool = True,
) -> list[str]:
    """Writes the universal form of one of our checkpoints; returns one line per parameter (what --dry-run lists).

    Memory: tensors are read in groups no larger than the largest one (one layer of one parameter or state), so
    about twice the largest tensor is held at a time; small layers share a read (fewer, faster reads).
    """
    ckpt = find_checkpoint(ckpt_dir, iteration)
    if not dry_run:
        if out_dir is None:
            raise ConvertError("to-universal needs an output folder")
        check_output_dir(out_dir)
    with world_of_one():
        meta, sources, tensors = describe_checkpoint(ckpt, tokenizer_model)
        lines = []
        for name, entry in meta["params"].items():
            key, layer = stacked_key(name)
            where = f"{key}{'' if layer is None else f'[{layer}]'}"
            lines.append(f"{where} -> zero/{name}/{{{','.join(entry['states'])}}} {entry['shape']}")
        if dry_run:
            return lines
        assert out_dir is not None
        reads = [(name, state, *src) for (name, state), src in sources.items()]  # (name, state, key, layer)

        def nbytes(read: tuple) -> int:
            return 4 * math.prod(meta["params"][read[0]]["shape"])

        with atomic_output_dir(out_dir) as tmp, progress_bar(len(reads), "to-universal", progress) as bar:
            for batch in batches_within(reads, max(map(nbytes, reads)), size=nbytes):
                loaded = read_tensors(ckpt, [(src, layer) for _, _, src, layer in batch], tensors)
                for name, state, src, layer in batch:
                    _save_tensor(state_file(tmp, name, state), loaded.pop((src, layer)).float())
                    bar.update(1)
                del loaded
            if meta["optimizer_step"] is not None:
                import torch

                for name in meta["params"]:
                    torch.save(torch.tensor(float(meta["optimizer_step"])), state_file(tmp, name, "step"))
            (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    return lines


def _universal_meta(
    common: dict[str, Any],
    config: dict[str, Any],
    vocab: int,
    step: int | None,
    params: dict[str, Any],
    source: str,
) -> dict[str, Any]:
    layout = common.get("parallel_layout") or [1, 1]
    return {
        "format": FORMAT,
        "iteration": int(common.get("iteration", 0)),
        "source": source,
        "source_layout": {"pipeline_model_parallel_size": layout[0], "tensor_model_parallel_size": layout[1]},
        "vocab_size": vocab,
        "optimizer_step": step,
        "config": config,
        "train_state": _jsonable(common.get("train_state")),
        "data_state": _jsonable(common.get("data_state")),
        "scheduler": _jsonable(common.get("scheduler")),
        "params": params,
    }


# ---- universal -> a model and optimizer of any layout ---------------------------------------------------------


def target_shape(root: Path, meta: dict[str, Any], key: str, layer: int | None, padded_vocab: int) -> tuple[int, ...]:
    """The shape that a sharded key of ours (one layer of it, for a stacked key) has in a target layout whose
    vocabulary is padded to `padded_vocab` rows."""
    model_key, _ = _source(key)
    name = layer_name(model_key, layer)
    if name not in meta["params"]:
        raise ConvertError(f"{root}: no parameter {name} (the checkpoint holds another model)")
    shape = list(meta["params"][name]["shape"])
    if model_key in VOCAB_KEYS:
        shape[0] = padded_vocab
    return tuple(shape)


def _source(key: str) -> tuple[str, str]:
    """(parameter name, state file) a ShardedTensor key of ours reads from; the layer is added by the caller."""
    if key.startswith(OPTIMIZER_PREFIX):
        state, _, model_key = key[len(OPTIMIZER_PREFIX) :].partition(".")
        return model_key, "fp32" if state in MAIN_STATES else state
    return key, "fp32"


def state_of(root: Path, meta: dict[str, Any], key: str, layer: int | None) -> tuple[str, str]:
    """(parameter name, state) that a sharded key of ours (one layer of it, for a stacked key) is read from."""
    model_key, state = _source(key)
    name = layer_name(model_key, layer)
    if name not in meta["params"]:
        raise ConvertError(f"{root}: no parameter {name} (the checkpoint holds another model)")
    if state not in meta["params"][name]["states"]:
        raise ConvertError(f"{root}: {name} has no {state} (saved without optimizer moments: use --no-load-optim)")
    return name, state


def check_shape(root: Path, name: str, key: str, full: Any, expected: tuple[int, ...]) -> None:
    """The full tensor must have the target's shape; vocabulary tensors may differ in their padding rows."""
    if tuple(full.shape) != expected and not (_source(key)[0] in VOCAB_KEYS and full.shape[1:] == expected[1:]):
        raise ConvertError(f"{root}: {name} has shape {tuple(full.shape)}, the model expects {expected}")


def source_tensor(root: Path, meta: dict[str, Any], key: str, layer: int | None, expected: tuple[int, ...]) -> Any:
    """The full tensor (memory-mapped) of the universal folder that a sharded key of ours is read from."""
    name, state = state_of(root, meta, key, layer)
    full = read_state(root, name, state)
    check_shape(root, name, key, full, expected)
    return full


def _fill(root: Path, meta: dict[str, Any], sh: Any) -> Any:
    """Copies a ShardedTensor's region out of the full tensor (padding vocabulary rows with zeros) into the
    ShardedTensor's own data (the parameter, optimizer state or placeholder it stands for), as dist_checkpointing
    loads in place: a second copy of the whole model never exists, only one full tensor at a time."""
    import torch

    layers = sh.prepend_axis_num
    full = source_tensor(root, meta, sh.key, sh.global_offset[0] if layers else None, tuple(sh.global_shape[layers:]))
    offsets, local = sh.global_offset[layers:], tuple(sh.local_shape)
    src = tuple(slice(o, min(o + n, d)) for o, n, d in zip(offsets, local, full.shape))
    sizes = [max(0, s.stop - s.start) for s in src]
    with torch.no_grad():  # megatron-core 0.16 has no flattened ShardedTensors: data has the local shape
        if sizes != list(local):  # vocabulary padding rows beyond the saved ones are zero
            sh.data.zero_()
        if all(sizes):
            sh.data[tuple(slice(0, n) for n in sizes)] = full[src]
    return sh.data


def load_into(path: str | Path, sharded_state: dict[str, Any]) -> dict[str, Any]:
    """The state dict that dist_checkpointing.load would return for `sharded_state`, read from a universal
    checkpoint: every ShardedTensor (model weights, optimizer moments and main weights) is filled from the full
    tensors; other entries keep the values they have (the caller replaces the optimizer's step)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    root = Path(path)
    meta = read_meta(root)
    sharded, nonpersistent, factories = load_preprocess(sharded_state)
    sharded, plain = extract_sharded_base(sharded)

    def fill(x: Any) -> Any:
        if isinstance(x, ShardedTensor):
            return _fill(root, meta, x)
        if isinstance(x, ShardedObject) and x.key.endswith("_extra_state"):
            return None  # modules' extra state (Transformer Engine's FP8 metadata): layout-bound, restarted
        if isinstance(x, ShardedObject):
            raise ConvertError(f"{root}: universal checkpoints hold no {x.key} (a sharded object)")
        return x

    dict_list_map_inplace(fill, sharded)
    merge(plain, nonpersistent)
    merge(plain, sharded)
    return apply_factory_merges(plain, factories)


def set_optimizer_step(optimizer_state: Any, step: int) -> None:
    """Puts the saved step where each megatron-core optimizer reads it back (torch Adam's bias correction)."""
    import torch

    if not isinstance(optimizer_state, dict):
        return
    groups = optimizer_state.get("param_groups")
    if isinstance(groups, list) and isinstance(optimizer_state.get("state"), dict):
        optimizer_state["state"]["common_step"] = torch.tensor(float(step))
    elif isinstance(groups, list):  # DistributedOptimizer: the step lives in the param groups
        for group in groups:
            group["step"] = float(step)
    for value in optimizer_state.values():
        if isinstance(value, dict):
            set_optimizer_step(value, step)


# ---- universal -> universal renaming (imports) -------------------------------------------------------------


def write_renamed(
    out: str | Path,
    tensors: Iterator[tuple[str, str, Any]],
    total: int,
    *,
    config: dict[str, Any],
    vocab: int,
    step: int | None,
    iteration: int,
    source: str,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
) -> None:
    """Writes a universal folder from (our name, state, tensor) triples (e.g. a renamed DeepSpeed checkpoint)."""
    params: dict[str, Any] = {}
    with atomic_output_dir(out) as tmp, progress_bar(total, "universal", progress) as bar:
        for name, state, tensor in tensors:
            _save_tensor(state_file(tmp, name, state), tensor.float())
            entry = params.setdefault(name, {"shape": list(tensor.shape), "dtype": "float32", "states": []})
            entry["states"].append(state)
            bar.update(1)
        if step is not None:
            import torch

            for name in params:
                torch.save(torch.tensor(float(step)), state_file(tmp, name, "step"))
        for entry in params.values():  # fp32 first, as to_universal writes it
            entry["states"].sort(key=lambda s: (s != "fp32", s))
        common = {"iteration": iteration, **(extra or {})}
        meta = _universal_meta(common, config, vocab, step, params, source=source)
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
