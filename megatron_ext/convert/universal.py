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
from megatron_ext.training.universal import (  # the format and its reader, shared with training's --load
    FORMAT,
    MAIN_STATES,
    META,
    MOMENTS,
    OPTIMIZER_PREFIX,
    layer_name,
    stacked_key,
    state_file,
)
from megatron_ext.training.universal import load_into as load_into  # re-exported: the converters' API
from megatron_ext.training.universal import read_meta as read_meta


def _is_stacked(key: str) -> bool:
    return key.startswith("decoder.layers.")


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
        "recipe_state": _jsonable(common.get("recipe_state")),  # the model variant's own (models/recipe.py)
        "scheduler": _jsonable(common.get("scheduler")),
        "params": params,
    }


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
