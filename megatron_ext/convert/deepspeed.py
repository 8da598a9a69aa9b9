"""DeepSpeed universal checkpoints (Megatron-DeepSpeed GPT, after `ds_to_universal`) -> our universal format.

Both formats hold one full tensor per parameter under `zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`, and
Megatron-DeepSpeed's GPT lays its tensors out as megatron-core does (QKV stacked per query group as [q heads, k,
v]; SwiGLU's `dense_h_to_4h` as [gate; up] once `ds_to_universal` has merged the TP slices), so the import is a
renaming of parameters:

    language_model.embedding.word_embeddings.weight        -> embedding.word_embeddings.weight
    language_model.encoder.layers.N.input_layernorm.*      -> decoder.layers.N.self_attention.linear_qkv.layer_norm_*
    ....self_attention.query_key_value.*                   -> ....self_attention.linear_qkv.*
    ....self_attention.dense.*                             -> ....self_attention.linear_proj.*
    ....post_attention_layernorm.*                         -> ....mlp.linear_fc1.layer_norm_*
    ....mlp.dense_h_to_4h.* / dense_4h_to_h.*              -> ....mlp.linear_fc1.* / linear_fc2.*
    language_model.encoder.final_layernorm.*               -> decoder.final_layernorm.*
    language_model.output_layer.weight                     -> output_layer.weight

Pipeline (`GPTModelPipe`) names, where the transformer layers are numbered modules (`5.self_attention...`), the
embedding is `tied_modules.embed.word_embeddings.weight` or `N.word_embeddings.weight`, the final norm `N.weight`
and the head `N.lm_head.weight`, are renumbered from 0. The model config comes from the Megatron-DeepSpeed `args`
saved in `mp_rank_00_model_states.pt`, through our schema (extra flags may complete or override it).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_ext.config import Config, ConfigError, parse_args
from megatron_ext.convert import ConvertError, check_output_dir
from megatron_ext.convert.universal import write_renamed
from megatron_ext.training.universal import ZERO, read_state

STATES = ("fp32", "exp_avg", "exp_avg_sq")
_LAYER_PARTS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "self_attention.query_key_value.weight": "self_attention.linear_qkv.weight",
    "self_attention.query_key_value.bias": "self_attention.linear_qkv.bias",
    "self_attention.dense.weight": "self_attention.linear_proj.weight",
    "self_attention.dense.bias": "self_attention.linear_proj.bias",
    "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "post_attention_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
    "mlp.dense_h_to_4h.weight": "mlp.linear_fc1.weight",
    "mlp.dense_h_to_4h.bias": "mlp.linear_fc1.bias",
    "mlp.dense_4h_to_h.weight": "mlp.linear_fc2.weight",
    "mlp.dense_4h_to_h.bias": "mlp.linear_fc2.bias",
}
# (our flag, Megatron-DeepSpeed arg) copied when the arg is set.
_VALUE_ARGS = (
    ("--ffn-hidden-size", "ffn_hidden_size"),
    ("--max-position-embeddings", "max_position_embeddings"),
    ("--tokenizer-type", "tokenizer_type"),
    ("--tokenizer-model", "tokenizer_model"),
    ("--make-vocab-size-divisible-by", "make_vocab_size_divisible_by"),
)
_LAYER = re.compile(r"^(?:language_model\.encoder\.layers\.|module\.)?(\d+)\.(.+)$")


def _rename(names: list[str]) -> dict[str, str]:
    """Megatron-DeepSpeed name -> ours, for every name (unknown names are a ConvertError)."""
    layer_ids = sorted({int(m[1]) for n in names if (m := _LAYER.match(n)) and m[2] in _LAYER_PARTS})
    number = {old: new for new, old in enumerate(layer_ids)}
    out = {}
    for name in names:
        m = _LAYER.match(name)
        if m and m[2] in _LAYER_PARTS:
            out[name] = f"decoder.layers.{number[int(m[1])]}.{_LAYER_PARTS[m[2]]}"
        elif name.endswith("word_embeddings.weight"):
            out[name] = "embedding.word_embeddings.weight"
        elif name.endswith("position_embeddings.weight"):
            out[name] = "embedding.position_embeddings.weight"
        elif name.endswith(("output_layer.weight", "lm_head.weight")):
            out[name] = "output_layer.weight"
        elif m := re.match(r"^(?:language_model\.encoder\.final_layernorm|\d+)\.(weight|bias)$", name):
            out[name] = f"decoder.final_layernorm.{m[1]}"
        else:
            raise ConvertError(f"{name}: not a Megatron-DeepSpeed GPT parameter this importer knows")
    if len(set(out.values())) != len(out):
        raise ConvertError("two DeepSpeed parameters map to one of ours (a tied embedding saved twice?)")
    return out


def _flags_from_args(a: argparse.Namespace) -> list[str]:
    """Our flags for the model that Megatron-DeepSpeed's args describe."""
    flags = [
        *("--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size)),
        *("--num-attention-heads", str(a.num_attention_heads), "--seq-length", str(a.seq_length)),
    ]
    for ours, theirs in _VALUE_ARGS:
        if getattr(a, theirs, None):
            flags += [ours, str(getattr(a, theirs))]
    kv = getattr(a, "num_key_value_heads", None)
    if kv and kv != a.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", str(kv)]
    if getattr(a, "swiglu", False):
        flags.append("--swiglu")
    if str(getattr(a, "normalization", "layernorm")).lower() == "rmsnorm":
        flags += ["--normalization", "RMSNorm"]
    if getattr(a, "use_rotary_position_embeddings", False) or getattr(a, "position_embedding_type", "") == "rope":
        flags += ["--position-embedding-type", "rope", "--rotary-base", str(int(getattr(a, "rope_theta", 10000)))]
    if getattr(a, "untie_embeddings_and_output_weights", False):
        flags.append("--untie-embeddings-and-output-weights")
    if not getattr(a, "add_bias_linear", True):
        flags.append("--disable-bias-linear")
    return flags


def _model_states(ds: Path) -> dict[str, Any]:
    import torch

    files = sorted(ds.glob("mp_rank_*_model_states.pt"))
    if not files:
        return {}
    try:
        return torch.load(files[0], map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConvertError(f"{files[0]}: unreadable ({type(e).__name__})") from e


def import_deepspeed(
    ds_dir: str | Path,
    out_dir: str | Path | None,
    extra_flags: list[str] | None = None,
    *,
    dry_run: bool = False,
    progress: bool = True,
) -> list[str]:
    """Writes our universal folder from a DeepSpeed universal checkpoint; returns the renaming, one line each."""
    ds = Path(ds_dir)
    zero = ds / ZERO
    if not zero.is_dir():
        raise ConvertError(f"{ds}: no {ZERO}/ folder (expected the output folder of DeepSpeed's ds_to_universal)")
    names = sorted(p.name for p in zero.iterdir() if (p / "fp32.pt").is_file())
    if not names:
        raise ConvertError(f"{zero}: no <parameter>/fp32.pt files")
    renamed = _rename(names)
    states = {n: [s for s in STATES if (zero / n / f"{s}.pt").is_file()] for n in names}
    lines = [f"{n} -> {renamed[n]} {{{','.join(states[n])}}}" for n in names]
    model_states = _model_states(ds)
    args = model_states.get("args")
    if args is None and not extra_flags:
        raise ConvertError(f"{ds}: no Megatron-DeepSpeed args in mp_rank_00_model_states.pt; give the model flags")
    try:
        cfg: Config = parse_args([*(_flags_from_args(args) if args is not None else []), *(extra_flags or [])])
    except ConfigError as e:
        raise ConvertError(f"the DeepSpeed run's model does not map to our config: {e}") from e
    except SystemExit as e:  # argparse already printed its one line
        raise ConvertError("bad model flags (see above)") from e
    if dry_run:
        return lines
    if out_dir is None:
        raise ConvertError("from-deepspeed needs an output folder")
    check_output_dir(out_dir)

    import torch

    from megatron_ext.data.tokenizers import build_tokenizer

    step_file = next((zero / n / "step.pt" for n in names if (zero / n / "step.pt").is_file()), None)
    step = int(torch.load(step_file, weights_only=False)) if step_file else None
    try:
        vocab = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model).vocab_size
    except (ValueError, OSError) as e:
        raise ConvertError(f"tokenizer {cfg.data.tokenizer_type}: {e}") from e
    iteration = int(model_states.get("iteration", 0) or 0)
    samples = int(getattr(args, "consumed_train_samples", 0) or 0)
    tokens = int(getattr(args, "consumed_train_tokens", 0) or samples * cfg.model.seq_length)
    train_state = {"iteration": iteration, "consumed_samples": samples, "consumed_tokens": tokens}

    def tensors() -> Iterator[tuple[str, str, Any]]:
        for n in names:
            for s in states[n]:
                yield renamed[n], s, read_state(ds, n, s)

    total = sum(len(s) for s in states.values())
    write_renamed(out_dir, tensors(), total, config=cfg.to_dict(), vocab=vocab, step=step, iteration=iteration,
                  source=str(ds.absolute()), extra={"train_state": train_state}, progress=progress)  # fmt: skip
    return lines
