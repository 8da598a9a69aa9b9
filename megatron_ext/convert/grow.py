"""A deeper checkpoint from one of ours (`tools/convert_checkpoint.py grow`): progressive growth applied to a
trained model.

Layer j of the target (`--target-layers T`) starts as source layer `layer_map(growth, U, T)[j]`
(megatron_ext/models/progressive.py: "stack" j mod U, "interpolate" floor(j U / T)), with its fp32 main weight and
Adam moments; U is the source's layer count, or for a `--model-variant progressive` checkpoint the unique layers of
its stage (its own growth mode then, and T = its --num-layers gives exactly its full-depth function). The result
is an ordinary GPT checkpoint of T layers (`--model-variant gpt`, config.json and the stored config say T): the
same iteration, schedule, data position and consumed counters (`reset_progress`: iteration 0, a fresh schedule
and data position; the weights and moments kept), written streaming by the reshard writer (convert/reshard.py:
one file's worth of tensors in memory at a time).

Copying the layers of a model whose layers all differ changes its function; `function_preserving` zeroes the
output projections (attention's linear_proj and the MLP's linear_fc2, weights and biases, with their moments) of
every copy after a layer's first, so each added layer adds nothing to its residual stream: the logits equal the
source's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_ext.convert import ConvertError, check_output_dir, find_checkpoint, world_of_one
from megatron_ext.convert.reshard import Reader, _checkpoint_reader, _target_config, _write_checkpoint
from megatron_ext.convert.universal import describe_checkpoint
from megatron_ext.training.universal import layer_name, stacked_key, state_of

OUTPUT_PROJECTIONS = ("self_attention.linear_proj.", "mlp.linear_fc2.")
"""What `function_preserving` zeroes in an added copy: the layer's two writes to the residual stream."""


def _plan(
    meta: dict[str, Any], target_layers: int, growth: str | None, function_preserving: bool
) -> tuple[list[int], str]:
    """(source layer of each target layer, the growth used), or ConvertError naming the flag."""
    from megatron_ext.models.progressive import layer_map

    config = meta["config"]
    variant = config.get("variant", {}).get("model_variant", "gpt")
    layers = int(config["model"]["num_layers"])
    unique = layers
    if variant == "progressive":
        own = config.get("variant_options", {}).get("growth", "interpolate")
        if growth not in (None, own):
            raise ConvertError(f"--growth {growth}: the checkpoint is a --model-variant progressive run, which maps "
                               f"its layers by --growth {own}")  # fmt: skip
        if function_preserving:
            raise ConvertError("--function-preserving: a --model-variant progressive checkpoint keeps its full-depth "
                               f"function when grown to its --num-layers {layers} without it")  # fmt: skip
        growth, unique = own, int((meta.get("recipe_state") or {}).get("unique_layers", layers))
    elif variant != "gpt":
        raise ConvertError(f"the checkpoint is a --model-variant {variant} run: grow reads gpt and progressive ones")
    growth = growth or "stack"
    if target_layers < unique or target_layers % unique:
        raise ConvertError(f"--target-layers {target_layers} must be a multiple of the checkpoint's {unique} "
                           f"{'unique ' if unique != layers else ''}layers")  # fmt: skip
    return layer_map(growth, unique, target_layers), growth


def _grown_meta(
    meta: dict[str, Any], sources: Any, src_of: list[int], function_preserving: bool, reset_progress: bool
) -> tuple[dict[str, Any], Any, set[str]]:
    """The target's universal description (its layers' parameters), where each of its (name, state) is read, and
    the names `function_preserving` zeroes."""
    params: dict[str, Any] = {}
    grown_sources: dict[tuple[str, str], Any] = {}
    zeroed: set[str] = set()
    for name, info in meta["params"].items():
        key, layer = stacked_key(name)
        if layer is None:
            params[name] = info
            grown_sources |= {(name, s): sources[(name, s)] for s in info["states"]}
            continue
        if layer != 0:
            continue  # every layer has the same parameters: layer 0's names stand for all
        for j, src in enumerate(src_of):
            target, source = layer_name(key, j), layer_name(key, src)
            params[target] = meta["params"][source]
            grown_sources |= {(target, s): sources[(source, s)] for s in meta["params"][source]["states"]}
            added = src_of.index(src) != j
            if function_preserving and added and any(p in key for p in OUTPUT_PROJECTIONS):
                zeroed.add(target)
    config = {**meta["config"], "variant": {"model_variant": "gpt"}, "variant_options": {}}
    config["model"] = {**config["model"], "num_layers": len(src_of)}
    grown = {**meta, "params": params, "config": config, "recipe_state": None}
    if reset_progress:
        grown |= {"iteration": 0, "train_state": None, "data_state": None, "scheduler": None}
    return grown, grown_sources, zeroed


def _zeroing_reader(read: Reader, root: Path, meta: dict[str, Any], zeroed: set[str]) -> Reader:
    """`read`, with the tensors (weights and moments) of the `zeroed` parameters as zeros."""

    def zeroing(wanted: list[tuple[str, int | None, tuple[int, ...]]]) -> list[Any]:
        import torch

        tensors = read(wanted)
        names = [state_of(root, meta, key, layer)[0] for key, layer, _ in wanted]
        return [torch.zeros_like(t) if name in zeroed else t for t, name in zip(tensors, names, strict=True)]

    return zeroing


def grow(
    ckpt_dir: str | Path,
    out_dir: str | Path | None,
    target_layers: int,
    *,
    growth: str | None = None,
    function_preserving: bool = False,
    reset_progress: bool = False,
    iteration: int | None = None,
    dry_run: bool = False,
    progress: bool = True,
) -> list[str]:
    """Writes the grown checkpoint (see the module's doc); returns what it did, in lines (what --dry-run prints)."""
    ckpt = find_checkpoint(ckpt_dir, iteration)
    if not dry_run and out_dir is not None:
        check_output_dir(out_dir)
    with world_of_one():
        meta, sources, tensors = describe_checkpoint(ckpt)
        src_of, used = _plan(meta, target_layers, growth, function_preserving)
        grown, grown_sources, zeroed = _grown_meta(meta, sources, src_of, function_preserving, reset_progress)
        read = _zeroing_reader(_checkpoint_reader(ckpt, grown, grown_sources, tensors), ckpt, grown, zeroed)
        lines = _write_checkpoint(ckpt, grown, read, out_dir, _target_config(grown, None, None, None), dry_run,
                                  progress, "grow")  # fmt: skip
    progressive = meta["config"].get("variant", {}).get("model_variant") == "progressive"
    if function_preserving:
        kept = "function-preserving: the added copies' output projections are zero, the logits equal the source's"
    elif progressive:
        kept = "the progressive run's own map (its full-depth function at its --num-layers)"
    else:
        kept = "not function-preserving: the copies change the model's function (--function-preserving keeps it)"
    lines.append(
        f"grew {meta['config']['model']['num_layers']} -> {target_layers} layers by {used}: target layer j <- "
        f"source layer {','.join(map(str, src_of))}; {kept}; "
        + ("progress reset to iteration 0" if reset_progress else f"iteration {meta['iteration']} kept")
    )
    return lines
