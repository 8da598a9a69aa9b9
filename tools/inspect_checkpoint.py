"""Inspect a checkpoint, or compare two: counters, saved layout, key config, and every tensor's shape, dtype, norm.

    python tools/inspect_checkpoint.py CKPT [--iteration N] [--compare OTHER] [--json] [--no-tensors] [--no-progress]

CKPT and OTHER are a checkpoint root (latest_checkpointed_iteration.txt + iter_*/; --iteration picks one of CKPT's,
else the tracker's), an iter_* folder, or a universal folder (universal.json + zero/<name>/<state>.pt).

Tables: one row per tensor (stacked layer keys as saved; one row per layer when compared with a universal folder)
with its state (model weight, fp32 main weight, exp_avg, exp_avg_sq), shape, dtype and L2 norm (float64).
--compare: for each tensor in both, max |a-b| and the relative difference ||a-b|| / max(||a||, ||b||); then the
tensors only in one. Vocabulary tensors (word embeddings, output layer) whose row counts differ (a universal folder
keeps only the tokenizer's rows) are compared on their common leading rows, and the row says so. Against a universal
folder, layer i of `decoder.layers.X` is `decoder.layers.i.X`, `optimizer.state.exp_avg.<key>` is
`zero/<name>/exp_avg.pt`, and the fp32 main weights (`optimizer.state.fp32_param.<key>` or `...param.<key>`; in an
fp32 run without them, the model weight) are `fp32.pt`.

The last line of a comparison is its verdict: `identical` when every tensor in both is equal element for element
(over the compared rows) and none is only in one, else `differ`. Exit status: 0 whenever the inspection ran, whatever
the verdict; 2 with one `error: ...` line on stderr for a bad input (nothing to read, unreadable or damaged files).

Why a reader of its own: dist_checkpointing reads a whole saved chunk to return any slice of it (torch's
FileSystemReader torch.loads each storage item whole) and importing megatron-core takes seconds. The items of a
.distcp file are torch.save zips at offsets listed in .metadata; this tool memory-maps the tensor bytes inside them,
so each byte is read once and memory stays at one block of rows (BLOCK_BYTES, at least one row) per tensor however
large the tensor. Like every loader of these formats it unpickles .metadata and common.pt: inspect trusted files.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import pickle
import re
import struct
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere without installing the package
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_ext.config import OneLineParser  # noqa: E402
from megatron_ext.convert import ConvertError, read_common  # noqa: E402
from megatron_ext.convert.universal import common_step  # noqa: E402
from megatron_ext.training import layout  # noqa: E402

BLOCK_BYTES = 32 << 20  # rows read at a time per tensor (and per side when comparing)
PROGRESS_MIN_BYTES = 256 << 20  # a progress bar only for inspections that read at least this much
UNIVERSAL_META = "universal.json"
UNIVERSAL_FORMAT = "megatron_ext.universal/"
OPTIMIZER_PREFIX = "optimizer.state."
MAIN_STATES = {"fp32_param": "fp32", "param": "fp32"}  # optimizer keys holding the fp32 main weights
VOCAB_NAMES = ("embedding.word_embeddings.weight", "output_layer.weight")
LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size")
STATE_ORDER = {"model": 0, "fp32": 1, "exp_avg": 2, "exp_avg_sq": 3}
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Entry:
    """One tensor as the tables show it; `prefix` fixes leading indices of the stored tensor (a stacked layer)."""

    name: str
    state: str
    shape: Shape
    dtype: torch.dtype
    ref: str  # the stored key (ours) or file (universal)
    prefix: Shape = ()

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _natural(text: str) -> list:
    """Sort key that puts decoder.layers.2 before decoder.layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def _order(key: tuple[str, str]) -> tuple:
    """Table order of (name, state): names naturally, then model, fp32, exp_avg, exp_avg_sq, others."""
    return _natural(key[0]), STATE_ORDER.get(key[1], 9), key[1]


# ---- our dist_checkpointing folders ---------------------------------------------------------------------------


class _Unsupported(Exception):
    """A storage item this reader does not parse (it is then read whole with torch.load)."""


@dataclass(frozen=True)
class _TensorSpec:
    """What a torch.save pickle says about its tensor: storage record, dtype and view."""

    key: str
    dtype: torch.dtype
    numel: int
    offset: int
    size: Shape
    stride: Shape


def _rebuild(storage: tuple, offset: int, size: Shape, stride: Shape, *_: Any) -> _TensorSpec:
    if not (isinstance(storage, tuple) and len(storage) == 5 and storage[0] == "storage"):
        raise _Unsupported(f"storage {storage!r}")
    return _TensorSpec(str(storage[2]), storage[1], int(storage[4]), int(offset), tuple(size), tuple(stride))


class _SpecUnpickler(pickle.Unpickler):
    """Reads a tensor pickle's metadata only: storages stay persistent ids, nothing else is allowed."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise _Unsupported(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return pid


class _Window(io.RawIOBase):
    """Bytes [start, start + length) of an open file as a seekable file: one storage item, a zip of its own."""

    def __init__(self, f: io.BufferedReader, start: int, length: int) -> None:
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos + (0, self._pos, self._length)[whence]
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


def _member_offset(window: _Window, info: zipfile.ZipInfo) -> int:
    """Offset in `window` of a stored (uncompressed) zip member's bytes, read from its local header."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise _Unsupported("compressed record")
    window.seek(info.header_offset)
    head = window.read(30)
    if head[:4] != b"PK\x03\x04":
        raise _Unsupported("local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _member_bytes(window: _Window, info: zipfile.ZipInfo) -> bytes:
    """A stored member's bytes without zipfile's CRC check: checkpoints are saved without record CRCs
    (see `megatron_ext.training.layout.without_record_crc`), as torch.load reads them."""
    window.seek(_member_offset(window, info))
    return window.read(info.file_size)


def _locate(path: Path, start: int, length: int) -> tuple[int, _TensorSpec]:
    """(file offset of the tensor's bytes, its spec) for the torch.save zip at [start, start + length) of `path`."""
    with open(path, "rb") as f:
        window = _Window(f, start, length)
        try:
            z = zipfile.ZipFile(window)
        except zipfile.BadZipFile as e:
            raise _Unsupported(str(e)) from None
        with z:
            names = z.namelist()
            pkl = next((n for n in names if n.endswith("data.pkl")), None)
            if pkl is None:
                raise _Unsupported("no data.pkl")
            prefix = pkl[: -len("data.pkl")]
            order = f"{prefix}byteorder"
            if order in names and _member_bytes(window, z.getinfo(order)) != sys.byteorder.encode():
                raise _Unsupported("byte order")
            spec = _SpecUnpickler(io.BytesIO(_member_bytes(window, z.getinfo(pkl)))).load()
            if not isinstance(spec, _TensorSpec):
                raise _Unsupported(type(spec).__name__)
            offset = _member_offset(window, z.getinfo(f"{prefix}data/{spec.key}"))
    return start + offset, spec


class DistCheckpoint:
    """An iter_* folder written by dist_checkpointing (torch_dist); layers stacked on axis 0 unless `per_layer`."""

    kind = "dist"

    def __init__(self, folder: Path, per_layer: bool = False) -> None:
        self.path = folder
        backend = self._backend()
        if backend != "torch_dist":
            raise ConvertError(f"{folder}: sharded backend {backend!r} is not supported (only torch_dist)")
        try:
            with open(folder / ".metadata", "rb") as f:
                self.meta = pickle.load(f)
        except Exception as e:  # pickle errors carry long messages
            raise ConvertError(f"{folder / '.metadata'}: unreadable ({type(e).__name__})") from e
        self.common = read_common(folder)
        self._items: dict[Any, tuple[Path, int, _TensorSpec] | None] = {}
        self.entries = self._entries(per_layer)

    def _backend(self) -> str:
        f = self.path / "metadata.json"
        if not f.is_file():
            raise ConvertError(f"{self.path}: no metadata.json (not a dist_checkpointing folder)")
        try:
            return str(json.loads(f.read_text()).get("sharded_backend"))
        except (OSError, ValueError) as e:
            raise ConvertError(f"{f}: unreadable ({type(e).__name__})") from e

    def tensor_keys(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {k: v for k, v in self.meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def _entries(self, per_layer: bool) -> list[Entry]:
        out = []
        for key, md in self.tensor_keys().items():
            name, state = key, "model"
            if key.startswith(OPTIMIZER_PREFIX):
                state, _, name = key[len(OPTIMIZER_PREFIX) :].partition(".")
                state = MAIN_STATES.get(state, state)
            shape, dtype = tuple(md.size), md.properties.dtype
            if per_layer and name.startswith("decoder.layers.") and shape:
                head, tail = name.split("layers.", 1)
                for i in range(shape[0]):
                    out.append(Entry(f"{head}layers.{i}.{tail}", state, shape[1:], dtype, key, (i,)))
            else:
                out.append(Entry(name, state, shape, dtype, key))
        return out

    def header(self) -> dict[str, Any]:
        c = self.common
        pp, tp = (c.get("parallel_layout") or [None, None])[:2]
        files = sorted(self.path.glob("*.distcp"))
        return {
            "path": str(self.path),
            "format": "megatron_ext dist_checkpointing (torch_dist)",
            "files": len(files),
            "bytes": sum(f.stat().st_size for f in self.path.iterdir() if f.is_file()),
            "integrity": _manifest_check(self.path),
            "iteration": c.get("iteration"),
            "train_state": _plain(c.get("train_state")),
            "data_state": _plain(c.get("data_state")),
            "layout": dict(zip(LAYOUT_KEYS, (tp, pp))),
            "optimizer_step": common_step(c.get("optimizer")),
            "vocab_size": c.get("vocab_size"),
            "config": _plain(c.get("config")) or _run_config(self.path),
            "scheduler": _plain(c.get("scheduler")),
        }

    def _item(self, key: str, offsets: Shape) -> tuple[Path, int, _TensorSpec] | None:
        """Where a chunk's bytes lie (parsed once), or None when its item must be read whole."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        index = MetadataIndex(key, torch.Size(offsets))
        if index not in self._items:
            info = self.meta.storage_data[index]
            path = self.path / info.relative_path
            if getattr(info, "transform_descriptors", None):
                raise ConvertError(f"{path}: {key} is stored with transforms {info.transform_descriptors}")
            try:
                start, spec = _locate(path, info.offset, info.length)
                self._items[index] = (path, start, spec)
            except (_Unsupported, KeyError, pickle.UnpicklingError):
                self._items[index] = None
        return self._items[index]

    def _chunk(self, key: str, offsets: Shape) -> torch.Tensor:
        """One saved chunk as a tensor over a private memory map (pages are read only when touched)."""
        item = self._item(key, offsets)
        if item is None:  # an item this reader cannot map: torch reads it whole
            from torch.distributed.checkpoint.metadata import MetadataIndex

            info = self.meta.storage_data[MetadataIndex(key, torch.Size(offsets))]
            path = self.path / info.relative_path
            with open(path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
            try:
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as e:  # zip/pickle errors of a damaged file carry long messages
                raise ConvertError(f"{path}: {key} is unreadable ({type(e).__name__}); the file is damaged") from e
        path, start, spec = item
        nbytes = spec.numel * spec.dtype.itemsize
        if nbytes == 0:
            return torch.empty(spec.size, dtype=spec.dtype)
        if start + nbytes > path.stat().st_size:
            raise ConvertError(f"{path}: {key} lies past the end of the file (truncated)")
        data = np.memmap(path, dtype=np.uint8, mode="c", offset=start, shape=(nbytes,))
        return torch.from_numpy(data).view(spec.dtype).as_strided(spec.size, spec.stride, spec.offset)

    def read_rows(self, e: Entry, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of an entry, assembled from the chunks (TP/PP shards) that hold them."""
        md = self.meta.state_dict_metadata[e.ref]
        if e.shape:
            start = (*e.prefix, lo, *([0] * (len(e.shape) - 1)))
            length = (*([1] * len(e.prefix)), hi - lo, *e.shape[1:])
        else:
            start, length = e.prefix, (1,) * len(e.prefix)
        out = torch.empty(length, dtype=e.dtype)
        covered = 0
        for chunk in md.chunks:
            a = [max(s, o) for s, o in zip(start, chunk.offsets)]
            b = [min(s + n, o + z) for s, n, o, z in zip(start, length, chunk.offsets, chunk.sizes)]
            if any(y <= x for x, y in zip(a, b)):
                continue
            src = self._chunk(e.ref, tuple(chunk.offsets))
            piece = src[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, chunk.offsets))]
            out[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, start))].copy_(piece)
            covered += math.prod(y - x for x, y in zip(a, b))
            del src, piece
        if covered != out.numel():
            raise ConvertError(f"{self.path}: the saved chunks of {e.ref} do not cover it (damaged metadata)")
        return out.reshape((hi - lo, *e.shape[1:]) if e.shape else ())


def _manifest_check(folder: Path) -> str:
    """'ok', 'no manifest', or what differs from the sizes our save recorded (a damaged checkpoint)."""
    if not (folder / layout.MANIFEST).is_file():
        return "no manifest"
    problem = layout.verify(folder)
    return f"DAMAGED: {problem}" if problem else "ok (file sizes match manifest.json)"


def _run_config(folder: Path) -> dict[str, Any] | None:
    """The run's config.json beside the checkpoints (checkpoints of older runs carry no config)."""
    f = folder.parent / "config.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError):
        return None


# ---- universal folders ----------------------------------------------------------------------------------------


class UniversalCheckpoint:
    """universal.json + zero/<name>/<state>.pt ({"param": tensor}), read memory-mapped one file at a time."""

    kind = "universal"

    def __init__(self, folder: Path) -> None:
        self.path = folder
        try:
            self.meta = json.loads((folder / UNIVERSAL_META).read_text())
        except (OSError, ValueError) as e:
            raise ConvertError(f"{folder / UNIVERSAL_META}: unreadable ({type(e).__name__})") from e
        fmt = str(self.meta.get("format", ""))
        if not fmt.startswith(UNIVERSAL_FORMAT):
            raise ConvertError(f"{folder / UNIVERSAL_META}: format {fmt!r} is not {UNIVERSAL_FORMAT}N")
        params = self.meta.get("params")
        if not isinstance(params, dict):
            raise ConvertError(f"{folder / UNIVERSAL_META}: no 'params' table")
        self.entries = []
        for name, p in params.items():
            dtype = getattr(torch, str(p.get("dtype", "float32")), None)
            if not isinstance(dtype, torch.dtype):
                raise ConvertError(f"{folder / UNIVERSAL_META}: {name}: unknown dtype {p.get('dtype')!r}")
            for state in p.get("states", ["fp32"]):
                f = folder / "zero" / name / f"{state}.pt"
                self.entries.append(Entry(name, state, tuple(p["shape"]), dtype, str(f)))
        self._open: tuple[str, torch.Tensor] | None = None

    def header(self) -> dict[str, Any]:
        m, config = self.meta, self.meta.get("config") or {}
        src = m.get("source_layout") or {}
        par = config.get("parallel", {})
        files = list((self.path / "zero").rglob("*.pt"))
        return {
            "path": str(self.path),
            "format": f"universal ({m.get('format')}), converted from {m.get('source', '?')}",
            "files": len(files),
            "bytes": sum(f.stat().st_size for f in files) + (self.path / UNIVERSAL_META).stat().st_size,
            "integrity": "n/a (universal)",
            "iteration": m.get("iteration"),
            "train_state": m.get("train_state"),
            "data_state": m.get("data_state"),
            "layout": {k: src.get(k, par.get(k)) for k in LAYOUT_KEYS} | {"universal": True},
            "optimizer_step": m.get("optimizer_step", self._step()),
            "vocab_size": m.get("vocab_size"),
            "config": config,
            "scheduler": m.get("scheduler"),
        }

    def _step(self) -> int | None:
        f = next(iter((self.path / "zero").glob("*/step.pt")), None)
        if f is None:
            return None
        try:
            return int(torch.load(f, map_location="cpu", weights_only=True))
        except Exception:
            return None

    def _tensor(self, e: Entry) -> torch.Tensor:
        if self._open is None or self._open[0] != e.ref:
            self._open = None  # drop the previous map first
            try:
                saved = torch.load(e.ref, map_location="cpu", mmap=True, weights_only=True)
            except FileNotFoundError:
                raise ConvertError(f"{e.ref}: missing (the universal checkpoint is incomplete)") from None
            except Exception as ex:  # zip/pickle errors of a truncated file carry long messages
                raise ConvertError(f"{e.ref}: unreadable ({type(ex).__name__}); the file is damaged") from ex
            t = saved["param"] if isinstance(saved, dict) else saved
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != e.shape or t.dtype != e.dtype:
                what = f"{list(t.shape)} {_dtype_name(t.dtype)}" if isinstance(t, torch.Tensor) else type(t).__name__
                said = f"{list(e.shape)} {_dtype_name(e.dtype)}"
                raise ConvertError(f"{e.ref}: holds {what}, {UNIVERSAL_META} says {said}")
            self._open = (e.ref, t)
        return self._open[1]

    def read_rows(self, e: Entry, lo: int, hi: int) -> torch.Tensor:
        t = self._tensor(e)
        return t[lo:hi] if e.shape else t


Source = DistCheckpoint | UniversalCheckpoint


def open_checkpoint(path: str | Path, iteration: int | None = None, per_layer: bool = False) -> Source:
    """A root (tracker), an iter_* folder or a universal folder; a miss is one ConvertError line."""
    p = Path(path)
    if (p / UNIVERSAL_META).is_file():
        u = UniversalCheckpoint(p)
        if iteration is not None and u.meta.get("iteration") != iteration:
            raise ConvertError(f"{p}: a universal folder of iteration {u.meta.get('iteration')}, not {iteration}")
        return u
    if not p.exists():
        raise ConvertError(f"{p}: no such file or folder")
    if iteration is None and (p / layout.COMMON_STATE).is_file():
        return DistCheckpoint(p, per_layer)
    if not p.is_dir():
        raise ConvertError(f"{p}: not a checkpoint folder")
    try:
        it = iteration if iteration is not None else layout.latest_iteration(p)
    except layout.CheckpointNotFound as e:
        raise ConvertError(str(e)) from None
    if it is None:
        missing = f"{layout.TRACKER}, {layout.COMMON_STATE} and {UNIVERSAL_META} are missing"
        raise ConvertError(f"{p}: not a checkpoint ({missing})")
    folder = layout.iteration_dir(p, it)
    if not (folder / layout.COMMON_STATE).is_file():
        found = sorted(q.name[5:].lstrip("0") or "0" for q in p.glob("iter_*") if q.name[5:].isdigit())
        raise ConvertError(f"{p}: no checkpoint of iteration {it} (iterations found: {', '.join(found) or 'none'})")
    return DistCheckpoint(folder, per_layer)


# ---- summary of the saved state ---------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-safe copy (tensors and numpy scalars to numbers, tuples to lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def _bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def _schedule_lines(sched: dict[str, Any] | None) -> list[str]:
    """Our scheduler state described by the schedules module (older megatron-core states: their fields)."""
    if not sched:
        return ["not saved"]
    if "config" not in sched:
        return [", ".join(f"{k} {v}" for k, v in sched.items())]
    from megatron_ext.training.schedules import ScheduleConfig, describe, lr_at, to_samples

    try:
        cfg = ScheduleConfig.from_dict(sched["config"])
        lines = describe(cfg).splitlines()
        pos = float(sched.get("position", 0))
        where = f"{cfg.unit} {_count(pos)}"
        if cfg.unit != "samples":
            where += f" (samples {_count(to_samples(cfg, pos))})"
        lines.append(f"now at {where}: lr {lr_at(cfg, pos):.4g}")
        return [line.strip().removeprefix("lr schedule: ") for line in lines]
    except Exception as e:  # a schedule this version cannot follow still gets its raw fields shown
        return [f"{sched['config']} ({type(e).__name__}: {e})"]


def describe_config(h: dict[str, Any], params: int, vocab_rows: int | None) -> dict[str, str]:
    """The lines a person checks first: progress, layout, model shape, precision and optimizer, tokenizer, data."""
    cfg = h.get("config") or {}
    m, par, prec = cfg.get("model", {}), cfg.get("parallel", {}), cfg.get("precision", {})
    opt, data, ts = cfg.get("optimizer", {}), cfg.get("data", {}), h.get("train_state") or {}
    out = {
        "progress": f"iteration {h.get('iteration')}, consumed samples {ts.get('consumed_samples')}, consumed tokens "
        f"{ts.get('consumed_tokens')}, skipped steps {ts.get('skipped_total', 0)}"
    }
    lay = h["layout"]
    tp, pp = lay.get("tensor_model_parallel_size"), lay.get("pipeline_model_parallel_size")
    text = f"{'universal (no layout), converted from' if lay.get('universal') else 'saved with'} TP={tp} PP={pp}"
    if par.get("num_layers_per_virtual_pipeline_stage"):
        text += f" (virtual stages of {par['num_layers_per_virtual_pipeline_stage']} layers)"
    text += f", sequence parallel {'on' if par.get('sequence_parallel') else 'off'}"
    text += f", distributed optimizer {'on' if par.get('use_distributed_optimizer') else 'off'}"
    out["layout"] = text + ("" if lay.get("universal") else "; any data-parallel size can resume")
    if m:
        groups = m.get("num_query_groups") if m.get("group_query_attention") else None
        pos = m.get("position_embedding_type")
        base = f" (base {m.get('rotary_base')})" if pos == "rope" else ""
        out["model"] = (
            f"{m.get('num_layers')} layers, hidden {m.get('hidden_size')}, {m.get('num_attention_heads')} heads"
            + (f" ({groups} query groups)" if groups else "")
            + f", ffn {m.get('ffn_hidden_size')}, seq {m.get('seq_length')} (max positions "
            f"{m.get('max_position_embeddings')}), {m.get('normalization')}, {'SwiGLU' if m.get('swiglu') else 'GELU'}"
            f", {pos}{base} positions, {'untied' if m.get('untie_embeddings_and_output_weights') else 'tied'} "
            f"embeddings, {'no biases' if m.get('disable_bias_linear') else 'biases'}"
        )
    vocab = f"{vocab_rows} embedding rows" if vocab_rows else "no embedding"
    if h.get("vocab_size"):
        vocab += f" (tokenizer: {h['vocab_size']})"
    out["parameters"] = f"{_count(params)} ({params:,}); {vocab}"
    if prec or opt:
        kind = "bf16" if prec.get("bf16") else "fp16" if prec.get("fp16") else "fp32"
        out["precision"] = (
            f"{kind}; {opt.get('optimizer', '?')} lr {opt.get('lr')} min_lr {opt.get('min_lr')} wd "
            f"{opt.get('weight_decay')} betas ({opt.get('adam_beta1')}, {opt.get('adam_beta2')}) eps "
            f"{opt.get('adam_eps')} clip {opt.get('clip_grad')}; optimizer step {h.get('optimizer_step')}"
        )
    if data:
        model_file = f" ({data['tokenizer_model']})" if data.get("tokenizer_model") else ""
        out["tokenizer"] = f"{data.get('tokenizer_type')}{model_file}"
        out["data"] = str(data.get("data_file_list") or data.get("data_path") or "built-in corpus")
        per_corpus = (h.get("data_state") or {}).get("consumed_per_corpus")
        if per_corpus:
            out["data"] += f"; samples per corpus {per_corpus}"
    return out


# ---- reading tensors --------------------------------------------------------------------------------------------


def _blocks(e: Entry, rows: int, other_row_bytes: int = 0) -> Iterator[tuple[int, int]]:
    step = max(1, BLOCK_BYTES // max(1, e.row_bytes, other_row_bytes))
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


def _bar(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    show = enabled and total >= PROGRESS_MIN_BYTES
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, disable=not show, leave=False)


def norm(src: Source, e: Entry, bar: Any = None) -> float:
    """L2 norm in float64, one block of rows at a time."""
    total = 0.0
    for lo, hi in _blocks(e, e.rows):
        x = src.read_rows(e, lo, hi).reshape(-1).double()
        total += float(torch.dot(x, x))
        if bar is not None:
            bar.update((hi - lo) * e.row_bytes if e.shape else e.nbytes)
    return math.sqrt(total)


@dataclass
class Diff:
    """The comparison of one tensor present in both checkpoints."""

    name: str
    state: str
    shape_a: Shape
    shape_b: Shape
    dtype_a: str
    dtype_b: str
    max_abs: float | None = None
    rel: float | None = None
    note: str = ""

    @property
    def same(self) -> bool:
        return self.max_abs == 0.0 and not self.note.startswith("shape")


def compare_entries(a: Source, ea: Entry, b: Source, eb: Entry, state: str, read: bool, bar: Any) -> Diff:
    """max |a-b| and ||a-b|| / max(||a||, ||b||), in float64 over aligned row blocks."""
    d = Diff(ea.name, state, ea.shape, eb.shape, _dtype_name(ea.dtype), _dtype_name(eb.dtype))
    rows = ea.rows
    if ea.shape != eb.shape:
        vocab = ea.name in VOCAB_NAMES and len(ea.shape) == len(eb.shape) > 0 and ea.shape[1:] == eb.shape[1:]
        if not vocab:
            d.note = "shape differs: not compared"
            return d
        rows = min(ea.shape[0], eb.shape[0])
        d.note = f"first {rows} rows compared ({ea.shape[0]} / {eb.shape[0]}: vocabulary padding differs)"
    if not read:
        return d
    max_abs, dd, na, nb = 0.0, 0.0, 0.0, 0.0
    for lo, hi in _blocks(ea, rows, eb.row_bytes):
        x = a.read_rows(ea, lo, hi).reshape(-1).double()
        y = b.read_rows(eb, lo, hi).reshape(-1).double()
        na, nb = na + float(torch.dot(x, x)), nb + float(torch.dot(y, y))
        x -= y
        dd += float(torch.dot(x, x))
        if x.numel():
            m = float(x.abs_().max())  # NaN propagates: a NaN on either side is a difference
            max_abs = math.nan if math.isnan(m) or math.isnan(max_abs) else max(max_abs, m)
        bar.update((hi - lo) * (ea.row_bytes + eb.row_bytes) if ea.shape else ea.nbytes + eb.nbytes)
    scale = math.sqrt(max(na, nb))
    d.max_abs = max_abs
    d.rel = math.sqrt(dd) / scale if scale > 0 else (0.0 if dd == 0 else math.inf)
    return d


def _pairing(src: Source, other: Source) -> tuple[dict[tuple[str, str], Entry], list[str]]:
    """Entries keyed by (name, state) as they pair with `other`; against a universal folder our fp32 main weights
    are its fp32 state (the model weight when there are none) and a lower-precision model copy is left out."""
    keyed = {(e.name, e.state): e for e in src.entries}
    notes = []
    if isinstance(src, DistCheckpoint) and isinstance(other, UniversalCheckpoint):
        dropped = 0
        for name, state in list(keyed):
            if state != "model":
                continue
            e = keyed.pop((name, state))
            if (name, "fp32") in keyed:
                dropped += 1
            else:
                keyed[(name, "fp32")] = e
        if dropped:
            notes.append(
                f"{src.path}: its {dropped} model weights are not compared; their fp32 main copies (optimizer "
                "state) are, as the universal format keeps only those"
            )
    return keyed, notes


@dataclass
class Pairing:
    """Which tensors of A and B pair up (name, state) and which are only in one, decided before reading values."""

    pairs: list[tuple[Entry, Entry, str]]
    only_a: list[str]
    only_b: list[str]
    notes: list[str]


def pair(a: Source, b: Source) -> Pairing:
    ka, notes_a = _pairing(a, b)
    kb, notes_b = _pairing(b, a)
    both = sorted(set(ka) & set(kb), key=_order)
    only_a = [f"{n} [{s}]" for n, s in sorted(set(ka) - set(kb), key=_order)]
    only_b = [f"{n} [{s}]" for n, s in sorted(set(kb) - set(ka), key=_order)]
    return Pairing([(ka[k], kb[k], k[1]) for k in both], only_a, only_b, notes_a + notes_b)


def compare(a: Source, b: Source, p: Pairing, read: bool, progress: bool) -> Iterator[Diff]:
    """One Diff per pair, in table order (values are read pair by pair)."""
    total = sum(ea.nbytes + eb.nbytes for ea, eb, _ in p.pairs) if read else 0
    with _bar(total, progress, "compare") as bar:
        for ea, eb, state in p.pairs:
            yield compare_entries(a, ea, b, eb, state, read, bar)


def verdict(diffs: list[Diff], p: Pairing, read: bool) -> str:
    if not read:
        return "not compared (--no-tensors)"
    return "identical" if all(d.same for d in diffs) and not p.only_a and not p.only_b else "differ"


def _sorted(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: _order((e.name, e.state)))


def tensor_rows(src: Source, read: bool, progress: bool) -> Iterator[dict[str, Any]]:
    """One row per tensor in table order, each norm read when its row is due."""
    entries = _sorted(src.entries)
    with _bar(sum(e.nbytes for e in entries) if read else 0, progress, "norms") as bar:
        for e in entries:
            value = norm(src, e, bar) if read else None
            yield {
                "name": e.name,
                "state": e.state,
                "shape": list(e.shape),
                "dtype": _dtype_name(e.dtype),
                "norm": value,
            }


# ---- output -----------------------------------------------------------------------------------------------------


def summary(src: Source) -> dict[str, Any]:
    h = src.header()
    model = [e for e in src.entries if e.state == "model"] or [e for e in src.entries if e.state == "fp32"]
    emb = next((e for e in src.entries if e.name == VOCAB_NAMES[0] and e.shape), None)
    h["lines"] = describe_config(h, sum(math.prod(e.shape) for e in model), emb.shape[0] if emb else None)
    h["schedule"] = _schedule_lines(h.get("scheduler"))
    return h


def _print_header(h: dict[str, Any], label: str = "") -> None:
    print(f"{label}checkpoint  {h['path']}")
    print(f"  format      {h['format']}; {h['files']} files, {_bytes(h['bytes'])}; integrity {h['integrity']}")
    for key, text in h["lines"].items():
        print(f"  {key:11} {text}")
    for i, line in enumerate(h["schedule"]):
        print(f"  {'lr schedule' if i == 0 else '':11} {line}")


def _emit(line: str) -> None:
    """A table row, printed above the progress bar (on stderr) rather than through it."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def _print_tensors(src: Source, rows: Iterator[dict[str, Any]]) -> None:
    width = max([len(e.name) for e in src.entries] + [6])
    print(f"\n{'tensor':{width}}  {'state':10} {'shape':20} {'dtype':9} {'norm':>14}", flush=True)
    n = values = 0
    for r in rows:
        _emit(f"{r['name']:{width}}  {r['state']:10} {str(r['shape']):20} {r['dtype']:9} {_fmt(r['norm']):>14}")
        n, values = n + 1, values + math.prod(r["shape"])
    print(f"{n} tensors, {values:,} values")


def _print_compare(a: Source, b: Source, p: Pairing, read: bool, progress: bool, ha: dict, hb: dict) -> None:
    width = max([len(ea.name) for ea, _, _ in p.pairs] + [6])
    print(f"\n{'tensor':{width}}  {'state':10} {'shape':20} {'max |a-b|':>12} {'rel diff':>12}  note", flush=True)
    diffs = []
    for d in compare(a, b, p, read, progress):
        diffs.append(d)
        shape = str(list(d.shape_a)) if d.shape_a == d.shape_b else f"{list(d.shape_a)}/{list(d.shape_b)}"
        note = d.note + (f"{'; ' if d.note else ''}dtype {d.dtype_a}/{d.dtype_b}" if d.dtype_a != d.dtype_b else "")
        _emit(f"{d.name:{width}}  {d.state:10} {shape:20} {_fmt(d.max_abs):>12} {_fmt(d.rel):>12}  {note}")
    for label, names in (("A", p.only_a), ("B", p.only_b)):
        if names:
            print(f"\nonly in {label} ({len(names)}):")
            for n in names:
                print(f"  {n}")
    for note in p.notes:
        print(f"note: {note}")
    ta, tb = ha.get("train_state") or {}, hb.get("train_state") or {}
    counters = (
        [f"iteration {ha.get('iteration')} vs {hb.get('iteration')}"]
        if ha.get("iteration") != hb.get("iteration")
        else []
    )
    counters += [
        f"{k} {ta.get(k)} vs {tb.get(k)}" for k in ("consumed_samples", "consumed_tokens") if ta.get(k) != tb.get(k)
    ]
    if counters:
        print(f"counters differ: {'; '.join(counters)}")
    result = verdict(diffs, p, read)
    worst = max((d for d in diffs if d.rel is not None), key=lambda d: d.rel or 0.0, default=None)
    tail = ""
    if result == "differ" and worst is not None and worst.rel:
        tail = f"; largest rel diff {worst.rel:.3g} ({worst.name} [{worst.state}])"
    unequal = f" ({sum(not d.same for d in diffs)} not equal)" if read else ""
    print(
        f"compared {len(diffs)} tensors in both{unequal}, {len(p.only_a)} only in A, {len(p.only_b)} only in B: "
        f"{result}{tail}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="tools/inspect_checkpoint.py",
        description="Show a checkpoint's counters, layout, config and per-tensor norms, or compare two checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("ckpt", metavar="CKPT", help="Checkpoint root (with tracker), iter_* folder or universal folder.")
    p.add_argument("--iteration", type=int, default=None, help="Iteration of CKPT to read (default: the latest).")
    p.add_argument("--compare", metavar="OTHER", default=None, help="Compare with this checkpoint (same forms).")
    p.add_argument("--json", action="store_true", help="Print one JSON document instead of tables.")
    p.add_argument("--no-tensors", action="store_true", help="Read no tensor values (shapes and dtypes only).")
    p.add_argument("--no-progress", action="store_true", help="No progress bar on stderr.")
    return p


def _open_pair(args: argparse.Namespace) -> tuple[Source, Source]:
    """Against a universal folder (per-layer names), our stacked keys are split into layers."""
    universal = [(Path(p) / UNIVERSAL_META).is_file() for p in (args.ckpt, args.compare)]
    return (
        open_checkpoint(args.ckpt, args.iteration, per_layer=universal[1]),
        open_checkpoint(args.compare, per_layer=universal[0]),
    )


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the tables show, as one JSON-able dict (--json)."""
    read, progress = not args.no_tensors, not args.no_progress
    if args.compare is None:
        src = open_checkpoint(args.ckpt, args.iteration)
        return {"checkpoint": summary(src), "tensors": list(tensor_rows(src, read, progress))}
    a, b = _open_pair(args)
    p = pair(a, b)
    diffs = list(compare(a, b, p, read, progress))
    rows = [vars(d) | {"identical": d.same} for d in diffs]
    out = {"diffs": rows, "only_a": p.only_a, "only_b": p.only_b, "notes": p.notes, "verdict": verdict(diffs, p, read)}
    return {"a": summary(a), "b": summary(b), "compare": out}


def print_tables(args: argparse.Namespace) -> None:
    """The text form, printed as it is computed (the header before any tensor is read)."""
    read, progress = not args.no_tensors, not args.no_progress
    if args.compare is None:
        src = open_checkpoint(args.ckpt, args.iteration)
        _print_header(summary(src))
        _print_tensors(src, tensor_rows(src, read, progress))
        return
    a, b = _open_pair(args)
    ha, hb = summary(a), summary(b)
    _print_header(ha, "A ")
    _print_header(hb, "B ")
    _print_compare(a, b, pair(a, b), read, progress, ha, hb)


def main(argv: list[str] | None = None) -> int:
    """Inspect or compare; user mistakes (bad paths, unreadable files) end in one line and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.json:
            print(json.dumps(report(args), indent=1, default=_plain))
        else:
            print_tables(args)
    except (ConvertError, OSError) as e:
        sys.stdout.flush()
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        print(f"error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
