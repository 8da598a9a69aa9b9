"""The default training corpus: the Python standard library's own source, tokenized on the spot.

Every machine that runs this project has it, so training works with no download and no data flag. One
document per module, in sorted relative-path order, so the same Python and tokenizer give the same bytes.
The build is skipped when a manifest beside the prefix shows it is current, and is safe to start from many
processes at once (a file lock plus the writer's atomic renames).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from megatron_ext.cli import OneLineParser
from megatron_ext.data.indexed import IndexedDatasetWriter, token_dtype
from megatron_ext.data.tokenizers import TOKENIZER_TYPES, Tokenizer, build_tokenizer

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
# Tests are not representative training text and are a third of the library; idlelib and lib2to3 are
# applications/deprecated tooling rather than library code.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every candidate module, sorted by relative path."""
    root = stdlib_root() if root is None else Path(root)
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for fname in filenames:
            if fname.endswith(".py"):
                path = Path(dirpath, fname)
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


def read_module(path: Path) -> str | None:
    """A module's exact source text, or None when it is not UTF-8 or is blank (nothing to learn from)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() else None


def iter_documents(files: list[tuple[str, Path]]) -> Iterator[tuple[str, str]]:
    """(relative path, source text) of each module that becomes a document, in corpus order."""
    for rel, path in files:
        if (text := read_module(path)) is not None:
            yield rel, text


def corpus_prefix(out_dir: str | Path, tokenizer: Tokenizer) -> str:
    return str(Path(out_dir) / f"stdlib_{tokenizer.name}_text_document")


def load_manifest(prefix: str | Path) -> dict[str, Any] | None:
    """The manifest written beside a built corpus, or None if there is none (or it is unreadable)."""
    try:
        with open(f"{prefix}.json", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _inputs(tokenizer: Tokenizer, files: list[tuple[str, Path]], max_documents: int | None) -> dict[str, Any]:
    """Everything the corpus bytes depend on; a stored manifest must match it for the build to be skipped."""
    h = hashlib.sha256()
    for rel, path in files:
        h.update(f"{rel}\0{path.stat().st_size}\n".encode())
    return {
        "format": MANIFEST_FORMAT,
        "python": sys.version.split()[0],
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        "max_documents": max_documents,
        "files_sha256": h.hexdigest(),
    }


def _is_current(prefix: str, inputs: dict[str, Any]) -> dict[str, Any] | None:
    manifest = load_manifest(prefix)
    if manifest is None or any(manifest.get(k) != v for k, v in inputs.items()):
        return None
    try:
        bin_size = os.path.getsize(prefix + ".bin")
        idx_ok = os.path.isfile(prefix + ".idx")
    except OSError:
        return None
    expected = manifest.get("tokens", -1) * token_dtype(inputs["vocab_size"]).itemsize
    return manifest if idx_ok and bin_size == expected else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive flock; where the filesystem has no flock (some parallel filesystems), go on without."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as err:
            logger.warning("cannot lock %s (%s); relying on atomic renames only", path, err)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def build_builtin_corpus(out_dir: str | Path, tokenizer: Tokenizer, max_documents: int | None = None) -> str:
    """Build (or reuse) ``out_dir/stdlib_<tokenizer.name>_text_document.{bin,idx}``; returns the prefix.

    Each document is one module's source followed by ``tokenizer.eod``.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be positive or None, got {max_documents}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = corpus_prefix(out, tokenizer)
    files = stdlib_files()
    inputs = _inputs(tokenizer, files, max_documents)
    if (manifest := _is_current(prefix, inputs)) is not None:
        logger.info(
            "built-in corpus %s is current: %d documents, %d tokens",
            prefix,
            manifest["documents"],
            manifest["tokens"],
        )
        return prefix
    with _file_lock(out / ".lock"):
        if (manifest := _is_current(prefix, inputs)) is not None:  # another process built it meanwhile
            return prefix
        with contextlib.suppress(FileNotFoundError):
            os.remove(prefix + ".json")
        start = time.perf_counter()
        bar = tqdm(total=len(files), unit="doc", desc="stdlib corpus", disable=not sys.stderr.isatty())
        with bar, IndexedDatasetWriter(prefix, tokenizer.vocab_size) as writer:
            for _, path in files:
                bar.update(1)
                if (text := read_module(path)) is None:
                    continue
                ids = tokenizer.tokenize_array(text)
                doc = np.empty(ids.size + 1, dtype=np.int64)
                doc[:-1] = ids
                doc[-1] = tokenizer.eod
                writer.add_document(doc)
                if writer.num_documents == max_documents:
                    break
        manifest = {**inputs, "documents": writer.num_documents, "tokens": writer.num_tokens}
        tmp = f"{prefix}.json.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        os.replace(tmp, prefix + ".json")
    logger.info(
        "built-in corpus %s: %d documents, %d tokens in %.1f s",
        prefix,
        manifest["documents"],
        manifest["tokens"],
        time.perf_counter() - start,
    )
    return prefix


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m megatron_ext.data.builtin_corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for the .bin/.idx/.json files")
    parser.add_argument("--tokenizer-type", default="ByteTokenizer", choices=TOKENIZER_TYPES)
    parser.add_argument("--tokenizer-model", default=None, help="model file/folder for non-byte tokenizers")
    parser.add_argument("--max-documents", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    prefix = build_builtin_corpus(args.out, tokenizer, args.max_documents)
    seconds = time.perf_counter() - start
    manifest = load_manifest(prefix) or {}
    print(prefix)
    print(f"documents={manifest.get('documents')} tokens={manifest.get('tokens')} seconds={seconds:.2f}")


if __name__ == "__main__":
    main()
