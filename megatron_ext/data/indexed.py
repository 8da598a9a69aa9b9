"""Megatron's ``.bin``/``.idx`` indexed dataset format: the one place that writes it and parses its ``.idx`` header.

The writer never leaves a half-written prefix.
The writer's bytes are exactly what megatron-core's ``IndexedDatasetBuilder`` writes for the same documents (the tests
compare them), but this writer needs no torch, checks token ranges, and publishes the files atomically:
both are written under ``.tmp-<pid>`` names and renamed into place only by :meth:`finalize`, .bin first and
.idx last, so a reader that finds the .idx (megatron-core opens the .idx first) finds the matching .bin.
:func:`read_index` reads the header and sequence lengths without the ``.bin`` and without megatron-core (data
lists and blends read thousands of them); :func:`read_documents` reads the tokens through megatron-core.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1
_HEADER_STRUCT = struct.Struct("<QBQQ")  # version, dtype code, sequence count, document count
_HEADER_SIZE = len(_INDEX_HEADER) + _HEADER_STRUCT.size  # 34 bytes
_DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}  # megatron.core.datasets.indexed_dataset.DType
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # the same enum: code -> bytes per token


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 below 65500 ids, else int32: the same rule as megatron-core's ``DType.optimal_dtype``."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def remove_stale_temporaries(prefix: str | Path) -> list[str]:
    """Deletes the ``.tmp-<pid>`` files of ``prefix`` whose writer is gone (a run killed by SIGKILL cleans up
    nothing); a live writer's stay. Returns the files removed."""
    removed = []
    for tmp in sorted(Path(prefix).parent.glob(f"{Path(prefix).name}.*.tmp-*")):
        pid = tmp.name.rsplit(".tmp-", 1)[1]
        if tmp.name.startswith(f"{Path(prefix).name}.") and pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(str(tmp))
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class IndexedDatasetWriter:
    """Writes ``<prefix>.bin`` and ``<prefix>.idx``; use as a context manager.

    A clean exit from the ``with`` block finalizes (as does calling :meth:`finalize`); leaving it by an
    exception, or :meth:`close` without finalize, deletes the temporaries.
    """

    def __init__(self, prefix: str | Path, vocab_size: int) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.prefix = str(prefix)
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.bin_path = self.prefix + ".bin"
        self.idx_path = self.prefix + ".idx"
        self._bin_tmp = f"{self.bin_path}.tmp-{os.getpid()}"
        self._idx_tmp = f"{self.idx_path}.tmp-{os.getpid()}"
        self._sequence_lengths: list[int] = []
        self._document_indices: list[int] = [0]
        self.num_tokens = 0
        self._finalized = False
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed by finalize()/close()

    @property
    def num_documents(self) -> int:
        return len(self._document_indices) - 1

    def add_document(self, tokens: np.ndarray | Sequence[int], lengths: Sequence[int] | None = None) -> None:
        """Append one document; ``lengths`` splits it into several sequences (default: one sequence)."""
        if self._bin.closed:
            raise ValueError(f"IndexedDatasetWriter for {self.prefix!r} is already finalized or closed")
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size:
            if arr.dtype.kind not in "iub":
                raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got min {lo} max {hi}")
        if lengths is None:
            seq_lengths = [int(arr.size)]
        else:
            seq_lengths = [int(n) for n in lengths]
            if any(n < 0 for n in seq_lengths) or sum(seq_lengths) != arr.size:
                raise ValueError(f"sequence lengths {seq_lengths} do not add up to the {arr.size} tokens")
        if any(n > np.iinfo(np.int32).max for n in seq_lengths):
            raise ValueError("a sequence is longer than the format's int32 length field allows")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sequence_lengths.extend(seq_lengths)
        self._document_indices.append(len(self._sequence_lengths))
        self.num_tokens += int(arr.size)

    def finalize(self) -> None:
        """Write the index and publish both files atomically (.bin first, .idx last)."""
        if self._finalized:
            return
        if self._bin.closed:
            raise ValueError(f"IndexedDatasetWriter for {self.prefix!r} was closed without finalize")
        if self.num_tokens == 0:
            # megatron-core memory-maps the .bin, and an empty file cannot be mapped.
            raise ValueError(f"no tokens were added to {self.prefix!r}; megatron-core cannot read an empty .bin")
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            self._write_index()
            # A reader must never pair a new .bin with an old .idx: drop the old .idx before the swap.
            if os.path.exists(self.idx_path):
                os.remove(self.idx_path)
            os.replace(self._bin_tmp, self.bin_path)
            os.replace(self._idx_tmp, self.idx_path)
        except BaseException:
            self.close()
            raise
        self._finalized = True

    def _write_index(self) -> None:
        lengths = np.asarray(self._sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self._idx_tmp, "wb") as f:
            f.write(_INDEX_HEADER)
            f.write(struct.pack("<Q", _INDEX_VERSION))
            f.write(struct.pack("<B", _DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self._document_indices)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.asarray(self._document_indices, dtype=np.int64).tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        """Abandon an unfinished dataset: close and delete the temporaries (no-op after finalize)."""
        if not self._bin.closed:
            self._bin.close()
        if not self._finalized:
            for path in (self._bin_tmp, self._idx_tmp):
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # A clean exit publishes the dataset (unless close() abandoned it); an exception discards it.
        if exc_type is None and not self._finalized and not self._bin.closed:
            self.finalize()
        else:
            self.close()

    def __del__(self) -> None:
        if hasattr(self, "_bin"):
            try:
                self.close()
            except Exception:
                pass


@dataclass(frozen=True)
class IndexInfo:
    """What a ``.idx`` says about its ``.bin``: enough to check the pair, count tokens and blend."""

    lengths: np.ndarray  # int32 [sequences]: tokens per sequence
    token_size: int
    documents: int

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    @property
    def sequences(self) -> int:
        return len(self.lengths)

    @property
    def bin_size(self) -> int:
        return self.tokens * self.token_size


def read_index(idx_path: str) -> IndexInfo:
    """Header and sequence lengths of one ``.idx`` (megatron-core's ``_IndexReader`` layout), checked for
    truncation; raises ``ValueError`` with a reason (no file:line: the caller knows the source)."""
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_SIZE)
        if len(head) < _HEADER_SIZE or head[: len(_INDEX_HEADER)] != _INDEX_HEADER:
            raise ValueError(f"{idx_path} is not a Megatron .idx file (bad header)")
        version, code, sequences, documents = _HEADER_STRUCT.unpack(head[len(_INDEX_HEADER) :])
        if version != _INDEX_VERSION or code not in _DTYPE_SIZES:
            raise ValueError(f"{idx_path} has an unknown version {version} or dtype code {code}")
        needed = _HEADER_SIZE + 12 * sequences + 8 * documents  # int32 lengths, int64 pointers, int64 doc indices
        size = os.fstat(f.fileno()).st_size
        if size < needed:
            raise ValueError(f"{idx_path} is truncated: {size} bytes, its header implies {needed}")
        lengths = np.frombuffer(f.read(4 * sequences), dtype="<i4")  # cheaper than np.fromfile per small file
    if sequences and int(lengths.min()) < 0:
        raise ValueError(f"{idx_path} is corrupt: negative sequence lengths")
    return IndexInfo(lengths, _DTYPE_SIZES[code], int(documents))


def read_documents(prefix: str | Path) -> Iterator[np.ndarray]:
    """Each document's tokens (its sequences concatenated), read with megatron-core's ``IndexedDataset``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    doc_idx = dataset.document_indices
    for d in range(len(doc_idx) - 1):
        start, stop = int(doc_idx[d]), int(doc_idx[d + 1])
        parts = [np.array(dataset[i]) for i in range(start, stop)]  # copies: the mmap closes with dataset
        yield np.concatenate(parts) if parts else np.zeros(0, dtype=dataset.index.dtype)
