"""Our checkpoints <-> Hugging Face Llama folders (config.json + model.safetensors + tokenizer files).

Only Llama-like models map one to one (RMSNorm, SwiGLU, RoPE over whole heads, no biases; any GQA); anything else
is refused in one line naming the option, before any slow import. The layouts differ in two places:

* QKV: megatron-core stacks per query group g the rows [q heads of g, k of g, v of g]; Llama has separate
  q/k/v projections (heads in order). Both rotate with rotate_half (non-interleaved) RoPE, so no row permutation
  inside a head is needed; the tests check this by comparing logits with transformers.
* SwiGLU fc1 is [gate; up] stacked on the output axis; Llama has gate_proj and up_proj.

Vocabulary: megatron pads the embedding to a multiple of make_vocab_size_divisible_by x TP; the export cuts it to
the tokenizer's real size (ids past it are never produced, and transformers then sees `len(tokenizer)` rows, so
its logits equal ours[..., :vocab_size]); the import pads again with zero rows.

Export streams: one layer's weights are read at a time (dist_checkpointing loads any layout, TP/PP included, since
keys are global) and written straight into model.safetensors, whose header is known from the checkpoint's metadata.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import struct
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_ext.config import PRECISIONS, Config, ConfigError, ModelConfig
from megatron_ext.convert import (
    ConvertError,
    atomic_output_dir,
    check_output_dir,
    find_checkpoint,
    progress_bar,
    read_common,
    read_tensors,
    saved_config,
    saved_tokenizer,
    world_of_one,
)
from megatron_ext.data.tokenizers import HF_TOKENIZER_FILES
from megatron_ext.platform import DTYPES

EMB = "embedding.word_embeddings.weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
QKV_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC1_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
# Specs with separate norm modules (not fused into the next linear) save the norms under these keys instead.
NORM_ALIASES = {QKV_NORM: "decoder.layers.input_layernorm.weight", FC1_NORM: "decoder.layers.pre_mlp_layernorm.weight"}

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_ST_FROM_NAME = {v: k for k, v in _ST_DTYPES.items()}
TOKENIZER_NOTE = "megatron_ext_tokenizer.json"  # says which of our tokenizers the folder's files stand for
_BYTE_NOTE = (
    "Byte tokenizer (megatron_ext ByteTokenizer): ids 0-255 are the UTF-8 bytes of the text, 256 ends a document "
    "(eos), 257 pads. There is no tokenizer file: encode with list(text.encode('utf-8'))."
)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Mapped:
    """One line of a conversion: where a target tensor comes from (for --dry-run and the streaming writer)."""

    source: str
    source_shape: Shape
    target: str
    target_shape: Shape

    def __str__(self) -> str:
        return f"{self.source} {list(self.source_shape)} -> {self.target} {list(self.target_shape)}"


@dataclass(frozen=True)
class _Entry:
    """A target tensor computed by `take` from one source tensor (one layer of it when `layer` is set)."""

    source: str
    layer: int | None
    source_shape: Shape
    target: str
    target_shape: Shape
    take: Callable[[torch.Tensor], torch.Tensor]

    def mapped(self) -> Mapped:
        where = self.source if self.layer is None else f"{self.source}[{self.layer}]"
        return Mapped(where, self.source_shape, self.target, self.target_shape)


# ---- what is representable ----------------------------------------------------------------------------------


def llama_blockers(m: ModelConfig) -> list[str]:
    """Options of our model that a Hugging Face Llama cannot express (empty when it maps exactly)."""
    out = []
    if m.normalization != "RMSNorm":
        out.append(f"--normalization {m.normalization} (Llama needs RMSNorm)")
    if not m.swiglu:
        out.append("a GELU MLP (Llama needs --swiglu)")
    if m.position_embedding_type != "rope":
        out.append(f"--position-embedding-type {m.position_embedding_type} (Llama needs rope)")
    elif m.rotary_percent != 1.0:
        out.append(f"--rotary-percent {m.rotary_percent} (Llama rotates whole heads: 1.0)")
    elif m.rotary_interleaved:
        out.append("--rotary-interleaved (Llama rotates the two halves of each head)")
    if not m.disable_bias_linear:
        out.append("linear biases (Llama needs --disable-bias-linear)")
    return out


def _hf_blockers(c: dict[str, Any]) -> list[str]:
    """Fields of a Hugging Face config that our GPT cannot express."""
    out = []
    if c.get("model_type") != "llama":
        out.append(f"model_type {c.get('model_type')!r} (only llama is supported)")
    if c.get("hidden_act", "silu") != "silu":
        out.append(f"hidden_act {c.get('hidden_act')!r} (needs silu)")
    for name in ("attention_bias", "mlp_bias"):
        if c.get(name):
            out.append(f"{name}=true (our Llama has no biases)")
    rope = c.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if c.get("rope_scaling") or kind != "default":
        out.append(f"rope scaling {c.get('rope_scaling') or kind!r} (only default RoPE)")
    theta = _rope_theta(c)
    if theta != int(theta):
        out.append(f"rope_theta {theta} (--rotary-base is an integer)")
    heads, groups = c.get("num_attention_heads", 0), c.get("num_key_value_heads") or c.get("num_attention_heads", 0)
    if not heads or heads % groups:
        out.append(f"num_attention_heads {heads} not divisible by num_key_value_heads {groups}")
    return out


def _rope_theta(c: dict[str, Any]) -> float:
    rope = c.get("rope_parameters") or {}
    return float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))


def _refuse(blockers: list[str], what: str) -> None:
    if blockers:
        raise ConvertError(f"{what} is not representable as a Hugging Face Llama: {'; '.join(blockers)}")


# ---- layout maps ------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t[:n]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _qkv_part(t: torch.Tensor, groups: int, per_group: int, dim: int, part: int) -> torch.Tensor:
    """q (part 0), k (1) or v (2) rows of one layer's megatron QKV [groups x (per_group + 2) x dim, hidden]."""
    g = t.view(groups, per_group + 2, dim, t.size(-1))
    sel = g[:, :per_group] if part == 0 else g[:, per_group + part - 1 : per_group + part]
    return sel.reshape(-1, t.size(-1))


def _half(t: torch.Tensor, i: int) -> torch.Tensor:
    return t.chunk(2, dim=0)[i]


def _heads(m: ModelConfig) -> tuple[int, int, int]:
    """(query groups, query heads per group, head dim)."""
    groups = m.num_query_groups if m.group_query_attention and m.num_query_groups else m.num_attention_heads
    dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    return groups, m.num_attention_heads // groups, dim


def _export_plan(m: ModelConfig, shapes: dict[str, Shape], rows: int, tied: bool) -> list[_Entry]:
    """Every Llama tensor in file order, each from one source (layer); shapes are checked against the config."""
    groups, per_group, dim = _heads(m)
    h, f, layers = m.hidden_size, m.ffn_hidden_size, m.num_layers
    expected = {
        EMB: (shapes.get(EMB, (0,))[0], h),
        QKV: (layers, groups * (per_group + 2) * dim, h),
        QKV_NORM: (layers, h),
        PROJ: (layers, h, m.num_attention_heads * dim),
        FC1: (layers, 2 * f, h),
        FC1_NORM: (layers, h),
        FC2: (layers, h, f),
        FINAL_NORM: (h,),
    }
    if not tied:
        expected[OUTPUT] = expected[EMB]
    for key, shape in expected.items():
        if key not in shapes:
            raise ConvertError(f"the checkpoint has no {key} (found {', '.join(sorted(shapes)) or 'no weights'})")
        if tuple(shapes[key]) != shape:
            raise ConvertError(f"{key}: shape {list(shapes[key])} in the checkpoint, {list(shape)} from its config")
    padded = shapes[EMB][0]
    if rows > padded:
        raise ConvertError(f"the tokenizer has {rows} ids but the checkpoint's embedding only {padded} rows")

    def entry(src: str, layer: int | None, target: str, tshape: Shape, take: Callable = _same) -> _Entry:
        sshape = tuple(shapes[src][1:] if layer is not None else shapes[src])
        return _Entry(src, layer, sshape, target, tshape, take)

    q, kv = m.num_attention_heads * dim, groups * dim
    plan = [entry(EMB, None, "model.embed_tokens.weight", (rows, h), functools.partial(_rows, n=rows))]
    for i in range(layers):
        p = f"model.layers.{i}."
        qkv = functools.partial(_qkv_part, groups=groups, per_group=per_group, dim=dim)
        plan += [
            entry(QKV_NORM, i, p + "input_layernorm.weight", (h,)),
            entry(QKV, i, p + "self_attn.q_proj.weight", (q, h), functools.partial(qkv, part=0)),
            entry(QKV, i, p + "self_attn.k_proj.weight", (kv, h), functools.partial(qkv, part=1)),
            entry(QKV, i, p + "self_attn.v_proj.weight", (kv, h), functools.partial(qkv, part=2)),
            entry(PROJ, i, p + "self_attn.o_proj.weight", (h, q)),
            entry(FC1_NORM, i, p + "post_attention_layernorm.weight", (h,)),
            entry(FC1, i, p + "mlp.gate_proj.weight", (f, h), functools.partial(_half, i=0)),
            entry(FC1, i, p + "mlp.up_proj.weight", (f, h), functools.partial(_half, i=1)),
            entry(FC2, i, p + "mlp.down_proj.weight", (h, f)),
        ]
    plan.append(entry(FINAL_NORM, None, "model.norm.weight", (h,)))
    if not tied:
        plan.append(entry(OUTPUT, None, "lm_head.weight", (rows, h), functools.partial(_rows, n=rows)))
    return plan


def hf_config(cfg: Config, vocab_size: int, tokenizer: Any, dtype: str) -> dict[str, Any]:
    """LlamaConfig fields for our model; rope_theta is written both ways (transformers 4.x and 5.x read either)."""
    m = cfg.model
    groups, _, dim = _heads(m)
    ids = _special_ids(tokenizer, vocab_size)
    theta = float(m.rotary_base)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": groups,
        "head_dim": dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_method_std,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        **ids,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def _special_ids(tokenizer: Any, vocab_size: int) -> dict[str, int | None]:
    """bos/eos/pad for config.json: eos is our end-of-document id; bos only where the tokenizer defines one."""
    bos = None
    inner = getattr(tokenizer, "_tok", None) or getattr(tokenizer, "_sp", None)
    if inner is not None:
        bos = getattr(inner, "bos_token_id", None)
        if bos is None and callable(getattr(inner, "bos_id", None)):
            bos = inner.bos_id()
    bos = bos if bos is not None and 0 <= bos < vocab_size else None
    pad = tokenizer.pad if 0 <= tokenizer.pad < vocab_size else None
    return {"bos_token_id": bos, "eos_token_id": tokenizer.eod, "pad_token_id": pad}


# ---- safetensors, streamed --------------------------------------------------------------------------------


def _safetensors_header(items: list[tuple[str, Shape]], dtype: torch.dtype) -> bytes:
    """The header for tensors written back to back in this order (8-byte aligned, as safetensors writes it)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in items:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsFolder:
    """Tensors of a folder's *.safetensors files (sharded or not), read one at a time without the safetensors
    package (an optional dependency)."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ConvertError(f"{folder}: no *.safetensors files")
        self._where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for path in files:
            if not path.is_file():
                raise ConvertError(f"{path}: named by the index but missing")
            with path.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (path, 8 + n, info)

    def shapes(self) -> dict[str, Shape]:
        return {name: tuple(info["shape"]) for name, (_, _, info) in self._where.items()}

    def get(self, name: str) -> torch.Tensor:
        path, base, info = self._where[name]
        start, end = info["data_offsets"]
        with path.open("rb") as fh:
            fh.seek(base + start)
            buf = bytearray(fh.read(end - start))
        dtype = _ST_FROM_NAME.get(info["dtype"])
        if dtype is None:
            raise ConvertError(f"{path.name}: {name} has dtype {info['dtype']}, expected F32, BF16 or F16")
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"]) if buf else torch.empty(info["shape"])


# ---- export -----------------------------------------------------------------------------------------------


def _load_config(saved: dict[str, Any]) -> Config:
    try:
        return Config.from_dict(saved)
    except ConfigError as e:
        raise ConvertError(f"the checkpoint's config does not load: {e}") from e


def _stream(ckpt: Path, plan: list[_Entry], meta: dict[str, Any], key_of: dict[str, str]) -> Iterator[torch.Tensor]:
    """Target tensors in plan order, reading one layer's sources at a time."""
    i = 0
    while i < len(plan):
        j = i
        while j < len(plan) and plan[j].layer == plan[i].layer:
            j += 1
        wanted = list(dict.fromkeys((key_of[e.source], e.layer) for e in plan[i:j]))
        sources = read_tensors(ckpt, wanted, meta)
        for e in plan[i:j]:
            yield e.take(sources[(key_of[e.source], e.layer)])
        del sources
        i = j


def _write_tokenizer(cfg: Config, tokenizer: Any, model_path: str | None, out: Path) -> None:
    """Tokenizer files transformers can load (HF / SentencePiece), plus a note naming our tokenizer type."""
    kind = cfg.data.tokenizer_type
    note: dict[str, Any] = {"tokenizer_type": kind, "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}
    if kind == "ByteTokenizer":
        note |= {"pad": tokenizer.pad, "note": _BYTE_NOTE}
    elif kind == "HuggingFaceTokenizer":
        src = Path(model_path or "")
        files = [src / f for f in HF_TOKENIZER_FILES if (src / f).is_file()] if src.is_dir() else [src]
        for f in files:
            shutil.copyfile(f, out / ("tokenizer.json" if not src.is_dir() else f.name))
        if not (out / "tokenizer_config.json").is_file():  # a bare tokenizer.json does not say which id is eos
            eos = tokenizer._tok.convert_ids_to_tokens(tokenizer.eod) if tokenizer.eod < len(tokenizer._tok) else None
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}
            (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    else:
        # SentencePiece: LlamaTokenizer converts the .model; we never add bos/eos when tokenizing, and the
        # dummy prefix keeps the first piece as SentencePiece has it. (transformers does not repeat
        # SentencePiece's whitespace normalisation: runs of spaces can tokenize differently.)
        shutil.copyfile(Path(model_path or ""), out / "tokenizer.model")
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False}
        config["add_prefix_space"] = True
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / TOKENIZER_NOTE).write_text(json.dumps(note, indent=2) + "\n")


def export_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path | None,
    iteration: int | None = None,
    dtype: str = "float32",
    *,
    dry_run: bool = False,
    keep_padded_vocab: bool = False,
    tokenizer_model: str | None = None,
    progress: bool = True,
) -> list[Mapped]:
    """Writes a LlamaForCausalLM folder from our checkpoint; returns the tensor mapping (all that --dry-run does).

    The vocabulary is cut to the tokenizer's size unless `keep_padded_vocab`. Memory: one layer's weights (plus
    the embedding / output layer when they are read).
    """
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r} must be one of {', '.join(DTYPES)}")
    ckpt = find_checkpoint(ckpt_dir, iteration)
    cfg = _load_config(saved_config(ckpt, read_common(ckpt)))
    _refuse(llama_blockers(cfg.model), f"{ckpt}")
    model_path = tokenizer_model or cfg.data.tokenizer_model
    tokenizer = saved_tokenizer(cfg.data.tokenizer_type, model_path)
    if not dry_run:
        if out_dir is None:
            raise ConvertError("the export needs an output folder")
        check_output_dir(out_dir)

    from megatron.core import dist_checkpointing

    with world_of_one():
        meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
        key_of = {k: k for k in (EMB, QKV, PROJ, FC1, FC2, FINAL_NORM, OUTPUT)}
        for ours, alias in NORM_ALIASES.items():
            key_of[ours] = alias if ours not in meta and alias in meta else ours
        shapes = {ours: tuple(meta[key].global_shape) for ours, key in key_of.items() if key in meta}
        tied = not cfg.model.untie_embeddings_and_output_weights
        rows = shapes.get(EMB, (0,))[0] if keep_padded_vocab else tokenizer.vocab_size
        plan = _export_plan(cfg.model, shapes, rows, tied)
        if dry_run:
            return [e.mapped() for e in plan]
        target = DTYPES[dtype]
        assert out_dir is not None
        with atomic_output_dir(out_dir) as tmp:
            config = hf_config(cfg, rows, tokenizer, dtype)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            _write_tokenizer(cfg, tokenizer, model_path, tmp)
            if sys.byteorder != "little":
                raise ConvertError("safetensors is little-endian; export on a little-endian machine")
            with (tmp / "model.safetensors").open("wb") as fh, progress_bar(len(plan), "to-hf", progress) as bar:
                fh.write(_safetensors_header([(e.target, e.target_shape) for e in plan], target))
                for e, t in zip(plan, _stream(ckpt, plan, meta, key_of)):
                    assert tuple(t.shape) == e.target_shape, (e.target, t.shape)
                    fh.write(t.to(target).contiguous().reshape(-1).view(torch.uint8).numpy().data)
                    bar.update(1)
    return [e.mapped() for e in plan]


# ---- import -----------------------------------------------------------------------------------------------


def _hf_tokenizer_source(hf: Path, kind: str | None, model: str | None) -> tuple[str, Path | None]:
    """(our tokenizer type, its file/folder) for a Hugging Face folder: our note, else the files found there."""
    note = hf / TOKENIZER_NOTE
    if kind is None and note.is_file():
        kind = json.loads(note.read_text()).get("tokenizer_type")
    if kind is None:
        if (hf / "tokenizer.json").is_file() or (hf / "tokenizer_config.json").is_file():
            kind = "HuggingFaceTokenizer"
        elif (hf / "tokenizer.model").is_file():
            kind = "SentencePieceTokenizer"
        else:
            raise ConvertError(f"{hf}: no tokenizer files; pass --tokenizer-type (and --tokenizer-model)")
    if kind == "ByteTokenizer":
        return kind, None
    if model is not None:
        return kind, Path(model)
    return kind, hf if kind == "HuggingFaceTokenizer" else hf / "tokenizer.model"


def _vocab_multiple(tokens: int, rows: int, preferred: int) -> int:
    """make_vocab_size_divisible_by that pads `tokens` to at least `rows` (the checkpoint's embedding rows):
    `preferred` when enough, else the smallest divisor of `rows` that pads `tokens` to exactly `rows`."""
    if -(-tokens // preferred) * preferred >= rows:
        return preferred
    return next(m for m in range(rows - tokens + 1, rows + 1) if rows % m == 0)


def _import_config(c: dict[str, Any], kind: str, tok_path: str | None, rows: int, tokens: int, **over: Any) -> Config:
    heads = c["num_attention_heads"]
    groups = c.get("num_key_value_heads") or heads
    dim = c.get("head_dim") or c["hidden_size"] // heads
    maxpos = int(c.get("max_position_embeddings", 2048))
    model = {
        "num_layers": c["num_hidden_layers"],
        "hidden_size": c["hidden_size"],
        "num_attention_heads": heads,
        "group_query_attention": groups != heads,
        "num_query_groups": groups if groups != heads else None,
        "ffn_hidden_size": c["intermediate_size"],
        "kv_channels": dim if dim * heads != c["hidden_size"] else None,
        "seq_length": over.get("seq_length") or maxpos,
        "max_position_embeddings": maxpos,
        "swiglu": True,
        "normalization": "RMSNorm",
        "norm_epsilon": float(c.get("rms_norm_eps", 1e-6)),
        "position_embedding_type": "rope",
        "rotary_base": int(_rope_theta(c)),
        "untie_embeddings_and_output_weights": not c.get("tie_word_embeddings", False),
        "disable_bias_linear": True,
        "hidden_dropout": 0.0,
        "attention_dropout": float(c.get("attention_dropout", 0.0)),
        "init_method_std": float(c.get("initializer_range", 0.02)),
        "make_vocab_size_divisible_by": _vocab_multiple(tokens, rows, over.get("make_vocab_size_divisible_by") or 128),
    }
    dtype = over.get("dtype", "float32")
    precision = {name: PRECISIONS[name] == dtype for name in ("bf16", "fp16")}
    data = {"tokenizer_type": kind, "tokenizer_model": tok_path}
    try:
        return Config.from_dict({"model": model, "precision": precision, "data": data})
    except ConfigError as e:
        raise ConvertError(f"the Hugging Face config maps to an invalid run config: {e}") from e


_ImportStep = tuple[str, list[str], Callable[[list[torch.Tensor]], Any]]
"""A target key, the Hugging Face names it is made of, and how."""


def _import_plan(m: ModelConfig, padded: int) -> list[_ImportStep]:
    """(megatron key, Llama tensor names, how they combine into the full [layers, ...] tensor) per key."""
    groups, per_group, dim = _heads(m)
    layers = range(m.num_layers)
    tied = not m.untie_embeddings_and_output_weights

    def names(suffix: str) -> list[str]:
        return [f"model.layers.{i}.{suffix}" for i in layers]

    def pad(ts: list[torch.Tensor]) -> torch.Tensor:
        t = ts[0]
        return torch.cat([t, t.new_zeros(padded - t.size(0), t.size(1))]) if t.size(0) < padded else t

    def stack(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(ts)

    def qkv(ts: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for q, k, v in zip(ts[0::3], ts[1::3], ts[2::3]):
            h = q.size(-1)
            parts = [q.view(groups, per_group, dim, h), k.view(groups, 1, dim, h), v.view(groups, 1, dim, h)]
            out.append(torch.cat(parts, dim=1).reshape(-1, h))
        return torch.stack(out)

    def fc1(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.cat([g, u]) for g, u in zip(ts[0::2], ts[1::2])])

    qkv_names = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in layers for p in "qkv"]
    fc1_names = [f"model.layers.{i}.mlp.{p}_proj.weight" for i in layers for p in ("gate", "up")]
    plan: list[_ImportStep] = [
        (EMB, ["model.embed_tokens.weight"], pad),
        (QKV_NORM, names("input_layernorm.weight"), stack),
        (QKV, qkv_names, qkv),
        (PROJ, names("self_attn.o_proj.weight"), stack),
        (FC1_NORM, names("post_attention_layernorm.weight"), stack),
        (FC1, fc1_names, fc1),
        (FC2, names("mlp.down_proj.weight"), stack),
        (FINAL_NORM, ["model.norm.weight"], lambda ts: ts[0]),
    ]
    if not tied:
        plan.append((OUTPUT, ["lm_head.weight"], pad))
    return plan


def _copy_tokenizer(kind: str, src: Path | None, out: Path) -> None:
    if src is None:
        return
    out.mkdir()
    if kind == "HuggingFaceTokenizer":
        files = [src / f for f in HF_TOKENIZER_FILES if (src / f).is_file()] if src.is_dir() else [src]
        for f in files:
            shutil.copyfile(f, out / f.name)
    else:
        shutil.copyfile(src, out / "tokenizer.model")


def import_hf(
    hf_dir: str | Path,
    out_ckpt_dir: str | Path | None,
    *,
    dtype: str = "float32",
    tokenizer_type: str | None = None,
    tokenizer_model: str | None = None,
    seq_length: int | None = None,
    make_vocab_size_divisible_by: int | None = None,
    dry_run: bool = False,
    progress: bool = True,
) -> list[Mapped]:
    """Writes a weights-only checkpoint (iter_0000000 + tracker, "config" in the common state, tokenizer files
    under tokenizer/) from a Hugging Face Llama folder; returns the mapping. Memory: about twice the weights."""
    hf = Path(hf_dir)
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r} must be one of {', '.join(DTYPES)}")
    if not (hf / "config.json").is_file():
        raise ConvertError(f"{hf}: no config.json (expected a Hugging Face model folder)")
    c = json.loads((hf / "config.json").read_text())
    _refuse(_hf_blockers(c), str(hf))
    kind, tok_src = _hf_tokenizer_source(hf, tokenizer_type, tokenizer_model)
    tokens = saved_tokenizer(kind, str(tok_src) if tok_src else None).vocab_size
    tensors = SafetensorsFolder(hf)
    shapes = tensors.shapes()
    rows = shapes.get("model.embed_tokens.weight", (0,))[0]
    if tokens > rows:
        raise ConvertError(f"the tokenizer has {tokens} ids but the model's embedding only {rows} rows")
    if dry_run:
        out = Path(out_ckpt_dir or "CKPT_DIR").absolute()
    elif out_ckpt_dir is None:
        raise ConvertError("the import needs an output folder")
    else:
        out = check_output_dir(out_ckpt_dir).absolute()
    if tok_src is None:
        final_tok = None
    elif kind == "HuggingFaceTokenizer":
        final_tok = str(out / "tokenizer" / (tok_src.name if tok_src.is_file() else ""))
    else:
        final_tok = str(out / "tokenizer" / "tokenizer.model")
    over = {"seq_length": seq_length, "make_vocab_size_divisible_by": make_vocab_size_divisible_by, "dtype": dtype}
    cfg = _import_config(c, kind, final_tok, rows, tokens, **over)

    from megatron_ext.data.tokenizers import padded_vocab_size

    padded = padded_vocab_size(tokens, cfg.model.make_vocab_size_divisible_by, 1)
    plan = _import_plan(cfg.model, padded)
    mapped = []
    for key, sources, combine in plan:  # shapes first, on the meta device: mismatches fail before any reading
        missing = [n for n in sources if n not in shapes]
        if missing:
            raise ConvertError(f"{hf}: no tensor {missing[0]} (needed for {key})")
        try:
            shape = tuple(combine([torch.empty(shapes[n], device="meta") for n in sources]).shape)
        except RuntimeError as e:
            shown = ", ".join(f"{n} {list(shapes[n])}" for n in sources[:3])
            raise ConvertError(f"{hf}: {shown} do not fit the config's {key} ({str(e).splitlines()[0]})") from e
        shown = sources[0] if len(sources) == 1 else f"{sources[0]} .. {sources[-1]} ({len(sources)} tensors)"
        mapped.append(Mapped(shown, shapes[sources[0]], key, shape))
    if dry_run:
        return mapped

    full: dict[str, torch.Tensor] = {}
    with progress_bar(len(plan), "from-hf read", progress) as bar:
        for key, sources, combine in plan:
            full[key] = combine([tensors.get(n) for n in sources])
            bar.update(1)
    for ours, alias in NORM_ALIASES.items():
        full[alias] = full[ours]
    with atomic_output_dir(out) as tmp:
        _copy_tokenizer(kind, tok_src, tmp / "tokenizer")
        _save_checkpoint(cfg, padded, full, tmp, hf)
    return mapped


def _save_checkpoint(cfg: Config, padded: int, full: dict[str, torch.Tensor], root: Path, hf: Path) -> None:
    """Builds our model in one process, fills it from the full tensors and saves it in the Megatron layout."""
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_ext import distributed, platform
    from megatron_ext.models.full_weights import load_full_weights
    from megatron_ext.models.gpt import build_model, transformer_config

    plat = platform.select("cpu", "gloo")
    with world_of_one():
        platform.setup_device(plat, 0)
        distributed.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(cfg.training.seed)
        gpt = build_model(cfg, plat, transformer_config(cfg, plat), padded)
        load_full_weights([gpt], full)
        full.clear()
        iter_dir = root / "iter_0000000"
        iter_dir.mkdir()
        state = {"model": gpt.sharded_state_dict(), "config": cfg.to_dict(), "iteration": 0}
        state["converted_from"] = str(hf.absolute())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            dist_checkpointing.save(state, str(iter_dir))
    cfg.to_json(root / "config.json")
    (root / "latest_checkpointed_iteration.txt").write_text("0\n")
