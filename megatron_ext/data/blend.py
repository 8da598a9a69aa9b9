"""Two-level data blend for data lists of thousands of ``.bin/.idx`` files: files -> corpora -> blend.

megatron-core builds one GPTDataset per file and a blending index costing samples x files, all in memory.
Here each corpus (the third column of a data list) is ONE dataset over the concatenation of its files'
documents, and only the ~15 corpora are blended, so the build is vectorised numpy over documents and samples
and every index lives in ``.npy`` files that are memory-mapped when read.

Corpus dataset.  A file's weight sets its share of the corpus's *tokens* (w_f / sum of the corpus's w), so
its documents are drawn at a rate of w_f / tokens_f passes per corpus token: the file with the highest rate
makes one pass per corpus epoch and the others a fraction (or, for tiny corpora, every file several passes:
an epoch holds at least ``MIN_EPOCH_DOCS`` documents, at most ``MAX_EPOCH_DOCS``).  A file's passes are
permutations of its documents, so none repeats before the file is exhausted.  Each epoch's documents are
shuffled, packed into samples of ``seq_length + 1`` tokens across document boundaries (megatron-core's
``add_extra_token_to_sequence``), and the samples that start in the epoch are shuffled.  Epoch b depends only
on b, never on how many samples are asked for, so a corpus's sample k is the same whatever the run length or
the blend weights: that is what makes re-weighting without repeats (``start_offsets``) exact.

Blend index.  Corpus c's k-th sample sits at "time" (k + 1/2) / w_c and the blend is the merge of all corpora
by time: a deterministic low-discrepancy interleave (each corpus is at most ~1 sample off its weight over any
window), built chunk by chunk, cost samples x log(corpora).  Corpus c's k-th draw is its sample
``start_offsets[c] + k``: every corpus is consumed in order, never skipping or repeating.

Units.  Like megatron-core's GPTDataset, the unit is the sequence of the .idx (one per document in
preprocess_data output) and ``split`` ("969,30,1") picks contiguous sequence ranges of every file with the
same rounding as megatron-core's builder.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.data.indexed import read_index

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MIN_EPOCH_DOCS = 1 << 16  # smaller corpora repeat inside an epoch rather than making millions of epochs
MAX_EPOCH_DOCS = 1 << 24  # bounds the build's working memory (~0.5 GiB) for huge corpora
COUNT_BLOCK = 1 << 16  # consumed_per_corpus stores cumulative counts every COUNT_BLOCK samples
_BLEND_CHUNK = 1 << 22  # blend index built this many samples at a time
_U64 = np.uint64
PACKINGS = ("concat", "best-fit")


@dataclass(frozen=True)
class BlendSpec:
    """What the indices depend on apart from the run length: files as (weight, prefix, corpus)."""

    files: tuple[tuple[float, str, str], ...]
    seq_length: int
    seed: int = 1234
    split: str = "969,30,1"
    split_index: int = 0  # 0 train, 1 valid, 2 test
    packing: str = "concat"  # concat (cut the concatenated documents) or best-fit (whole documents, padded)

    def __post_init__(self) -> None:
        files = tuple((float(w), str(p), str(c)) for w, p, c in self.files)
        object.__setattr__(self, "files", files)
        if not files:
            raise ValueError("BlendSpec needs at least one file")
        if any(w < 0 or not math.isfinite(w) for w, _, _ in files) or sum(w for w, _, _ in files) <= 0:
            raise ValueError("file weights must be finite, non-negative and not all zero")
        if self.seq_length < 1 or self.seed < 0 or self.split_index not in (0, 1, 2):
            raise ValueError(f"bad seq_length {self.seq_length}, seed {self.seed} or split_index {self.split_index}")
        if self.packing not in PACKINGS:
            raise ValueError(f"bad packing {self.packing!r}: expected one of {', '.join(PACKINGS)}")
        split_fractions(self.split)

    def corpus_weights(self) -> dict[str, float]:
        """Total weight per corpus (sorted by name, so list order does not change the blend), positive only."""
        totals: dict[str, float] = {}
        for w, _, c in self.files:
            totals[c] = totals.get(c, 0.0) + w
        return {c: totals[c] for c in sorted(totals) if totals[c] > 0}


def split_fractions(split: str) -> list[float]:
    """'969,30,1' -> normalised [train, valid, test] fractions (missing entries are 0)."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"bad split {split!r}: expected numbers like 969,30,1") from None
    parts += [0.0] * (3 - len(parts))
    if len(parts) != 3 or any(x < 0 for x in parts) or sum(parts) <= 0:
        raise ValueError(f"bad split {split!r}: expected up to three non-negative numbers")
    total = sum(parts)
    return [x / total for x in parts]


def split_range(split: str, split_index: int, num_sequences: int) -> tuple[int, int]:
    """[begin, end) sequence range of a split, rounded as megatron-core's BlendedMegatronDatasetBuilder does."""
    fractions = split_fractions(split)
    lo = sum(fractions[:split_index])
    hi = lo + fractions[split_index]
    return int(round(lo * float(num_sequences))), int(round(hi * float(num_sequences)))


def cache_key(spec: BlendSpec, num_samples: int, start_offsets: dict[str, int] | None = None) -> str:
    """Hash of everything the indices depend on, file sizes and mtimes included (a rewritten file rebuilds)."""
    corpora = spec.corpus_weights()
    files = []
    for w, prefix, corpus in spec.files:
        stats = [(s.st_size, s.st_mtime_ns) for s in (os.stat(prefix + ".idx"), os.stat(prefix + ".bin"))]
        files.append([w, os.path.abspath(prefix), corpus, stats])
    offsets = {c: int(v) for c, v in sorted((start_offsets or {}).items()) if c in corpora}
    payload = {
        "version": CACHE_VERSION,
        "files": files,
        "seq_length": spec.seq_length,
        "seed": spec.seed,
        "split": split_fractions(spec.split),
        "split_index": spec.split_index,
        "num_samples": int(num_samples),
        "start_offsets": offsets,
        "epoch_docs": [MIN_EPOCH_DOCS, MAX_EPOCH_DOCS],
    }
    if spec.packing != "concat":  # concat caches keep their keys
        payload["packing"] = spec.packing
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _stable_hash(name: str) -> int:
    """64-bit hash of a corpus name that, unlike hash(), is the same in every process."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _segments(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group id, index within the group) of every element of consecutive groups of the given sizes; faster
    than np.repeat, which crawls on a few long int64 runs."""
    ends = np.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    group = np.cumsum(np.bincount(ends[:-1], minlength=total + 1)[:total])
    return group, np.arange(total, dtype=np.int64) - (ends - counts)[group]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a vectorised counter-based hash (no generator state to carry between epochs)."""
    with np.errstate(over="ignore"):
        x = x + _U64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


class _NpyAppender:
    """Writes a 1-D ``.npy`` chunk by chunk: the length is only known at the end, and the array never needs
    to be in memory whole.  The header (always 128 bytes for 1-D shapes) is rewritten on close."""

    def __init__(self, path: Path, dtype: np.dtype | type) -> None:
        self.dtype = np.dtype(dtype)
        self.length = 0
        self._file: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._header_bytes = self._write_header(0)

    def _write_header(self, n: int) -> int:
        self._file.seek(0)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)}
        np.lib.format.write_array_header_1_0(self._file, header)
        return self._file.tell()

    def append(self, values: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.length += len(values)

    def close(self) -> None:
        end = self._file.tell()
        if self._write_header(self.length) != self._header_bytes:
            raise RuntimeError("npy header length changed")
        self._file.seek(end)
        self._file.close()


@dataclass
class _CorpusFiles:
    """The files of one corpus restricted to the split: document (sequence) ids are concatenated."""

    prefixes: list[str]
    weights: np.ndarray  # float64 [F]
    seq_start: np.ndarray  # int64 [F]: first sequence of the split in the file
    doc_start: np.ndarray  # int64 [F + 1]: first corpus document id of each file
    sizes: np.ndarray  # int32 [docs]: token count of every corpus document


def _corpus_files(spec: BlendSpec, corpus: str) -> _CorpusFiles:
    prefixes, weights, starts, counts, sizes = [], [], [], [], []
    for w, prefix, c in spec.files:
        if c != corpus:
            continue
        lengths = read_index(prefix + ".idx").lengths
        lo, hi = split_range(spec.split, spec.split_index, len(lengths))
        prefixes.append(prefix)
        weights.append(w)
        starts.append(lo)
        counts.append(hi - lo)
        sizes.append(lengths[lo:hi])
    doc_start = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=doc_start[1:])
    return _CorpusFiles(
        prefixes, np.asarray(weights, np.float64), np.asarray(starts, np.int64), doc_start, np.concatenate(sizes)
    )


class _CorpusStream:
    """Epoch b's shuffled document list of one corpus, a pure function of (seed, corpus, b)."""

    def __init__(self, files: _CorpusFiles, seed: int, corpus: str) -> None:
        self.files = files
        self.seed = seed
        chash = _stable_hash(corpus)
        self.entropy = [seed, chash & 0xFFFFFFFF, chash >> 32]
        self.key = _mix(np.asarray([seed ^ chash], dtype=_U64))[0]
        n = np.diff(files.doc_start)
        cum = np.concatenate([[0], np.cumsum(files.sizes, dtype=np.int64)])
        tokens = cum[files.doc_start[1:]] - cum[files.doc_start[:-1]]
        usable = (files.weights > 0) & (tokens > 0)
        if not usable.any():
            raise ValueError(f"corpus {corpus!r} has no tokens with positive weight in this split")
        for i in np.flatnonzero((files.weights > 0) & ~usable):
            log.warning("%s has no tokens in this split: it is not drawn", files.prefixes[i])
        rate = np.where(usable, files.weights / np.maximum(tokens, 1), 0.0)  # passes per corpus token
        phi = rate / rate.max()  # passes per epoch when the fastest file makes one
        docs_per_epoch = float((phi * n).sum())
        if docs_per_epoch < MIN_EPOCH_DOCS:
            scale = float(math.ceil(MIN_EPOCH_DOCS / docs_per_epoch))
        elif docs_per_epoch > MAX_EPOCH_DOCS:
            scale = 1.0 / math.ceil(docs_per_epoch / MAX_EPOCH_DOCS)
        else:
            scale = 1.0
        self.n = n
        self.q = scale * phi * n  # documents each file contributes per epoch (fractional)
        self.doc_dtype = np.int32 if len(files.sizes) < 2**31 else np.int64

    def epoch(self, b: int) -> np.ndarray:
        """Documents of epoch b: file f gives its stream positions [round(b q_f), round((b+1) q_f)), where
        stream position j is document perm_{f, j // n_f}(j % n_f); then the epoch is shuffled."""
        lo = np.floor(b * self.q + 0.5).astype(np.int64)
        hi = np.floor((b + 1) * self.q + 0.5).astype(np.int64)
        count = hi - lo
        n_safe = np.maximum(self.n, 1)
        p_lo = lo // n_safe
        pairs = np.where(count > 0, (hi - 1) // n_safe - p_lo + 1, 0)  # (file, pass) pairs this epoch touches
        # A pass is an affine permutation r -> (a r + c) mod n with a coprime to n, keyed by (seed, corpus, file,
        # pass): random access, so no permutation of the file is ever materialised.
        pair_file, pair_k = _segments(pairs)
        pn = self.n[pair_file]
        h = _mix((pair_file.astype(_U64) << _U64(40)) ^ (p_lo[pair_file] + pair_k).astype(_U64) ^ self.key)
        a = (h % pn.astype(_U64)).astype(np.int64)
        c = (_mix(h) % pn.astype(_U64)).astype(np.int64)
        bad = np.gcd(a, pn) != 1
        while bad.any():  # terminates: n - 1 is coprime with n
            a[bad] += 1
            bad[bad] = np.gcd(a[bad], pn[bad]) != 1
        f, within = _segments(count)
        n = self.n[f]
        passes, r = np.divmod(lo[f] + within, n)
        pair = (np.cumsum(pairs) - pairs - p_lo)[f] + passes
        docs = (self.files.doc_start[f] + (a[pair] * r + c[pair]) % n).astype(self.doc_dtype)
        np.random.default_rng([*self.entropy, 1, b]).shuffle(docs)
        return docs


def _build_corpus(
    stream: _CorpusStream, seq_length: int, first: int, count: int, out: Path, tag: str
) -> dict[str, int]:
    """Write pool (documents in order), and samples [first, first + count) as (pool position, token offset).

    Sample k of the packed token stream starts at token k * seq_length; samples starting in epoch b are
    numbered and shuffled within that epoch, so sample numbers never depend on ``count``."""
    sizes = stream.files.sizes
    pool = _NpyAppender(out / f"{tag}_pool.npy", stream.doc_dtype)
    pos_out = _NpyAppender(out / f"{tag}_pos.npy", np.int64)
    off_out = _NpyAppender(out / f"{tag}_off.npy", np.int32)
    end = first + count
    tokens_before = 0  # tokens of all earlier epochs
    written_from = None  # pool position of the first written document (earlier epochs are skipped)
    pool_len = 0
    need_tokens = 0  # tokens the last needed sample reads up to
    b = 0
    while count > 0:
        docs = stream.epoch(b)
        cum = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(sizes[docs], out=cum[1:])
        epoch_tokens = int(cum[-1])
        k0 = -(-tokens_before // seq_length)
        k1 = -(-(tokens_before + epoch_tokens) // seq_length)
        lo, hi = max(first, k0), min(end, k1)
        if lo < hi:
            if written_from is None:
                written_from = pool_len
            perm = np.random.default_rng([*stream.entropy, 2, b]).permutation(k1 - k0)[lo - k0 : hi - k0]
            # Locate every sample start of the epoch in order (searchsorted is fast on sorted keys), then pick.
            all_starts = np.arange(k0, k1, dtype=np.int64) * seq_length - tokens_before
            idx = np.searchsorted(cum, all_starts, side="right")[perm] - 1
            starts = all_starts[perm]
            pos_out.append(pool_len + idx - written_from)
            off_out.append(starts - cum[idx])
            need_tokens = max(need_tokens, tokens_before + int(starts.max()) + seq_length + 1)
        if written_from is not None:
            if k1 >= end and tokens_before + epoch_tokens >= need_tokens:
                # Keep only the documents the last samples read into.
                docs = docs[: int(np.searchsorted(cum, need_tokens - tokens_before, side="left"))]
                pool.append(docs)
                break
            pool.append(docs)
        tokens_before += epoch_tokens
        pool_len += len(docs)
        b += 1
    for w in (pool, pos_out, off_out):
        w.close()
    return {"epochs": b + 1 if count else 0, "pool": pool.length}


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= capacity: items by decreasing length, each into the
    fullest bin it fits, the lowest-numbered of equally full ones (best-fit decreasing, deterministic). Open bins
    are kept by room left: a sorted list of the distinct rooms (at most `capacity`) and a heap of bins for each, so
    an item costs O(log) plus a move of at most `capacity` entries, however many bins are open."""
    rooms: list[int] = []  # distinct rooms of open bins, sorted
    by_room: dict[int, list[int]] = {}  # room -> heap of bin numbers
    bins: list[list[int]] = []
    for item in np.argsort(-lengths, kind="stable").tolist():
        size = int(lengths[item])
        at = bisect.bisect_left(rooms, size)
        if at < len(rooms):
            room = rooms[at]
            b = heapq.heappop(by_room[room])
            if not by_room[room]:
                del by_room[room]
                rooms.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(item)
        if room > size:
            if room - size not in by_room:
                by_room[room - size] = []
                bisect.insort(rooms, room - size)
            heapq.heappush(by_room[room - size], b)
    return bins


def _build_corpus_best_fit(
    stream: _CorpusStream, seq_length: int, first: int, count: int, out: Path, tag: str
) -> dict[str, int]:
    """Write samples [first, first + count) of whole documents: each epoch's documents (pieces of seq_length + 1
    tokens for longer ones) packed by best-fit decreasing into samples of seq_length + 1 tokens, the rest padding;
    samples shuffled within the epoch. Sample k's pieces are rows start[k]:start[k + 1] of (doc, offset, length)."""
    sizes, need = stream.files.sizes, seq_length + 1
    writers = {n: _NpyAppender(out / f"{tag}_bf_{n}.npy", np.int64) for n in ("start", "doc", "off", "len")}
    writers["start"].append(np.zeros(1, dtype=np.int64))
    end, k0, b, rows, tokens, slots = first + count, 0, 0, 0, 0, 0
    while k0 < end:
        docs = stream.epoch(b)
        doc_sizes = sizes[docs].astype(np.int64)
        doc, piece = _segments(-(-doc_sizes // need))
        offsets = piece * need
        lengths = np.minimum(doc_sizes[doc] - offsets, need)
        bins = best_fit_decreasing(lengths, need)
        order = np.random.default_rng([*stream.entropy, 3, b]).permutation(len(bins))
        chosen = order[max(first - k0, 0) : end - k0]
        counts = np.fromiter((len(bins[k]) for k in chosen), dtype=np.int64, count=len(chosen))
        items = np.fromiter(itertools.chain.from_iterable(bins[k] for k in chosen), np.int64, int(counts.sum()))
        writers["doc"].append(docs[doc[items]])
        writers["off"].append(offsets[items])
        writers["len"].append(lengths[items])
        writers["start"].append(rows + np.cumsum(counts))
        rows += int(counts.sum())
        tokens += int(lengths[items].sum())
        slots += need * len(chosen)
        k0 += len(bins)
        b += 1
    for w in writers.values():
        w.close()
    return {"epochs": b, "tokens": tokens, "padding": slots - tokens}


def _build_blend(weights: np.ndarray, num_samples: int, out: Path) -> np.ndarray:
    """Corpus id and per-corpus draw number of every global sample; returns the draws per corpus.

    Corpus c's k-th draw has time (k + 1/2) / w_c; samples are the merge by time (ties by corpus id), made in
    chunks of time so memory stays ~_BLEND_CHUNK samples."""
    w = weights / weights.sum()
    nc = len(w)
    cid_dtype = np.uint8 if nc < 256 else np.uint16
    draw_dtype = np.int32 if num_samples < 2**31 else np.int64
    cid_out = np.lib.format.open_memmap(out / "blend_corpus.npy", "w+", cid_dtype, (num_samples,))
    draw_out = np.lib.format.open_memmap(out / "blend_draw.npy", "w+", draw_dtype, (num_samples,))
    counts = np.zeros(nc, dtype=np.int64)
    done, t = 0, 0
    while done < num_samples:
        t += min(_BLEND_CHUNK, num_samples - done + nc)
        k_hi = np.maximum(np.ceil(t * w - 0.5).astype(np.int64), counts)
        # Small dtypes and per-corpus pieces: this loop is memory-bound.
        cid = np.repeat(np.arange(nc, dtype=cid_dtype), k_hi - counts)
        k = np.concatenate([np.arange(counts[c], k_hi[c], dtype=draw_dtype) for c in range(nc)])
        times = np.concatenate([(np.arange(counts[c], k_hi[c]) + 0.5) / w[c] for c in range(nc)])
        # Stable sort: equal times keep corpus order; the input is nc sorted runs, which timsort merges fast.
        order = np.argsort(times, kind="stable")[: num_samples - done]
        cid, k = cid[order], k[order]
        cid_out[done : done + len(order)] = cid
        draw_out[done : done + len(order)] = k
        counts += np.bincount(cid, minlength=nc)
        done += len(order)
    cid_out.flush()
    draw_out.flush()
    # Cumulative draws per corpus at every COUNT_BLOCK samples, for consumed_per_corpus.
    blocks = num_samples // COUNT_BLOCK
    cum = np.zeros((blocks + 1, nc), dtype=np.int64)
    step = COUNT_BLOCK * 64
    for s in range(0, blocks * COUNT_BLOCK, step):
        e = min(s + step, blocks * COUNT_BLOCK)
        ids = (np.arange(s, e) // COUNT_BLOCK) * nc + cid_out[s:e]
        cum[1 + s // COUNT_BLOCK : 1 + e // COUNT_BLOCK] = np.bincount(
            ids - (s // COUNT_BLOCK) * nc, minlength=(e - s) // COUNT_BLOCK * nc
        ).reshape(-1, nc)
    np.save(out / "blend_cum.npy", np.cumsum(cum, axis=0))  # meta["count_block"] records COUNT_BLOCK
    del cid_out, draw_out
    return counts


def build_cache(spec: BlendSpec, num_samples: int, folder: Path, start_offsets: dict[str, int]) -> dict[str, Any]:
    """Build every index of the blend into ``folder`` (which must not exist) and return its metadata."""
    t0 = time.perf_counter()
    folder.mkdir(parents=True)
    weights = spec.corpus_weights()
    corpora = list(weights)
    counts = _build_blend(np.asarray([weights[c] for c in corpora]), num_samples, folder)
    meta: dict[str, Any] = {
        "version": CACHE_VERSION,
        "seq_length": spec.seq_length,
        "num_samples": num_samples,
        "count_block": COUNT_BLOCK,
        "corpora": corpora,
        "weights": weights,
        "draws": {c: int(n) for c, n in zip(corpora, counts)},
        "start_offsets": {c: int(start_offsets.get(c, 0)) for c in corpora},
        "files": {},
        "stats": {},
    }
    for i, corpus in enumerate(corpora):
        files = _corpus_files(spec, corpus)
        first, count = meta["start_offsets"][corpus], int(counts[i])
        build = _build_corpus if spec.packing == "concat" else _build_corpus_best_fit
        stats = build(_CorpusStream(files, spec.seed, corpus), spec.seq_length, first, count, folder, f"c{i}")
        meta["stats"][corpus] = stats
        meta["files"][corpus] = {
            "prefixes": [os.path.abspath(p) for p in files.prefixes],
            "seq_start": files.seq_start.tolist(),
            "doc_start": files.doc_start.tolist(),
        }
    meta["build_seconds"] = time.perf_counter() - t0
    with open(folder / "meta.json", "w") as f:
        json.dump(meta, f)
    return meta


def _dist_rank() -> int | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return None


def ensure_cache(
    spec: BlendSpec, num_samples: int, cache_dir: str | Path, start_offsets: dict[str, int] | None = None
) -> tuple[Path, bool]:
    """The cache folder for these arguments, built if missing; returns (folder, built_here).

    Built in a private temporary folder and renamed into place, so concurrent jobs never see half a cache
    (the loser of a race drops its copy).  Under torch.distributed, rank 0 builds and the others wait at a
    barrier; cache_dir must then be shared by all ranks, as megatron-core's path_to_cache must."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    cache_dir = Path(cache_dir)
    folder = cache_dir / f"blend-{cache_key(spec, num_samples, start_offsets)}"
    rank = _dist_rank()
    built = False
    if rank in (None, 0) and not (folder / "meta.json").exists():
        tmp = cache_dir / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            meta = build_cache(spec, num_samples, tmp, start_offsets or {})
            try:
                os.rename(tmp, folder)
                built = True
                log.info("built blend cache %s in %.1f s", folder, meta["build_seconds"])
            except OSError:
                if not (folder / "meta.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if rank is not None:
        torch.distributed.barrier()
    if not (folder / "meta.json").exists():
        raise FileNotFoundError(f"blend cache {folder} is missing (is --data-cache-path shared by all ranks?)")
    return folder, built


class CorpusBlend(torch.utils.data.Dataset):
    """A blend of corpora with megatron-core GPTDataset's samples (create_attention_mask=False).

    ``start_offsets`` (samples already drawn per corpus, e.g. from an earlier blend's consumed_per_corpus)
    makes corpus c's k-th draw its sample start_offsets[c] + k, so changing weights mid-run repeats nothing.
    Token files are opened lazily, once per process; the index arrays are memory-mapped.
    """

    def __init__(
        self,
        spec: BlendSpec,
        num_samples: int,
        cache_dir: str | Path,
        start_offsets: dict[str, int] | None = None,
        eod: int = 0,
        eod_mask_loss: bool = False,
        document_boundaries: bool = False,
        reset_position_ids: bool = False,
    ) -> None:
        self.spec = spec
        self.document_boundaries = document_boundaries
        self.reset_position_ids = reset_position_ids
        self.start_offsets = {c: int(v) for c, v in (start_offsets or {}).items()}
        if any(v < 0 for v in self.start_offsets.values()):
            raise ValueError(f"start_offsets must be non-negative, got {self.start_offsets}")
        self.eod = eod
        self.eod_mask_loss = eod_mask_loss
        self.cache_path, self.built = ensure_cache(spec, num_samples, cache_dir, self.start_offsets)
        with open(self.cache_path / "meta.json") as f:
            self.meta: dict[str, Any] = json.load(f)
        self.corpora: list[str] = self.meta["corpora"]
        total = sum(self.meta["weights"].values())
        self.weights: dict[str, float] = {c: w / total for c, w in self.meta["weights"].items()}
        self._num_samples = int(self.meta["num_samples"])
        self._open_arrays()

    def _open_arrays(self) -> None:
        path = self.cache_path
        self._cid = np.load(path / "blend_corpus.npy", mmap_mode="r")
        self._draw = np.load(path / "blend_draw.npy", mmap_mode="r")
        self._cum = np.load(path / "blend_cum.npy")
        self._index: list[list[np.ndarray]] = []  # per corpus: its sample index arrays
        self._files = []
        names = ("pool", "pos", "off") if self.spec.packing == "concat" else ("bf_start", "bf_doc", "bf_off", "bf_len")
        for i, corpus in enumerate(self.corpora):
            self._index.append([np.load(path / f"c{i}_{name}.npy", mmap_mode="r") for name in names])
            info = self.meta["files"][corpus]
            self._files.append((info["prefixes"], np.asarray(info["seq_start"]), np.asarray(info["doc_start"])))
        self._readers: dict[str, IndexedDataset] = {}

    def __getstate__(self) -> dict[str, Any]:
        """DataLoader workers reopen the memory maps instead of pickling their contents."""
        keep: tuple[str, ...] = ("spec", "start_offsets", "eod", "eod_mask_loss", "document_boundaries")
        keep += ("reset_position_ids",)
        keep += ("cache_path", "built", "meta", "corpora", "weights")
        return {k: self.__dict__[k] for k in keep} | {"_num_samples": self._num_samples}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open_arrays()

    def __len__(self) -> int:
        return self._num_samples

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self._num_samples:
            raise IndexError(f"sample {i} out of range [0, {self._num_samples})")
        return i

    def padding_share(self) -> float:
        """The share of the built samples' tokens that is padding (0 when documents are concatenated and cut)."""
        stats = self.meta["stats"].values()
        padding = sum(st.get("padding", 0) for st in stats)
        return padding / max(padding + sum(st.get("tokens", 0) for st in stats), 1)

    def corpus_of(self, i: int) -> str:
        return self.corpora[int(self._cid[self._check(i)])]

    def sample_of(self, i: int) -> tuple[str, int]:
        """(corpus, that corpus's sample number) of global sample i."""
        i = self._check(i)
        corpus = self.corpora[int(self._cid[i])]
        return corpus, self.start_offsets.get(corpus, 0) + int(self._draw[i])

    def consumed_per_corpus(self, i: int) -> dict[str, int]:
        """Samples drawn per corpus after global samples [0, i): start_offsets plus the draws, for a new blend's
        start_offsets.  Corpora only in start_offsets (removed from the blend) keep their count."""
        i = int(i)
        if not 0 <= i <= self._num_samples:
            raise IndexError(f"position {i} out of range [0, {self._num_samples}]")
        block = i // self.meta["count_block"]
        start = block * self.meta["count_block"]
        counts = self._cum[block] + np.bincount(self._cid[start:i], minlength=len(self.corpora))
        out = dict(self.start_offsets)
        for corpus, n in zip(self.corpora, counts):
            out[corpus] = out.get(corpus, 0) + int(n)
        return out

    def _reader(self, prefix: str) -> IndexedDataset:
        ds = self._readers.get(prefix)
        if ds is None:
            ds = self._readers[prefix] = IndexedDataset(prefix)
        return ds

    def sample_tokens(self, i: int) -> np.ndarray:
        """The seq_length + 1 tokens of global sample i, packed across document boundaries."""
        return self.sample_documents(i)[0]

    def sample_documents(
        self, i: int, sources: list[tuple[str, np.ndarray]] | None = None
    ) -> tuple[np.ndarray, list[int], int]:
        """The seq_length + 1 tokens of global sample i, the offsets in them where a document (an .idx sequence)
        begins after the first (empty documents have none), and the padding at the end (best-fit packing: whole
        documents, the rest `eod`s, the padding one more document). `sources` gets (file prefix, tokens) of each
        piece read."""
        i = self._check(i)
        c, k = int(self._cid[i]), int(self._draw[i])
        prefixes, seq_start, doc_start = self._files[c]
        if self.spec.packing == "concat":
            pool, pos_of, off_of = self._index[c]
            pos, offset, pieces = int(pos_of[k]), int(off_of[k]), None
        else:
            start, docs, offsets, lengths = self._index[c]
            rows = slice(int(start[k]), int(start[k + 1]))
            pieces = zip(docs[rows].tolist(), offsets[rows].tolist(), lengths[rows].tolist())
        need = self.spec.seq_length + 1
        parts: list[np.ndarray] = []
        starts: list[int] = []
        length = 0
        while need > 0:
            if pieces is None:
                doc, take_at_most = int(pool[pos]), need
                pos += 1
            else:
                piece = next(pieces, None)
                if piece is None:
                    break
                doc, offset, take_at_most = piece
            f = int(np.searchsorted(doc_start, doc, side="right")) - 1
            ds = self._reader(prefixes[f])
            seq = int(seq_start[f] + doc - doc_start[f])
            take = min(int(ds.sequence_lengths[seq]) - offset, take_at_most, need)
            if take > 0:
                if parts:
                    starts.append(length)
                parts.append(ds.get(seq, offset, take))
                if sources is not None:
                    sources.append((prefixes[f], parts[-1]))
                need -= take
                length += take
            offset = 0
        if need > 0:
            starts.append(length)
            parts.append(np.full(need, self.eod))
        return np.concatenate(parts).astype(np.int64), starts, need

    def token_source(self, i: int, vocab_size: int) -> tuple[str, int]:
        """Where global sample i holds a token id >= vocab_size: ('data file PREFIX (corpus C)', the id)."""
        sources: list[tuple[str, np.ndarray]] = []
        self.sample_documents(i, sources)
        prefix, tokens = next((p, t) for p, t in sources if len(t) and int(t.max()) >= vocab_size)
        return f"data file {prefix} (corpus {self.corpus_of(i)})", int(tokens.max())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        text, starts, padding = self.sample_documents(i)
        return gpt_sample(
            torch.from_numpy(text), starts if self.document_boundaries else None, self.eod, self.eod_mask_loss,
            self.reset_position_ids, padding,
        )  # fmt: skip


def gpt_sample(
    text: torch.Tensor,
    starts: list[int] | None,
    eod: int,
    eod_mask_loss: bool,
    reset_position_ids: bool,
    padding: int = 0,
) -> dict[str, torch.Tensor]:
    """A training sample from seq_length + 1 tokens: tokens, labels, loss mask, positions and, given the offsets
    `starts` where documents begin (after the first), `cu_seqlens` (int32 document bounds over the tokens).

    With boundaries, the last token of a document does not count in the loss (its label is the next document's
    first token, which attention cannot see), positions restart at each document with `reset_position_ids`, and
    `eod_mask_loss` (Megatron-LM's) drops the tokens after an EOD as well, for data whose documents end in one.
    The last `padding` tokens of `text` are never trained on."""
    tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
    s = len(tokens)
    loss_mask = torch.ones(s, dtype=torch.float32)
    loss_mask[s + 1 - padding :] = 0.0
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    position_ids = torch.arange(s, dtype=torch.int64)
    sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
    if starts is None:
        return sample
    loss_mask[[p - 1 for p in starts]] = 0.0
    bounds = [0, *(p for p in starts if p < s), s]
    sample["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
    if reset_position_ids:
        lengths = torch.tensor(bounds[1:]) - torch.tensor(bounds[:-1])
        position_ids -= torch.repeat_interleave(torch.tensor(bounds[:-1]), lengths)
    return sample
