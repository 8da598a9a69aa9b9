"""The universal checkpoint format and its reader: what `--load UNIV` uses to fill a model of any layout.

One full tensor per parameter and optimizer state, free of any TP/PP/DP layout, laid out like DeepSpeed's
universal checkpoints (see megatron_ext/convert/universal.py, which writes it, for the file layout). Names are
megatron-core's per-layer names; `layer_name` / `stacked_key` translate them to the stacked keys of our
dist_checkpointing checkpoints. Training reads through this module and never imports the converters
(imports run training -> convert).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from megatron_ext.cli import UserError
from megatron_ext.training import layout


class ConvertError(UserError, ValueError):
    """A checkpoint that cannot be read or converted, or an output that cannot be written; the message is one
    line. Raised by the universal reader here and by every converter (megatron_ext.convert)."""


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


def _fill(root: Path, meta: dict[str, Any], sh: Any, known_rows: int | None = None) -> Any:
    """Copies a ShardedTensor's region out of the full tensor (padding vocabulary rows with zeros) into the
    ShardedTensor's own data (the parameter, optimizer state or placeholder it stands for), as dist_checkpointing
    loads in place: a second copy of the whole model never exists, only one full tensor at a time. With
    `known_rows` (a resized vocabulary) only that many vocabulary rows are read; the others keep their values."""
    import torch

    layers = sh.prepend_axis_num
    full = source_tensor(root, meta, sh.key, sh.global_offset[0] if layers else None, tuple(sh.global_shape[layers:]))
    resizing = known_rows is not None and _source(sh.key)[0] in VOCAB_KEYS
    if resizing:
        full = full[:known_rows]
    offsets, local = sh.global_offset[layers:], tuple(sh.local_shape)
    src = tuple(slice(o, min(o + n, d)) for o, n, d in zip(offsets, local, full.shape))
    sizes = [max(0, s.stop - s.start) for s in src]
    with torch.no_grad():  # megatron-core 0.16 has no flattened ShardedTensors: data has the local shape
        if sizes != list(local) and not resizing:  # vocabulary padding rows beyond the saved ones are zero
            sh.data.zero_()
        if all(sizes):
            sh.data[tuple(slice(0, n) for n in sizes)] = full[src]
    return sh.data


def load_into(path: str | Path, sharded_state: dict[str, Any], known_rows: int | None = None) -> dict[str, Any]:
    """The state dict that dist_checkpointing.load would return for `sharded_state`, read from a universal
    checkpoint: every ShardedTensor (model weights, optimizer moments and main weights) is filled from the full
    tensors; other entries keep the values they have (the caller replaces the optimizer's step). `known_rows`:
    a resized vocabulary's rows to read (see `_fill`)."""
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
            return _fill(root, meta, x, known_rows)
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
