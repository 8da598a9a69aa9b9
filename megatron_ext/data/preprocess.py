"""Tokenize jsonl corpora into Megatron ``.bin``/``.idx`` datasets, one per json key (Megatron-LM's naming).

Each non-blank json line is one document (one sequence) per key: ``{prefix}_{key}_document.bin/.idx``.
The main process reads lines (plain, ``.gz`` or ``.zst``) in batches; workers parse the json and tokenize;
``Pool.imap`` hands the batches back in input order, so the output bytes do not depend on ``--workers``.
Outputs are published only at the very end (the writer renames its temporaries), so an error, Ctrl-C or
SIGTERM leaves no partial dataset and never damages an existing one.

    python tools/preprocess_data.py --input DATA [DATA ...] --output-prefix PREFIX --tokenizer-type T
        [--tokenizer-model M] [--json-keys text ...] [--append-eod] [--workers N] [--chunk-size N]
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import gzip
import io
import json
import multiprocessing
import multiprocessing.pool
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from tqdm import tqdm

from megatron_ext.cli import OneLineParser, UserError, os_reason, report
from megatron_ext.config import file_in_the_way
from megatron_ext.data.indexed import IndexedDatasetWriter, remove_stale_temporaries, token_dtype
from megatron_ext.data.tokenizers import TOKENIZER_TYPES, Tokenizer, build_tokenizer

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
DEFAULT_CHUNK_SIZE = 256
# A batch is also cut at this many bytes, so a corpus of huge documents does not pile up in memory.
_MAX_BATCH_BYTES = 8 << 20
# How often the main process checks that no worker died while it waits for a result (seconds).
_WATCHDOG_INTERVAL = 0.25


class PreprocessError(UserError, ValueError):
    """A user mistake (missing file, bad json line, ...); the message is one line naming the file (and line)."""


@dataclass
class PreprocessStats:
    """What one run did; the report line is built from it."""

    outputs: dict[str, str] = field(default_factory=dict)  # json key -> output prefix
    dtype: str = ""
    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # per json key
    bytes_read: int = 0  # decompressed json text, blank lines included
    bad_lines: int = 0
    seconds: float = 0.0

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    @property
    def tokens_per_s(self) -> float:
        return self.total_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        """The human summary the CLI prints at the end."""
        files = ", ".join(f"{p}.bin/.idx" for p in self.outputs.values())
        line = (
            f"documents {self.documents:,}  tokens {self.total_tokens:,}  bytes read {self.bytes_read / 1e6:,.1f} MB  "
            f"seconds {self.seconds:.2f}  tokens/s {self.tokens_per_s:,.0f}  MB/s {self.mb_per_s:,.1f}"
        )
        if self.bad_lines:
            line += f"  skipped bad lines {self.bad_lines:,}"
        return f"wrote {files} ({self.dtype})\n{line}"


# ---- inputs -----------------------------------------------------------------------------------------------


def find_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Input files in order: files as given, and each folder's ``*.jsonl[.gz|.zst]`` files, sorted by name."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(INPUT_SUFFIXES))
            if not files:
                raise PreprocessError(f"{path}: folder holds no {', '.join(INPUT_SUFFIXES)} files")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise PreprocessError(f"{path}: no such file or folder")
    if not found:
        raise PreprocessError("no input files given")
    return found


@contextlib.contextmanager
def open_input(path: Path) -> Iterator[io.BufferedIOBase]:
    """The file's decompressed bytes, streamed (nothing is decompressed to disk or held in memory)."""
    if path.name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield f
    elif path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as err:
            raise PreprocessError(f"{path}: reading .zst files needs the zstandard package") from err
        with open(path, "rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with io.BufferedReader(reader) as f:
                yield f
    else:
        with open(path, "rb") as f:
            yield f


@dataclass
class _Batch:
    """Lines sent to a worker; ``linenos`` are 1-based physical line numbers for error messages."""

    file_index: int
    linenos: list[int]
    lines: list[bytes]
    num_bytes: int


def _read_batches(files: Sequence[Path], chunk_size: int) -> Iterator[_Batch]:
    """Batches of non-blank lines; a batch never spans two files, so its line numbers name one file."""
    for file_index, path in enumerate(files):
        linenos: list[int] = []
        lines: list[bytes] = []
        size = 0
        try:
            with open_input(path) as f:
                for lineno, line in enumerate(f, start=1):
                    size += len(line)
                    if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                        line = line[len(codecs.BOM_UTF8) :]
                    if line.isspace() or not line:
                        continue
                    linenos.append(lineno)
                    lines.append(line)
                    if len(lines) >= chunk_size or size >= _MAX_BATCH_BYTES:
                        yield _Batch(file_index, linenos, lines, size)
                        linenos, lines, size = [], [], 0
        except (OSError, EOFError) as err:  # corrupt/truncated gzip or zstd, unreadable file
            raise PreprocessError(f"{path}: cannot read: {err}") from err
        except Exception as err:
            if type(err).__module__.startswith("zstandard"):
                raise PreprocessError(f"{path}: cannot read: {err}") from err
            raise
        if lines or size:
            yield _Batch(file_index, linenos, lines, size)


# ---- workers ----------------------------------------------------------------------------------------------


@dataclass
class _Encoded:
    """A tokenized batch: per key, the documents' tokens back to back plus each document's length."""

    file_index: int
    num_bytes: int
    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    bad: list[tuple[int, str]]  # (line number, reason), in line order


class _Encoder:
    """Parses and tokenizes batches; one per worker process (built once by the pool initializer)."""

    def __init__(self, tokenizer: Tokenizer, keys: Sequence[str], append_eod: bool) -> None:
        self.tokenizer = tokenizer
        self.keys = list(keys)
        self.eod = np.array([tokenizer.eod], dtype=np.int64) if append_eod else None
        self.vocab_size = tokenizer.vocab_size
        self.dtype = token_dtype(tokenizer.vocab_size)
        self._decode = json.JSONDecoder().decode  # what json.loads calls, minus its per-call encoding sniffing

    def __call__(self, batch: _Batch) -> _Encoded:
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
        lengths: dict[str, list[int]] = {k: [] for k in self.keys}
        bad: list[tuple[int, str]] = []
        decode, keys, tokenize = self._decode, self.keys, self.tokenizer.tokenize_array
        for lineno, line in zip(batch.linenos, batch.lines):
            try:
                doc = decode(line.decode("utf-8"))
                texts = [doc[k] for k in keys]
                if not all(type(t) is str for t in texts):
                    raise TypeError
            except (ValueError, LookupError, TypeError):  # the fast path failed: find out why, once
                bad.append((lineno, self._diagnose(line)))
                continue
            try:
                encoded = [tokenize(t) for t in texts]
            except UnicodeError:  # json allows lone surrogates ("\ud800") that no UTF-8 tokenizer can encode
                bad.append((lineno, "text is not valid Unicode (lone surrogate)"))
                continue
            # A line is kept for all keys or none, so document i is the same line in every output.
            for key, ids in zip(self.keys, encoded):
                parts[key].append(ids)
                if self.eod is not None:
                    parts[key].append(self.eod)
                lengths[key].append(len(ids) + (1 if self.eod is not None else 0))
        tokens = {k: self._pack(parts[k]) for k in self.keys}
        return _Encoded(
            batch.file_index, batch.num_bytes, tokens, {k: np.asarray(v, np.int64) for k, v in lengths.items()}, bad
        )

    def _diagnose(self, line: bytes) -> str:
        """Why a line failed the fast path, for the one-line error message."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            return f"not valid UTF-8 (byte {err.start})"
        try:
            doc = json.loads(text)
        except ValueError:
            return "not a valid JSON line"
        if not isinstance(doc, dict):
            return "not a JSON object"
        missing = next((k for k in self.keys if k not in doc), None)
        if missing is not None:
            return f"no key {missing!r}"
        wrong = next((k for k in self.keys if not isinstance(doc[k], str)), None)
        if wrong is not None:
            return f"key {wrong!r} is {type(doc[wrong]).__name__}, not a string"
        return "not a valid JSON line"

    def _pack(self, parts: list[np.ndarray]) -> np.ndarray:
        """One array in the output dtype (smaller to pickle back), checked first so a cast cannot wrap ids."""
        if not parts:
            return np.zeros(0, dtype=self.dtype)
        flat = np.concatenate(parts)
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= self.vocab_size):
            raise ValueError(f"tokenizer produced ids outside [0, {self.vocab_size}): {flat.min()}..{flat.max()}")
        return flat.astype(self.dtype, copy=False)


_WORKER_ENCODER: _Encoder | None = None
_POOL_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _init_worker(
    tokenizer_type: str, tokenizer_model: str | None, keys: list[str], append_eod: bool, files: dict[str, Any]
) -> None:
    """Build this worker's tokenizer once; leave Ctrl-C to the main process, which terminates the pool."""
    global _WORKER_ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits the CLI's raising handler
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _POOL_SIGNALS)  # see _worker_pool
    _WORKER_ENCODER = _Encoder(build_tokenizer(tokenizer_type, tokenizer_model, **files), keys, append_eod)


def _encode_in_worker(batch: _Batch) -> _Encoded:
    assert _WORKER_ENCODER is not None, "pool initializer did not run"
    return _WORKER_ENCODER(batch)


@contextlib.contextmanager
def _worker_pool(workers: int, initargs: tuple) -> Iterator[multiprocessing.pool.Pool]:
    """A Pool that cannot hang on the way out of an error: Pool.terminate() can deadlock joining a task-feeder
    thread blocked on a full pipe (seen under load), so the workers are killed first and the wait is bounded.

    The pool is created with SIGINT/SIGTERM blocked: its threads keep that mask, so every worker (including
    the replacements its maintenance thread forks while the pool is being torn down) starts with them blocked
    until ``_init_worker`` has installed the worker's own handlers. Otherwise ``terminate()`` can reach a fresh
    worker that still runs the CLI's raising handler, and the user sees a worker's traceback."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _POOL_SIGNALS)
    try:
        pool = multiprocessing.Pool(workers, _init_worker, initargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    try:
        yield pool
    except BaseException:
        for process in getattr(pool, "_pool", []):
            process.kill()
        # terminate() reaps the workers and the pool's threads; it can still block in CPython's handler threads,
        # so it runs aside and is given a bounded time: the error must reach the user either way.
        closer = threading.Thread(target=pool.terminate, daemon=True)
        closer.start()
        closer.join(timeout=10)
        raise
    pool.close()
    pool.join()


def _pool_results(pool: multiprocessing.pool.Pool, batches: Iterator[_Batch]) -> Iterator[_Encoded]:
    """``imap`` results in order, failing (instead of hanging forever, as Pool does) if a worker dies."""
    workers = list(getattr(pool, "_pool", []))  # Pool replaces a dead worker silently and loses its task
    results = pool.imap(_encode_in_worker, batches)
    while True:
        try:
            yield results.next(timeout=_WATCHDOG_INTERVAL)
        except StopIteration:
            return
        except multiprocessing.TimeoutError:
            dead = [p for p in workers if p.exitcode is not None]
            if dead:
                raise RuntimeError(
                    f"a preprocessing worker died (pid {dead[0].pid}, exit code {dead[0].exitcode})"
                ) from None


# ---- the run ----------------------------------------------------------------------------------------------


def dataset_prefix(prefix: str | Path, key: str) -> str:
    """Megatron-LM's name for one key's dataset: ``{prefix}_{key}_document``."""
    return f"{prefix}_{key}_document"


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while outputs are renamed into place, so all keys' datasets appear or none do."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    old = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def preprocess(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer_type: str,
    tokenizer_model: str | Path | None = None,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    skip_bad_lines: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    tokenizer_files: dict[str, Any] | None = None,
) -> PreprocessStats:
    """Tokenize ``inputs`` into one dataset per json key; raises :class:`PreprocessError` for user mistakes.

    ``workers=1`` tokenizes in this process (no pickling); more uses a process pool. Either way the outputs
    are byte-identical. Nothing is published unless the whole run succeeds: any exception, KeyboardInterrupt
    included, deletes the temporaries. (SIGTERM kills a Python process without clean-up unless a handler turns
    it into an exception, as :func:`main` does.) ``tokenizer_files``: the other arguments the tokenizer type needs
    (``vocab_file``/``merge_file`` of GPT2BPETokenizer, ``vocab_size`` of NullTokenizer).
    """
    start = time.perf_counter()
    keys = list(json_keys)
    if not keys:
        raise PreprocessError("--json-keys needs at least one key")
    if len(set(keys)) != len(keys):
        raise PreprocessError(f"--json-keys {' '.join(keys)}: a key is repeated")
    if workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {workers}")
    if chunk_size < 1:
        raise PreprocessError(f"--chunk-size must be at least 1, got {chunk_size}")
    check_output_prefix(output_prefix)
    files = find_inputs(inputs)
    model = str(tokenizer_model) if tokenizer_model else None
    tokenizer_args = dict(tokenizer_files or {})
    try:
        tokenizer = build_tokenizer(tokenizer_type, model, **tokenizer_args)
    except ValueError as err:
        raise PreprocessError(str(err)) from err
    prefixes = {k: dataset_prefix(output_prefix, k) for k in keys}
    dtype = token_dtype(tokenizer.vocab_size).name
    stats = PreprocessStats(outputs=prefixes, dtype=dtype, tokens=dict.fromkeys(keys, 0))
    folder = Path(output_prefix).absolute().parent
    try:  # the output side: a read-only or full disk is one line naming the folder, not an OSError traceback
        folder.mkdir(parents=True, exist_ok=True)
        for prefix in prefixes.values():
            remove_stale_temporaries(prefix)

        with contextlib.ExitStack() as stack:
            writers = {
                k: stack.enter_context(IndexedDatasetWriter(p, tokenizer.vocab_size)) for k, p in prefixes.items()
            }
            bar = stack.enter_context(tqdm(unit=" docs", unit_scale=True, file=sys.stderr, disable=not progress))
            batches = _read_batches(files, chunk_size)
            if workers == 1:
                encoder = _Encoder(tokenizer, keys, append_eod)
                results: Iterator[_Encoded] = map(encoder, batches)
            else:
                pool = stack.enter_context(
                    _worker_pool(workers, (tokenizer_type, model, keys, append_eod, tokenizer_args))
                )
                results = _pool_results(pool, batches)
            for enc in results:
                stats.bytes_read += enc.num_bytes
                if enc.bad:
                    if not skip_bad_lines:
                        lineno, reason = enc.bad[0]
                        raise PreprocessError(f"{files[enc.file_index]}:{lineno}: {reason}")
                    stats.bad_lines += len(enc.bad)
                for key, writer in writers.items():
                    flat, lengths = enc.tokens[key], enc.lengths[key]
                    ends = np.cumsum(lengths).tolist()
                    begin = 0
                    for end in ends:
                        writer.add_document(flat[begin:end])
                        begin = end
                    stats.tokens[key] += int(flat.size)
                docs = len(enc.lengths[keys[0]])
                stats.documents += docs
                bar.update(docs)
            if stats.documents == 0:
                where = str(files[0]) if len(files) == 1 else f"{len(files)} input files"
                raise PreprocessError(f"{where}: no documents" + (" (every line was bad)" if stats.bad_lines else ""))
            empty = [k for k, n in stats.tokens.items() if n == 0]
            if empty:
                raise PreprocessError(
                    f"key {empty[0]!r}: every document is empty; megatron-core cannot read an empty .bin"
                )
            with _signals_deferred():
                for writer in writers.values():
                    writer.finalize()
    except OSError as err:
        raise PreprocessError(f"--output-prefix {output_prefix}: cannot write in {folder}: {os_reason(err)}") from err
    stats.seconds = time.perf_counter() - start
    if log is not None:
        log(stats.report())
    return stats


# ---- command line -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``tools/preprocess_data.py`` flags (Megatron-LM's names where it has them)."""
    p = OneLineParser(
        prog="preprocess_data.py",
        description="Tokenize jsonl (.jsonl, .jsonl.gz, .jsonl.zst) into Megatron .bin/.idx datasets.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="jsonl files and/or folders of them")
    p.add_argument("--output-prefix", required=True, help="writes {PREFIX}_{key}_document.bin/.idx per json key")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece .model or Hugging Face tokenizer path")
    p.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    p.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    p.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: ids below this are tokens")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize, one output each")
    p.add_argument("--append-eod", action="store_true", help="append the tokenizer's eod id to every document")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (1: in this process)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="lines per batch sent to a worker")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad lines instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM takes the same clean-up path as Ctrl-C: writers delete temporaries, the pool is terminated."""
    raise KeyboardInterrupt(signum)


def check_output_prefix(prefix: str | Path) -> None:
    """The folders of an output prefix must be folders (or not exist yet, to be created)."""
    blocker = file_in_the_way(Path(prefix).absolute().parent)
    if blocker is not None:
        raise PreprocessError(f"--output-prefix {prefix}: {blocker} is a file; expected a folder")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for user mistakes, 128+signal when interrupted)."""
    args = build_parser().parse_args(argv)
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        stats = preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer_type,
            args.tokenizer_model,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            chunk_size=args.chunk_size,
            skip_bad_lines=args.skip_bad_lines,
            progress=not args.quiet and sys.stderr.isatty(),
            tokenizer_files={
                "vocab_file": args.vocab_file,
                "merge_file": args.merge_file,
                "vocab_size": args.vocab_size,
            },
        )
    except UserError as err:
        return report(err)
    except KeyboardInterrupt as err:
        signum = err.args[0] if err.args and isinstance(err.args[0], int) else int(signal.SIGINT)
        # Outputs are all-or-nothing: either the run finished publishing or nothing of it is left behind.
        print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, old_term)
    print(stats.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
