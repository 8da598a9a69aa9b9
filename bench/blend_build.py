"""Index build time and memory: our two-level CorpusBlend against megatron-core's BlendedMegatronDatasetBuilder.

A synthetic data list of --files files in --corpora corpora (sparse .bin files, real .idx files with
--docs-per-file documents of random lengths; no token is read while building indices).  Each measurement runs
in its own subprocess, so peak RSS (ru_maxrss after minus before the build, i.e. growth of the process peak) is
not polluted by the others.  tracemalloc's peak (numpy's and Python's allocations, not the C++ helpers') comes
from a separate build into another cache folder, because tracing slows Python-heavy code several-fold.

    python bench/blend_build.py                                 # 2,500 files, 10M samples of 4,096 tokens
    python bench/blend_build.py --files 300 --samples 200000   # quick run

megatron-core is timed on the same run, or on --mcore-samples (and a quarter of it) extrapolated linearly to
--samples, under --mcore-timeout seconds per run (a run that times out gives a lower bound).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ext.platform import quiet_optional_dependency_warnings  # noqa: E402


def make_files(root: Path, files: int, corpora: int, docs: int, seed: int) -> list[tuple[float, str, str]]:
    """Sparse .bin + real .idx per file; corpora of unequal sizes, weights per file in [0.5, 2)."""
    rng = np.random.default_rng(seed)
    corpus_of = np.sort(rng.choice(corpora, size=files, p=rng.dirichlet(np.ones(corpora) * 2)))
    out = []
    for i in range(files):
        folder = root / f"corpus{corpus_of[i]:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        prefix = str(folder / f"part{i:05d}")
        lengths = np.clip(rng.lognormal(6.5, 1.0, size=docs), 1, 60_000).astype(np.int32)  # mean ~1,100
        pointers = np.zeros(docs, dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * 2, out=pointers[1:])
        with open(prefix + ".idx", "wb") as f:
            f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))
            f.write(struct.pack("<Q", docs) + struct.pack("<Q", docs + 1))
            f.write(lengths.tobytes() + pointers.tobytes() + np.arange(docs + 1, dtype=np.int64).tobytes())
        with open(prefix + ".bin", "wb") as f:
            f.truncate(int(lengths.sum()) * 2)  # uint16 tokens, all zero, never read
        out.append((float(rng.uniform(0.5, 2.0)), prefix, f"corpus{corpus_of[i]:02d}"))
    return out


def _measure(fn, trace: bool) -> dict:
    """Seconds and peak-RSS growth; with trace, tracemalloc's peak instead of the time (it slows Python)."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    fn()
    result = {"seconds": time.perf_counter() - t0}
    if trace:
        result["tracemalloc_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    result["maxrss_delta"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    return result


def phase_ours(args: argparse.Namespace, files: list) -> dict:
    from megatron_ext.data.blend import BlendSpec, CorpusBlend

    spec = BlendSpec(tuple(files), seq_length=args.seq_length, seed=1234, split="969,30,1")
    holder = {}
    cache = args.cache / ("ours-traced" if args.trace else "ours")
    result = _measure(lambda: holder.setdefault("ds", CorpusBlend(spec, args.samples, cache)), args.trace)
    ds = holder["ds"]
    result["built"] = ds.built
    result["cache_bytes"] = sum(p.stat().st_size for p in ds.cache_path.iterdir())
    result["pool_docs"] = sum(s["pool"] for s in ds.meta["stats"].values())
    result["corpora"] = len(ds.corpora)
    return result


def phase_mcore(args: argparse.Namespace, files: list, samples: int) -> dict:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    class Tokenizer:
        eod, pad, vocab_size, unique_identifiers = 0, -1, 32000, {"class": "BenchTokenizer"}

    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=args.seq_length,
        blend=([p for _, p, _ in files], [w for w, _, _ in files]),
        split="969,30,1",
        path_to_cache=str(args.cache / f"mcore-{samples}{'-traced' if args.trace else ''}"),
        tokenizer=Tokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    import torch

    # megatron-core's BlendedDataset asks torch.distributed for the rank whenever it has a cache path.
    init = f"file://{args.workdir}/pg-{os.getpid()}"
    torch.distributed.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    config.split_matrix = [config.split_matrix[0], None, None]  # train only, as megatron_ext.data.gpt_data does
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [samples, 0, 0], lambda: True, config)
    return _measure(builder.build, args.trace)


def run_phase(args: argparse.Namespace, phase: str, samples: int, timeout: float | None = None, trace=False) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--phase-samples", str(samples)] + ["--trace"] * trace
    cmd += ["--workdir", str(args.workdir), "--seq-length", str(args.seq_length), "--samples", str(args.samples)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": float(timeout), "timed_out": True}
    if proc.returncode != 0:
        raise RuntimeError(f"{phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(n: float) -> str:
    return f"{n / 2**30:7.2f} GiB" if n >= 2**28 else f"{n / 2**20:7.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2500)
    parser.add_argument("--corpora", type=int, default=15)
    parser.add_argument("--docs-per-file", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--mcore-samples", type=int, help="default: --samples (no extrapolation)")
    parser.add_argument("--mcore-timeout", type=float, default=1200)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/blend_bench"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files and caches")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--phase-samples", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--mcore-tracemalloc", action="store_true", help="also rebuild megatron-core's under tracemalloc"
    )
    args = parser.parse_args()
    args.cache = args.workdir / "cache"
    quiet_optional_dependency_warnings()

    if args.phase:
        import logging

        logging.disable(logging.INFO)
        with open(args.workdir / "files.json") as f:
            files = [tuple(x) for x in json.load(f)]
        print(f"phase {args.phase} {args.phase_samples}", file=sys.stderr)
        if args.phase == "ours":
            result = phase_ours(args, files)
        else:
            result = phase_mcore(args, files, args.phase_samples)
        print(json.dumps(result))
        return

    shutil.rmtree(args.workdir, ignore_errors=True)
    t0 = time.perf_counter()
    files = make_files(args.workdir / "data", args.files, args.corpora, args.docs_per_file, seed=0)
    with open(args.workdir / "files.json", "w") as f:
        json.dump(files, f)
    lengths_total = sum(os.path.getsize(p + ".bin") // 2 for _, p, _ in files)
    print(
        f"{args.files} files, {args.corpora} corpora, {args.files * args.docs_per_file:,} documents, "
        f"{lengths_total:,} tokens (made in {time.perf_counter() - t0:.1f} s); "
        f"run: {args.samples:,} samples of {args.seq_length} = {args.samples * args.seq_length:,} tokens"
    )
    cold = run_phase(args, "ours", args.samples)
    warm = run_phase(args, "ours", args.samples)
    assert cold["built"] and not warm["built"], "expected a cold build, then a cache hit"
    cold["tracemalloc_peak"] = run_phase(args, "ours", args.samples, trace=True)["tracemalloc_peak"]
    mcore_n = args.mcore_samples or args.samples
    mcore = [(mcore_n, run_phase(args, "mcore", mcore_n, args.mcore_timeout))]
    if mcore_n < args.samples:  # a second, smaller point for the slope
        mcore.insert(0, (mcore_n // 4, run_phase(args, "mcore", mcore_n // 4, args.mcore_timeout)))
    if args.mcore_tracemalloc and not mcore[-1][1].get("timed_out"):
        traced = run_phase(args, "mcore", mcore_n, args.mcore_timeout, trace=True)
        mcore[-1][1]["tracemalloc_peak"] = traced.get("tracemalloc_peak")
    (n_lo, r_lo), (n_hi, r_hi) = mcore[0], mcore[-1]
    if r_hi.get("timed_out"):
        m_est, how = r_hi["seconds"], f"lower bound: timed out at {n_hi:,} samples"
    elif n_hi == args.samples:
        m_est, how = r_hi["seconds"], "measured"
    else:  # cost only grows with samples: the measurement is a lower bound, the line through both an estimate
        slope = max(0.0, (r_hi["seconds"] - r_lo["seconds"]) / (n_hi - n_lo))
        m_est = r_hi["seconds"] + slope * (args.samples - n_hi)
        how = f"extrapolated linearly from {n_lo:,} and {n_hi:,} samples (>= {r_hi['seconds']:.1f} s)"

    rows = [
        ("ours cold", args.samples, cold),
        ("ours warm (cache hit)", args.samples, warm),
    ] + [("megatron-core cold", n, r) for n, r in mcore]
    print(f"\n{'build':24} {'samples':>12} {'seconds':>9} {'tracemalloc peak':>17} {'maxrss delta':>13}")
    for name, n, r in rows:
        if r.get("timed_out"):
            print(f"{name:24} {n:12,} {'>' + format(r['seconds'], '.0f'):>9}  (timed out)")
            continue
        traced = _gib(r["tracemalloc_peak"]) if r.get("tracemalloc_peak") is not None else "-"
        print(f"{name:24} {n:12,} {r['seconds']:9.2f} {traced:>17} {_gib(r['maxrss_delta']):>13}")
    if how != "measured":
        print(f"{'megatron-core cold (est)':24} {args.samples:12,} {m_est:9.1f}   {how}")
    print(f"\ncold speed-up at {args.samples:,} samples: {m_est / cold['seconds']:.1f}x (target >= 10x)")
    print(f"warm load: {warm['seconds']:.3f} s (target < 0.5 s)")
    print(f"our cache on disk: {_gib(cold['cache_bytes'])} ({cold['pool_docs']:,} pool documents)")

    # Index bytes of a 1e12-token run, from this run's bytes per sample and per drawn document.
    tokens = 10**12
    samples = tokens // args.seq_length
    avg_doc = lengths_total / (args.files * args.docs_per_file)
    per_sample = 1 + 4 + 8 + 4  # corpus id, draw number, pool position, token offset (int64 draws past 2**31)
    ours_bytes = samples * per_sample + tokens / avg_doc * 4
    mcore_bytes = samples * (2 + 8 + 8 + 4) + tokens / avg_doc * 4  # blend ids + draws, sample & shuffle index
    print(
        f"1e12-token run ({samples:,} samples of {args.seq_length}, ~{avg_doc:.0f}-token documents): "
        f"our indices ~{_gib(ours_bytes).strip()} on disk, memory-mapped (build working set bounded by an epoch "
        f"of <= 2**24 documents and 4M-sample blend chunks); megatron-core ~{_gib(mcore_bytes).strip()}, built "
        "in memory per dataset and for the whole blending index at once"
    )
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
