"""Show how often each corpus of a mixture would be seen in a training run of a given length.

    python tools/inspect_data.py LIST [LIST ...] --train-tokens 2T [--max-epochs 4] [--split 969,30,1] [--json]
    python tools/inspect_data.py --data-path 0.3 /data/books/a 0.7 /data/web/b --train-tokens 1e9

Per corpus: tokens on disk, share of the weight, sampled tokens (share x --train-tokens) and implied epochs
(sampled / tokens), with a WARNING for each corpus repeated more than --max-epochs times (repeating data much
past ~4 epochs stops helping) and for corpora whose files are weighted so unevenly that some file is. Epochs
are estimates from token counts (training samples whole sequences); pass the run's ``--split`` to count only
the training share of each file, as training does (the default counts every token). User mistakes end in one
``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict

from megatron_ext.cli import OneLineParser, format_table, run_tool
from megatron_ext.data.data_list import DataListError, parse_data_lists, parse_data_path, token_counts, validate
from megatron_ext.data.mixture import parse_token_count, usage, warnings_for


def train_fraction(split: str) -> float:
    """The train share of a ``--split`` such as ``969,30,1`` (as in the training config)."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",") if x.strip()]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or not all(math.isfinite(x) and x >= 0 for x in parts) or parts[0] <= 0:
        raise DataListError(
            f"--split {split!r}: expected up to three numbers >= 0 with a positive first, e.g. 969,30,1"
        )
    return parts[0] / sum(parts)


def build_parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lists", nargs="*", metavar="LIST", help="data lists (several make one mixture)")
    parser.add_argument("--data-path", nargs="+", metavar="W PREFIX", help="Megatron-style 'w p w p ...' instead")
    parser.add_argument("--train-tokens", required=True, help="tokens the run trains on (2e12, 300B, 2T)")
    parser.add_argument("--max-epochs", type=float, default=4.0, help="warn above this many repeats (default 4)")
    parser.add_argument("--split", default="1,0,0", help="the run's train,valid,test split (default: all train)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    return parser


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.lists) == bool(args.data_path):
        raise DataListError("give data lists or --data-path (one of the two)")
    if not math.isfinite(args.max_epochs) or args.max_epochs <= 0:
        raise DataListError(f"--max-epochs {args.max_epochs}: expected a positive number")
    train_tokens = parse_token_count(args.train_tokens)
    fraction = train_fraction(args.split)
    entries = parse_data_lists(args.lists) if args.lists else parse_data_path(args.data_path)
    validate(entries)
    tokens = token_counts(entries)
    rows = usage(entries, tokens, train_tokens, fraction)
    warnings = warnings_for(rows, args.max_epochs)
    total_tokens = int(tokens.sum())
    epochs = train_tokens / (total_tokens * fraction)
    if args.json:
        out = {"train_tokens": train_tokens, "total_tokens": total_tokens, "train_fraction": fraction, "epochs": epochs}
        print(json.dumps({**out, "corpora": [asdict(r) for r in rows], "warnings": warnings}, indent=1))
        return 0
    body = [
        [r.corpus, str(r.files), f"{r.tokens:,}", f"{r.share:.4%}", f"{r.sampled_tokens:,.0f}", f"{r.epochs:.3f}"]
        for r in rows
    ]
    total = ["TOTAL", str(len(entries)), f"{total_tokens:,}", "100.0000%", f"{train_tokens:,}"]
    total.append(f"{epochs:.3f}")
    header = ["corpus", "files", "tokens", "share", "sampled", "epochs"]
    print(format_table(header, [*body, total]))
    for line in warnings:
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
