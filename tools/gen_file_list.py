"""Write a data list for every Megatron dataset under a folder, each weighted by its token count.

    python tools/gen_file_list.py --root DIR [--output LIST] [--corpus-from parent|grandparent|stem|none]
                                  [--epochs CORPUS=E ...]

Weighting each file by its tokens samples every file in proportion to its size (one pass over everything);
``--epochs books=2 wiki=0.5`` scales the weights of one corpus, so that corpus is seen about that many times as
often relative to the others. Corpus labels come from each file's folder (``parent``), the folder above it
(``grandparent``), the file name without shard number and ``_text_document`` (``stem``: Dolma-style
``algebraic-stack-train-0003_text_document`` -> ``algebraic-stack-train``), or one label for all (``none``: the
root folder's name). Without --output the list goes to stdout and the summary to stderr.
User mistakes end in one ``error: ...`` line on stderr and exit status 2, and no list is written.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_ext.cli import OneLineParser, run_tool
from megatron_ext.data.data_list import (
    DataEntry,
    DataListError,
    corpus_table,
    format_corpus_table,
    format_data_list,
    token_counts,
    validate,
    write_data_list,
)

_SHARD_SUFFIX = re.compile(r"([-_.]\d+)?(_text_document)?$")


def corpus_label(prefix: Path, root: Path, how: str) -> str:
    """The corpus a dataset belongs to, by the --corpus-from rule."""
    if how == "parent":
        return prefix.parent.name or root.name
    if how == "grandparent":
        return prefix.parent.parent.name if prefix.parent != root else root.name
    if how == "stem":
        return _SHARD_SUFFIX.sub("", prefix.name) or prefix.name
    return root.name or "all"


def parse_epochs(items: Sequence[str]) -> dict[str, float]:
    """``CORPUS=E`` pairs; E is a finite number >= 0."""
    epochs: dict[str, float] = {}
    for item in items:
        corpus, sep, value = item.partition("=")
        try:
            e = float(value)
        except ValueError:
            e = math.nan
        if not sep or not corpus or not math.isfinite(e) or e < 0:
            raise DataListError(f"--epochs {item!r}: expected CORPUS=E with E a number >= 0, e.g. books=2")
        if corpus in epochs:
            raise DataListError(f"--epochs: corpus {corpus!r} given twice")
        epochs[corpus] = e
    return epochs


def find_indexes(root: Path) -> list[Path]:
    """Every ``*.idx`` under root, sorted (a reproducible list); follows folder symlinks (data folders are often
    symlink farms), visiting each real folder once so a link cycle cannot loop."""
    found: list[Path] = []
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()  # walk order decides which route to a twice-linked folder is kept: make it reproducible
        found.extend(Path(folder) / f for f in files if f.endswith(".idx"))
    return sorted(found)


def scan(root: Path, how: str) -> list[DataEntry]:
    """A weight-0 entry (counted later) per ``*.idx`` under root."""
    if not root.is_dir():
        raise DataListError(f"--root {root}: not a folder; expected a folder holding .bin/.idx files")
    entries = []
    for idx in find_indexes(root):
        prefix = idx.with_suffix("")
        if any(c.isspace() for c in str(prefix)):
            raise DataListError(f"{idx}: a path with spaces cannot go in a data list; rename it")
        entries.append(DataEntry(0.0, str(prefix), corpus_label(prefix, root, how), str(idx)))
    if not entries:
        raise DataListError(f"--root {root}: no .idx files found under it")
    return entries


def build_parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="folder searched recursively for *.idx")
    parser.add_argument("--output", help="data list to write (default: stdout)")
    parser.add_argument(
        "--corpus-from", choices=["parent", "grandparent", "stem", "none"], default="parent", help="corpus labels"
    )
    parser.add_argument("--epochs", nargs="+", action="extend", default=[], metavar="CORPUS=E", help="scale a corpus")
    return parser


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    epochs = parse_epochs(args.epochs)
    root = args.root.resolve()
    entries = scan(root, args.corpus_from)
    validate([DataEntry(1.0, e.prefix, e.corpus, e.source) for e in entries])
    tokens = token_counts(entries)
    unknown = sorted(set(epochs) - {e.corpus for e in entries})
    if unknown:
        known = ", ".join(sorted({e.corpus for e in entries}))
        raise DataListError(f"--epochs: no corpus named {', '.join(unknown)}; corpora found: {known}")
    entries = [
        DataEntry(float(n) * epochs.get(e.corpus, 1.0), e.prefix, e.corpus, e.source) for e, n in zip(entries, tokens)
    ]
    if not any(e.weight > 0 for e in entries):
        raise DataListError("--epochs: every corpus has 0 epochs; expected at least one positive")
    header = f"gen_file_list.py --root {root} --corpus-from {args.corpus_from}"
    if epochs:
        header += " --epochs " + " ".join(f"{c}={e!r}" for c, e in epochs.items())
    summary = format_corpus_table(corpus_table(entries, tokens))
    if args.output:
        write_data_list(entries, args.output, header=f"{header}\nweight = tokens x epochs of the corpus")
        print(f"wrote {len(entries)} datasets to {args.output}")
        print(summary)
    else:
        sys.stdout.write(format_data_list(entries, header=header))
        print(summary, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
