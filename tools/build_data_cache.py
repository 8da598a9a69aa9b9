"""Build the CorpusBlend index caches ahead of time (e.g. on a login node), so training ranks only load them.

    python tools/build_data_cache.py --data-file-list data.txt --seq-length 4096 --train-tokens 1e12 \\
        --seed 1234 --split 969,30,1 --data-cache-path /scratch/cache [--valid-samples 10000]
    python tools/build_data_cache.py --data-path 0.7 /d/web/part0 0.3 /d/code/part0 ...

A data-list line is ``weight prefix corpus``, or ``weight prefix`` with the corpus taken from the prefix's
parent folder name; blank lines and ``#`` comments are skipped.  Prints each cache folder, its build time and
size.  Run with the same arguments as training: the cache key covers files (sizes, mtimes), weights, corpora,
seq_length, seed, split, sample count and start offsets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ext.data.blend import BlendSpec, CorpusBlend  # noqa: E402


def parse_data_list(path: str) -> list[tuple[float, str, str]]:
    """Minimal data-list parser (to be replaced by megatron_ext.data.data_list): (weight, prefix, corpus)."""
    entries = []
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3):
            raise SystemExit(f"{path}:{number}: expected 'weight prefix [corpus]', got {raw!r}")
        try:
            weight = float(parts[0])
        except ValueError:
            raise SystemExit(f"{path}:{number}: weight {parts[0]!r} is not a number") from None
        corpus = parts[2] if len(parts) == 3 else Path(parts[1]).parent.name
        entries.append((weight, parts[1], corpus))
    return entries


def _from_data_path(values: list[str]) -> list[tuple[float, str, str]]:
    if len(values) == 1:
        return [(1.0, values[0], Path(values[0]).parent.name)]
    if len(values) % 2:
        raise SystemExit("--data-path takes 'weight prefix' pairs (or a single prefix)")
    return [(float(w), p, Path(p).parent.name) for w, p in zip(values[0::2], values[1::2])]


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-file-list", help="file of 'weight prefix [corpus]' lines")
    source.add_argument("--data-path", nargs="+", help="weight prefix pairs; corpus = parent folder name")
    parser.add_argument("--seq-length", type=int, required=True)
    run = parser.add_mutually_exclusive_group(required=True)
    run.add_argument("--train-samples", type=int)
    run.add_argument("--train-tokens", type=float, help="converted to samples of seq_length tokens (rounded up)")
    parser.add_argument("--valid-samples", type=int, default=0, help="also build the validation split's cache")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--split", default="969,30,1")
    parser.add_argument("--data-cache-path", required=True)
    parser.add_argument("--start-offsets", help="JSON {corpus: samples consumed}, from consumed_per_corpus")
    args = parser.parse_args(argv)

    files = parse_data_list(args.data_file_list) if args.data_file_list else _from_data_path(args.data_path)
    samples = args.train_samples or -(-int(args.train_tokens) // args.seq_length)
    offsets = json.loads(args.start_offsets) if args.start_offsets else None
    corpora = sorted({c for _, _, c in files})
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


if __name__ == "__main__":
    main()
