"""Reads any of our checkpoints tensor by tensor, a block of rows at a time: dist_checkpointing folders (torch_dist
`.distcp` files) and universal folders, with their counters, layout and config (`open_checkpoint`).

Why a reader of its own: dist_checkpointing reads a whole saved chunk to return any slice of it (torch's
FileSystemReader torch.loads each storage item whole) and importing megatron-core takes seconds. The items of a
.distcp file are torch.save zips at offsets listed in .metadata; this reader memory-maps the tensor bytes inside them,
so each byte is read once and memory stays at one block of rows (BLOCK_BYTES, at least one row) per tensor however
large the tensor. Like every loader of these formats it unpickles .metadata and common.pt: inspect trusted files.

Used by tools/inspect_checkpoint.py (norms, comparisons); the .metadata index is read with torch's
FileSystemReader.read_metadata, the common state with `read_common`.
"""

from __future__ import annotations

import collections
import io
import json
import math
import pickle
import re
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from megatron_ext.convert import ConvertError, read_common
from megatron_ext.convert.universal import common_step
from megatron_ext.training import layout
from megatron_ext.training.universal import FORMAT, MAIN_STATES, META, OPTIMIZER_PREFIX

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

BLOCK_BYTES = 32 << 20  # rows read at a time per tensor (and per side when comparing)
UNIVERSAL_FORMAT = FORMAT.rsplit("/", 1)[0] + "/"  # any version of the format
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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _natural(text: str) -> list:
    """Sort key that puts decoder.layers.2 before decoder.layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def entry_order(key: tuple[str, str]) -> tuple:
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
        from torch.distributed.checkpoint import FileSystemReader

        try:
            self.meta = FileSystemReader(str(folder)).read_metadata()
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

    def tensor_keys(self) -> dict[str, TensorStorageMetadata]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {k: v for k, v in self.meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def _entries(self, per_layer: bool) -> list[Entry]:
        out = []
        for key, md in self.tensor_keys().items():
            name, state = key, "model"
            if key.startswith(OPTIMIZER_PREFIX):
                state, _, name = key[len(OPTIMIZER_PREFIX) :].partition(".")
                state = "fp32" if state in MAIN_STATES else state
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
            "train_state": plain(c.get("train_state")),
            "data_state": plain(c.get("data_state")),
            "layout": dict(zip(LAYOUT_KEYS, (tp, pp))),
            "optimizer_step": common_step(c.get("optimizer")),
            "vocab_size": c.get("vocab_size"),
            "config": plain(c.get("config")) or _run_config(self.path),
            "scheduler": plain(c.get("scheduler")),
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
        mapped = np.memmap(path, dtype=np.uint8, mode="c", offset=start, shape=(nbytes,))
        return torch.from_numpy(mapped).view(spec.dtype).as_strided(spec.size, spec.stride, spec.offset)

    def read_rows(self, e: Entry, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of an entry, assembled from the chunks (TP/PP shards) that hold them."""
        md = cast("TensorStorageMetadata", self.meta.state_dict_metadata[e.ref])  # entries are tensor_keys()
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
            self.meta = json.loads((folder / META).read_text())
        except (OSError, ValueError) as e:
            raise ConvertError(f"{folder / META}: unreadable ({type(e).__name__})") from e
        fmt = str(self.meta.get("format", ""))
        if not fmt.startswith(UNIVERSAL_FORMAT):
            raise ConvertError(f"{folder / META}: format {fmt!r} is not {UNIVERSAL_FORMAT}N")
        params = self.meta.get("params")
        if not isinstance(params, dict):
            raise ConvertError(f"{folder / META}: no 'params' table")
        self.entries = []
        for name, p in params.items():
            dtype = getattr(torch, str(p.get("dtype", "float32")), None)
            if not isinstance(dtype, torch.dtype):
                raise ConvertError(f"{folder / META}: {name}: unknown dtype {p.get('dtype')!r}")
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
            "bytes": sum(f.stat().st_size for f in files) + (self.path / META).stat().st_size,
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
                what = f"{list(t.shape)} {dtype_name(t.dtype)}" if isinstance(t, torch.Tensor) else type(t).__name__
                said = f"{list(e.shape)} {dtype_name(e.dtype)}"
                raise ConvertError(f"{e.ref}: holds {what}, {META} says {said}")
            self._open = (e.ref, t)
        return self._open[1]

    def read_rows(self, e: Entry, lo: int, hi: int) -> torch.Tensor:
        t = self._tensor(e)
        return t[lo:hi] if e.shape else t


Source = DistCheckpoint | UniversalCheckpoint


def open_checkpoint(path: str | Path, iteration: int | None = None, per_layer: bool = False) -> Source:
    """A root (tracker), an iter_* folder or a universal folder; a miss is one ConvertError line."""
    p = Path(path)
    if (p / META).is_file():
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
        missing = f"{layout.TRACKER}, {layout.COMMON_STATE} and {META} are missing"
        raise ConvertError(f"{p}: not a checkpoint ({missing})")
    folder = layout.iteration_dir(p, it)
    if not (folder / layout.COMMON_STATE).is_file():
        found = sorted(q.name[5:].lstrip("0") or "0" for q in p.glob("iter_*") if q.name[5:].isdigit())
        raise ConvertError(f"{p}: no checkpoint of iteration {it} (iterations found: {', '.join(found) or 'none'})")
    return DistCheckpoint(folder, per_layer)


def plain(value: Any) -> Any:
    """JSON-safe copy (tensors and numpy scalars to numbers, tuples to lists)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
