"""Data lists: the ``weight prefix corpus`` files that describe a training mixture of thousands of datasets.

A data list replaces Megatron's ``--data-path w1 p1 w2 p2 ...`` once the mixture grows past what fits on a command
line (ALCF runs blend thousands of Dolma shards). The format is in ``data_lists/README.md``. Every mistake found
here raises :class:`DataListError` with one line that starts with ``file:line:`` and says what was expected,
because a user with 2,500 lines needs to be pointed at the bad one, not handed a traceback from deep inside
megatron-core an hour into a queued job.

Checks read only ``stat`` and the ``.idx`` header and sequence lengths (never the ``.bin`` and never
megatron-core's ``IndexedDataset``; the reader is :func:`megatron_ext.data.indexed.read_index`), so a full list
validates in well under a second. The module imports only numpy: the command-line tools built on it must start
fast on a login node.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from megatron_ext.cli import UserError, format_table
from megatron_ext.data.indexed import read_index

# A comment starts with '#' at the start of a line or after whitespace, so a path may still contain '#'.
_COMMENT = re.compile(r"(^|\s)#.*$")


class DataListError(UserError, ValueError):
    """A mistake in a data list or the files it names; the message is one ``file:line: ...`` line."""


@dataclass(frozen=True)
class DataEntry:
    """One dataset in a mixture; ``source`` (``file:line``) is where it was listed, for error messages."""

    weight: float
    prefix: str
    corpus: str
    source: str


@dataclass(frozen=True)
class CorpusRow:
    """Per-corpus summary; ``share`` is the corpus's fraction of all weight, i.e. of the samples drawn."""

    corpus: str
    files: int
    tokens: int
    weight: float
    share: float


# ---- parsing ------------------------------------------------------------------------------------------------


def corpus_from_prefix(prefix: str) -> str:
    """The name of the prefix's folder: the default corpus label when a line or --data-path gives none."""
    return Path(os.path.abspath(prefix)).parent.name or "root"


def _parse_weight(text: str, source: str, expected: str = "'weight prefix [corpus]'") -> float:
    try:
        return float(text)
    except ValueError:
        raise DataListError(f"{source}: weight {text!r} is not a number; expected {expected}") from None


def parse_data_list(path: str | os.PathLike[str]) -> list[DataEntry]:
    """Read one list; relative prefixes are taken relative to the list's own folder, so lists can be moved
    together with their data and used from any working directory."""
    path = str(path)
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a list saved by a Windows editor starts with a BOM
            lines = f.read().splitlines()
    except OSError as e:
        raise DataListError(f"{path}: cannot read data list: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise DataListError(f"{path}: not a UTF-8 text file; expected lines 'weight prefix [corpus]'") from None
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    for number, raw in enumerate(lines, start=1):
        source = f"{path}:{number}"
        if "\0" in raw:  # no path can hold one (os calls raise ValueError); usually a binary or damaged file
            raise DataListError(f"{source}: NUL byte in the line; expected text lines 'weight prefix [corpus]'")
        fields = _COMMENT.sub("", raw).split()
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise DataListError(
                f"{source}: {len(fields)} columns; expected 'weight prefix [corpus]' (2 or 3, no spaces in paths)"
            )
        weight = _parse_weight(fields[0], source)
        prefix = os.path.normpath(os.path.join(base, os.path.expanduser(fields[1])))
        corpus = fields[2] if len(fields) == 3 else corpus_from_prefix(prefix)
        entries.append(DataEntry(weight, prefix, corpus, source))
    if not entries:
        raise DataListError(f"{path}: no datasets listed; expected lines 'weight prefix [corpus]'")
    return entries


def parse_data_lists(paths: Iterable[str | os.PathLike[str]]) -> list[DataEntry]:
    """Several lists, concatenated in order (one mixture; a prefix in two lists is a duplicate)."""
    entries: list[DataEntry] = []
    for path in paths:
        entries.extend(parse_data_list(path))
    return entries


def parse_data_path(tokens: Sequence[str]) -> list[DataEntry]:
    """Megatron's ``--data-path``: ``w1 p1 w2 p2 ...`` or one prefix (weight 1); corpus from the parent folder.

    A list of several prefixes without weights (which megatron-core blends by size) is refused: its mixture
    depends on the files, and a data list states it explicitly.
    """
    tokens = list(tokens)
    if not tokens:
        raise DataListError("--data-path: no datasets given; expected 'weight prefix [weight prefix ...]' or a prefix")
    if len(tokens) == 1:
        return [DataEntry(1.0, tokens[0], corpus_from_prefix(tokens[0]), "--data-path:1")]
    if len(tokens) % 2:
        raise DataListError(f"--data-path: {len(tokens)} items; expected pairs 'weight prefix' (or a single prefix)")
    entries = []
    for i in range(0, len(tokens), 2):
        source = f"--data-path:{i // 2 + 1}"
        weight = _parse_weight(tokens[i], source, "pairs 'weight prefix'")
        entries.append(DataEntry(weight, tokens[i + 1], corpus_from_prefix(tokens[i + 1]), source))
    return entries


def _extension_hint(prefix: str) -> str:
    return "; drop the extension, list the prefix" if prefix.endswith((".idx", ".bin")) else ""


def missing_file(entry: DataEntry) -> str | None:
    """The problem when the entry's ``.idx`` or ``.bin`` is not on this machine, else None."""
    idx, bin_ = entry.prefix + ".idx", entry.prefix + ".bin"
    if not os.path.isfile(idx):
        hint = _extension_hint(entry.prefix)
        return f"{entry.source}: {idx} not found; expected a .bin/.idx pair at this prefix{hint}"
    if not os.path.exists(bin_):
        return f"{entry.source}: {bin_} not found; expected a .bin next to {os.path.basename(idx)}"
    return None


def _check_files(entry: DataEntry, check_sizes: bool, missing_ok: bool = False) -> tuple[str | None, int]:
    """The problem with one entry's files (or None) and its token count (0 when not read)."""
    missing = missing_file(entry)
    if missing is not None:
        return None if missing_ok else missing, 0
    if not check_sizes:
        return None, 0
    idx, bin_ = entry.prefix + ".idx", entry.prefix + ".bin"
    bin_size = os.stat(bin_).st_size
    try:
        info = read_index(idx)
    except (OSError, ValueError) as e:
        return f"{entry.source}: {e}; re-run preprocessing for this prefix", 0
    if info.tokens == 0:
        return f"{entry.source}: {entry.prefix} has no tokens; megatron-core cannot read an empty dataset", 0
    if bin_size != info.bin_size:
        return (
            f"{entry.source}: {bin_} has {bin_size} bytes but the .idx implies {info.bin_size} "
            f"({info.tokens} tokens x {info.token_size} bytes); the pair is mismatched or truncated"
        ), info.tokens
    return None, info.tokens


_THREADS = 16  # file checks are stat/open/read latency (Lustre, GPFS): threads overlap it, the GIL is released
_T = TypeVar("_T")


def _map_files(fn: Callable[[DataEntry], _T], entries: Sequence[DataEntry]) -> list[_T]:
    """``[fn(e) for e in entries]``, on a thread pool when there are enough files for it to pay off."""
    if len(entries) < 4 * _THREADS:
        return [fn(e) for e in entries]
    with ThreadPoolExecutor(_THREADS) as pool:
        return list(pool.map(fn, entries, chunksize=32))


def find_problems(entries: Sequence[DataEntry], check_sizes: bool = True, missing_ok: bool = False) -> list[str]:
    """Every problem in a mixture, one line each, in list order (for tools that want to show them all).
    ``missing_ok``: datasets whose files are not on this machine are no problem (lists written before staging)."""
    if not entries:
        return ["no datasets given; expected at least one 'weight prefix [corpus]' line"]
    problems = []
    seen: dict[str, str] = {}
    file_checks = _map_files(lambda e: _check_files(e, check_sizes, missing_ok)[0], entries)
    for entry, file_problem in zip(entries, file_checks):
        w = entry.weight
        if not math.isfinite(w):
            problems.append(f"{entry.source}: weight {w} is not finite; expected a number >= 0")
        elif w < 0:
            problems.append(f"{entry.source}: weight {w!r} is negative; expected a number >= 0")
        key = os.path.normpath(os.path.abspath(entry.prefix))
        if key in seen:
            problems.append(
                f"{entry.source}: duplicate prefix {entry.prefix}, already listed at {seen[key]}; "
                "list each prefix once (add the weights)"
            )
        else:
            seen[key] = entry.source
        if file_problem:
            problems.append(file_problem)
    if all(e.weight == 0 for e in entries):
        files = sorted({e.source.rsplit(":", 1)[0] for e in entries})
        problems.append(f"{', '.join(files)}: all {len(entries)} weights are zero; expected at least one positive")
    return problems


def validate(entries: Sequence[DataEntry], check_sizes: bool = True, missing_ok: bool = False) -> None:
    """Raise :class:`DataListError` for the first problem (its one line, plus how many more there are).

    Checks weights (finite, >= 0, not all zero), duplicate prefixes, that each ``.idx``/``.bin`` exists (unless
    ``missing_ok``) and, with ``check_sizes``, that each ``.bin`` has exactly the size its ``.idx`` implies.
    """
    problems = find_problems(entries, check_sizes, missing_ok)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DataListError(problems[0] + more)


def missing_files(entries: Sequence[DataEntry]) -> list[str]:
    """The :func:`missing_file` line of each dataset not on this machine, in list order."""
    return [m for m in _map_files(missing_file, entries) if m is not None]


def token_counts(entries: Sequence[DataEntry]) -> np.ndarray:
    """Tokens per dataset (int64, list order), from the ``.idx`` sequence lengths alone."""

    def count(entry: DataEntry) -> int:
        try:
            return read_index(entry.prefix + ".idx").tokens
        except FileNotFoundError:
            raise DataListError(f"{entry.source}: {entry.prefix}.idx not found") from None
        except (OSError, ValueError) as e:
            raise DataListError(f"{entry.source}: {e}") from None

    return np.array(_map_files(count, entries), dtype=np.int64)


def corpus_table(entries: Sequence[DataEntry], tokens: np.ndarray | None = None) -> list[CorpusRow]:
    """One row per corpus, sorted by name; ``tokens`` (from :func:`token_counts`) saves re-reading the files."""
    if tokens is None:
        tokens = token_counts(entries)
    total = math.fsum(e.weight for e in entries)
    groups: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        groups.setdefault(entry.corpus, []).append(i)
    rows = []
    for corpus in sorted(groups):
        idx = groups[corpus]
        weight = math.fsum(entries[i].weight for i in idx)
        rows.append(CorpusRow(corpus, len(idx), int(tokens[idx].sum()), weight, weight / total if total else 0.0))
    return rows


# ---- mixing -------------------------------------------------------------------------------------------------


def prefix_key(prefix: str) -> str:
    """The form in which two spellings of one dataset compare equal (``a/../b`` and ``b``, relative and absolute)."""
    return os.path.normpath(os.path.abspath(prefix))


def _list_name(entries: Sequence[DataEntry]) -> str:
    """The file(s) the entries came from (``source`` minus ``:line``), for errors about a whole list."""
    return ", ".join(sorted({e.source.rsplit(":", 1)[0] for e in entries}))


def mix_lists(inputs: Sequence[tuple[float, Sequence[DataEntry]]]) -> list[DataEntry]:
    """One mixture in which input i gets the share ``w_i / sum(w)`` of the samples, in its own proportions.

    Each list's weights are divided by their own sum first, so lists written on different scales (token
    counts, percentages) mix as their shares say. Weights stay full precision (a 1e-12 dataset keeps its tiny
    share instead of vanishing), a prefix listed by several inputs becomes one entry with the weights added
    (megatron-core would otherwise count it twice), and inputs with a zero share are left out.
    """
    for share, entries in inputs:
        if not math.isfinite(share) or share < 0:
            raise DataListError(f"{_list_name(entries) or 'mix'}: share {share!r} must be a finite number >= 0")
        for e in entries:
            if not math.isfinite(e.weight) or e.weight < 0:
                raise DataListError(f"{e.source}: weight {e.weight!r} must be a finite number >= 0")
        if entries and all(e.weight == 0 for e in entries):
            raise DataListError(
                f"{_list_name(entries)}: all {len(entries)} weights are zero; cannot renormalise the list"
            )
    total = math.fsum(share for share, _ in inputs)
    if total <= 0:
        raise DataListError("mix: every input has a zero share; expected at least one positive")
    merged: dict[str, DataEntry] = {}
    for share, entries in inputs:
        if share == 0:
            continue
        if not entries:
            raise DataListError(f"mix: an input with share {share!r} lists no datasets")
        scale = share / total
        list_sum = math.fsum(e.weight for e in entries)
        for e in entries:
            weight = scale * (e.weight / list_sum)
            key = prefix_key(e.prefix)
            first = merged.get(key)
            if first is None:
                merged[key] = DataEntry(weight, e.prefix, e.corpus, e.source)
            elif first.corpus != e.corpus:
                raise DataListError(
                    f"{e.source}: {e.prefix} is labelled {e.corpus!r} here but {first.corpus!r} at {first.source}; "
                    "expected one corpus label per prefix"
                )
            else:
                merged[key] = DataEntry(first.weight + weight, first.prefix, first.corpus, first.source)
    return list(merged.values())


# ---- writing ------------------------------------------------------------------------------------------------


def format_weight(weight: float) -> str:
    """Shortest text that reads back as exactly the same float: a 1e-12 weight must not become 0."""
    return repr(float(weight))


def format_data_list(entries: Sequence[DataEntry], header: str | None = None) -> str:
    """The text of a data list: ``header`` as ``#`` comments, then one ``weight prefix corpus`` line per entry.

    Prefixes are written absolute: a relative one would be re-read relative to the list's folder, not the cwd.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    for entry in entries:
        prefix = os.path.abspath(entry.prefix)
        for field in (prefix, entry.corpus):
            if not field or any(c.isspace() for c in field) or field.startswith("#"):
                raise DataListError(
                    f"{entry.source}: {field!r} cannot be written to a data list; expected no spaces, not empty, "
                    "no leading '#'"
                )
        lines.append(f"{format_weight(entry.weight)} {prefix} {entry.corpus}")
    return "\n".join(lines) + "\n"


def write_data_list(entries: Sequence[DataEntry], path: str | os.PathLike[str], header: str | None = None) -> None:
    """Write the list atomically (tmp + rename): a reader, or a failed run, never sees a half-written list, and
    an existing list is replaced only once the new one is whole."""
    path = str(path)
    if os.path.isdir(path):
        raise DataListError(f"{path}: is a folder; expected a data list file to write")
    text = format_data_list(entries, header)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise DataListError(f"{path}: cannot write ({e.strerror or e})") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---- printed by the command-line tools -----------------------------------------------------------------------


def format_corpus_table(rows: Sequence[CorpusRow]) -> str:
    """The summary printed by the tools: files, tokens, weight and share per corpus, with a total line."""
    body = [[r.corpus, str(r.files), f"{r.tokens:,}", f"{r.weight:.6g}", f"{r.share:.4%}"] for r in rows]
    total_weight = math.fsum(r.weight for r in rows)
    total = ["TOTAL", str(sum(r.files for r in rows)), f"{sum(r.tokens for r in rows):,}", f"{total_weight:.6g}"]
    return format_table(["corpus", "files", "tokens", "weight", "share"], [*body, [*total, "100.0000%"]])
