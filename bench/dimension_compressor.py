"""How close a trained hidden-state compressor comes to PCA, the exact optimum of a tied linear map.

    OMP_NUM_THREADS=1 python bench/dimension_compressor.py

Trains a small GPT on the built-in corpus (the Python standard library, byte tokens) with pretrain_gpt.py, or
reuses the one an earlier run left in runs/bench_dimension_compressor/lm; extracts its final-layer post-norm hidden
states of SAMPLES sequences of SEQ tokens from the same corpus; then runs the dimension compressor's sweep
(`python -m megatron_ext.dimension_compressor --sweep`, in this process) over D' = H/16, H/8, H/4, H/2 with the
command line's defaults (orthogonal, i.e. random, initialisation; AdamW lr 1e-3, batch 8 sequences, up to 10
epochs, early stopping with patience 3 on the validation MSE). PCA on the same training tokens is the baseline,
measured in the same run on the same validation tokens.

Prints once per D', after its training, `D'=K cosine trained X pca Y`, then its epochs, whether it stopped early and
its wall time, and at the end the largest gap to PCA against the target (every trained cosine within 0.01 of
PCA's). An experiment at toy scale: the reference's LM has H = 2048 and 50,000 sequences of 512 tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_ext import dimension_compressor as dc  # noqa: E402
from megatron_ext.platform import quiet_optional_dependency_warnings  # noqa: E402

RUN = ROOT / "runs" / "bench_dimension_compressor"
LM = RUN / "lm"
HIDDEN, LAYERS, HEADS, SEQ, ITERS = 128, 2, 4, 128, 300
SAMPLES = 1024
TARGET = 0.01


def train_lm() -> float:
    """The small LM (reused when its checkpoint is there); returns the seconds spent."""
    if (LM / "latest_checkpointed_iteration.txt").is_file():
        return 0.0
    start = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "pretrain_gpt.py"), "--num-layers", str(LAYERS), "--hidden-size", str(HIDDEN),
           "--num-attention-heads", str(HEADS), "--seq-length", str(SEQ), "--micro-batch-size", "8",
           "--train-iters", str(ITERS), "--lr", "1e-3", "--lr-decay-style", "cosine", "--lr-warmup-iters", "30",
           "--eval-iters", "0", "--log-interval", "100", "--save", str(LM), "--data-cache-path", str(RUN / "data"),
           "--run-dir", str(RUN / "lm_run")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        sys.exit(f"training the LM failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    last = [line for line in proc.stdout.splitlines() if line.startswith("iter ")][-1]
    print(f"LM: {LAYERS} layers, H={HIDDEN}, {ITERS} iterations on the built-in corpus ({last.split('|')[1].strip()})")
    return time.perf_counter() - start


def main() -> None:
    quiet_optional_dependency_warnings()
    print(f"bench/dimension_compressor.py: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    lm_seconds = train_lm()
    log_path = RUN / "sweep.log"
    RUN.mkdir(parents=True, exist_ok=True)
    argv = [
        "--load",
        str(LM),
        "--num-samples",
        str(SAMPLES),
        "--max-seq-length",
        str(SEQ),
        "--extract-batch-size",
        "16",
        "--data-cache-path",
        str(RUN / "data"),
        "--sweep",
        "--output-dir",
        str(RUN / "compressor"),
    ]
    print(f"sweep: python -m megatron_ext.dimension_compressor {' '.join(argv)}  (log: {log_path})")
    start = time.perf_counter()
    with log_path.open("w") as log_file:

        def log(line: str) -> None:
            log_file.write(line + "\n")
            log_file.flush()
            if line.startswith(("D'=", "  ", "hidden states H=")):
                print(line, flush=True)

        results = dc.run(dc.parse_args(argv), log=log)
    seconds = time.perf_counter() - start
    gaps = {r.d_compressed: r.pca["cosine"] - r.best["cosine"] for r in results}
    worst = max(gaps, key=lambda d: gaps[d])
    for r in results:
        print(f"D'={r.d_compressed}: trained/pca cosine {r.best['cosine'] / r.pca['cosine']:.4f}, "
              f"mse trained/pca {r.best['mse'] / r.pca['mse']:.3f}")  # fmt: skip
    verdict = "met" if gaps[worst] <= TARGET else "missed"
    print(f"largest gap to PCA: {gaps[worst]:.4f} at D'={worst} (target <= {TARGET}: {verdict}); "
          f"epochs {', '.join(str(r.epochs) for r in results)}; sweep with extraction {seconds:.1f} s, "
          f"LM training {lm_seconds:.1f} s{' (reused)' if lm_seconds == 0 else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
