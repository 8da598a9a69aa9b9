"""Combine data lists into one mixture in which each list gets a chosen share of the samples.

    python tools/mix_datasets.py --inputs W1 LIST1 W2 LIST2 ... [--output LIST] [--summary] [--plot PNG]
    python3 mix_datasets.py --input 0.9 papers.txt 0.1 dolma.txt > mix.txt      # blendcorpus' spelling

Each input's weights are divided by their own sum and multiplied by W_i / sum(W), so ``--inputs 7 code.txt 3
web.txt`` draws 70% of samples from code.txt's datasets, in code.txt's own proportions, whatever scale its
weights were written in (token counts, percentages, ...). Weights are written at full precision (a 1e-12 share
stays 1e-12; blendcorpus' mix_datasets.py rounds to 6 decimals), corpus labels are kept, and a prefix listed in
several inputs becomes one line with the weights added. As blendcorpus' tool, it takes ``--input`` and writes the
list to standard output when ``--output`` is not given (its messages then go to standard error). Mixing often
happens on a login node before the data is staged: datasets whose files are not on this machine give one
warning per list (``--no-check`` skips the file checks). ``--summary`` prints tokens and weight per corpus;
``--plot`` draws the share per corpus (one colour per input). User mistakes end in one ``error: ...`` line on
stderr and exit status 2, and no list is written.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from megatron_ext.cli import OneLineParser, check_image_path, run_tool
from megatron_ext.data.data_list import (
    DataEntry,
    DataListError,
    corpus_table,
    format_corpus_table,
    format_data_list,
    missing_file,
    missing_files,
    mix_lists,
    parse_data_list,
    token_counts,
    validate,
    write_data_list,
)
from megatron_ext.data.mixture import MixInput, plot_mixture


def parse_inputs(items: Sequence[str], check_files: bool = True) -> list[MixInput]:
    """``W1 LIST1 W2 LIST2 ...``; each list is parsed and validated on its own. Its datasets whose files are not
    on this machine give one warning (none when not ``check_files``); files present must be whole."""
    if len(items) % 2:
        raise DataListError(f"--inputs: {len(items)} items; expected pairs 'WEIGHT LIST'")
    inputs = []
    for i in range(0, len(items), 2):
        text, path = items[i], items[i + 1]
        try:
            weight = float(text)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise DataListError(f"--inputs: weight {text!r} for {path} must be a finite number >= 0")
        entries = parse_data_list(path)
        validate(entries, check_sizes=check_files, missing_ok=True)
        missing = missing_files(entries) if check_files else []
        if missing:
            print(
                f"warning: {path}: {len(missing)} of {len(entries)} datasets are not on this machine (first: "
                f"{missing[0].split(';')[0]}); mixed as listed (--no-check skips this check)",
                file=sys.stderr,
            )
        inputs.append(MixInput(weight, path, entries))
    if not any(m.weight > 0 for m in inputs):
        raise DataListError("--inputs: all list weights are zero; expected at least one positive")
    return inputs


def mix(inputs: Sequence[MixInput]) -> list[DataEntry]:
    """The combined list (see :func:`mix_lists`): entry weight x (W_i / sum W) / (its list's sum), duplicates merged."""
    return mix_lists([(m.weight, m.entries) for m in inputs])


def build_parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--inputs", "--input", nargs="+", required=True, metavar="W LIST", help="weight and data list pairs"
    )
    parser.add_argument("--output", help="the combined data list to write (default: standard output)")
    parser.add_argument(
        "--no-check", action="store_true", help="do not look for the datasets' files (lists made before staging)"
    )
    parser.add_argument("--summary", action="store_true", help="print tokens and weight per corpus")
    parser.add_argument("--plot", metavar="PNG", help="draw the share per corpus (bar chart)")
    return parser


def summary_tokens(entries: Sequence[DataEntry]) -> np.ndarray:
    """Tokens per dataset for --summary; 0 for a dataset whose files are not on this machine."""
    here = [i for i, e in enumerate(entries) if missing_file(e) is None]
    tokens = np.zeros(len(entries), dtype=np.int64)
    tokens[here] = token_counts([entries[i] for i in here])
    return tokens


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    inputs = parse_inputs(args.inputs, check_files=not args.no_check)
    if args.output and os.path.realpath(args.output) in {os.path.realpath(m.path) for m in inputs}:
        raise DataListError(f"--output {args.output} is also an input list; expected a new file")
    if args.plot:
        check_image_path("--plot", args.plot)
    entries = mix(inputs)
    if args.plot:
        plot_mixture(inputs, args.plot)  # before the list: a failed plot must leave no list behind
    header = "mix_datasets.py --inputs " + " ".join(f"{m.weight!r} {os.path.abspath(m.path)}" for m in inputs)
    messages = sys.stdout
    if args.output:
        write_data_list(entries, args.output, header=header)
    else:
        sys.stdout.write(format_data_list(entries, header=header))
        messages = sys.stderr  # the list is the output: a redirect must hold nothing else
    target = args.output or "standard output"
    print(f"wrote {len(entries)} datasets from {len(inputs)} lists to {target}", file=messages)
    if args.summary:
        print(format_corpus_table(corpus_table(entries, summary_tokens(entries))), file=messages)
    if args.plot:
        print(f"wrote {args.plot}", file=messages)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
