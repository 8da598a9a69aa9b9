"""Build the CorpusBlend index caches ahead of time (e.g. on a login node), so training ranks only load them.

    python tools/build_data_cache.py --data-file-list data.txt --seq-length 4096 --train-tokens 1e12 \\
        --seed 1234 --split 969,30,1 --data-cache-path /scratch/cache [--valid-samples 10000]
    python tools/build_data_cache.py --data-path 0.7 /d/web/part0 0.3 /d/code/part0 ...

Data lists are read and validated as in training (file:line errors).  Prints each cache folder, its build time and
size.  Run with the same arguments as training: the cache key covers files (sizes, mtimes), weights, corpora,
seq_length, seed, split, sample count and start offsets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megatron_ext.platform import quiet_optional_dependency_warnings

quiet_optional_dependency_warnings()

from megatron_ext.cli import OneLineParser, UserError, report  # noqa: E402
from megatron_ext.config import folder_problem  # noqa: E402
from megatron_ext.data.blend import BlendSpec, CorpusBlend, split_fractions  # noqa: E402
from megatron_ext.data.data_list import DataListError, parse_data_lists, parse_data_path, validate  # noqa: E402
from megatron_ext.data.mixture import parse_token_count  # noqa: E402


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def _check_args(args: argparse.Namespace, corpora: list[str]) -> tuple[int, dict[str, int] | None]:
    """(training samples, start offsets per corpus), or a DataListError naming the flag."""
    if args.seq_length <= 0:
        raise DataListError(f"--seq-length {args.seq_length}: expected a positive number of tokens")
    try:
        split_fractions(args.split)
    except ValueError as e:
        raise DataListError(f"--split: {e}") from None
    if args.valid_samples < 0:
        raise DataListError(f"--valid-samples {args.valid_samples}: expected >= 0")
    if args.train_samples is not None and args.train_samples <= 0:
        raise DataListError(f"--train-samples {args.train_samples}: expected a positive number")
    samples = args.train_samples or -(-parse_token_count(args.train_tokens) // args.seq_length)
    problem = folder_problem(args.data_cache_path)
    if problem is not None:
        raise DataListError(f"--data-cache-path {args.data_cache_path}: {problem}")
    if not args.start_offsets:
        return samples, None
    try:
        offsets = json.loads(args.start_offsets)
    except ValueError:
        offsets = None
    ok = isinstance(offsets, dict) and all(isinstance(v, int) and v >= 0 for v in offsets.values())
    if not ok:
        raise DataListError(f'--start-offsets {args.start_offsets!r}: expected JSON like {{"web": 1200}}')
    unknown = sorted(set(offsets) - set(corpora))
    if unknown:
        raise DataListError(f"--start-offsets: unknown corpus {', '.join(unknown)}; the data has {', '.join(corpora)}")
    return samples, offsets


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-file-list", nargs="+", help="data list file(s): 'weight prefix [corpus]' lines")
    source.add_argument("--data-path", nargs="+", help="weight prefix pairs; corpus = parent folder name")
    parser.add_argument("--seq-length", type=int, required=True)
    run = parser.add_mutually_exclusive_group(required=True)
    run.add_argument("--train-samples", type=int)
    run.add_argument(
        "--train-tokens", help="as 2e12, 300B or 2T; converted to samples of seq_length tokens (rounded up)"
    )
    parser.add_argument("--valid-samples", type=int, default=0, help="also build the validation split's cache")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--split", default="969,30,1")
    parser.add_argument("--data-cache-path", required=True)
    parser.add_argument("--start-offsets", help="JSON {corpus: samples consumed}, from consumed_per_corpus")
    try:
        args = parser.parse_args(argv)
        entries = parse_data_lists(args.data_file_list) if args.data_file_list else parse_data_path(args.data_path)
        validate(entries)
        files = [(e.weight, e.prefix, e.corpus) for e in entries]
        corpora = sorted({c for _, _, c in files})
        samples, offsets = _check_args(args, corpora)
    except UserError as e:
        return report(e)
    print(f"{len(files)} files in {len(corpora)} corpora; {samples:,} training samples of {args.seq_length} tokens")
    jobs = [("train", 0, samples, offsets)] + ([("valid", 1, args.valid_samples, None)] if args.valid_samples else [])
    for name, index, n, start in jobs:
        spec = BlendSpec(tuple(files), args.seq_length, args.seed, args.split, index)
        t0 = time.perf_counter()
        ds = CorpusBlend(spec, n, args.data_cache_path, start_offsets=start)
        seconds = time.perf_counter() - t0
        state = f"built in {seconds:.1f} s" if ds.built else f"already present (loaded in {seconds:.2f} s)"
        print(f"{name}: {ds.cache_path}  {state}, {_size(ds.cache_path) / 2**20:,.1f} MiB")
        for corpus in ds.corpora:
            print(f"  {corpus:30} weight {ds.weights[corpus]:.4f}  samples {ds.meta['draws'][corpus]:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
